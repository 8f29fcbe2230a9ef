"""A virtual node of Flower's simulation runtime: what `flwr run .` on the local SuperLink runs.

Flower's simulation gives each virtual node only its `partition-id` and `num-partitions`
as node config; it has no operator to start it with `fedtune client`, no policy file and
no data of its own. Such a node (node config holding Flower's two simulation keys and no
`state-dir`) plays a demonstration site:

- its rows: shard `partition-id` of `num-partitions` of the built-in demonstration dataset
  (`DEMO_DATASET`, public BBC News articles), cut from a seeded shuffle so every shard
  holds every label (flwr-datasets' IidPartitioner cuts the same contiguous shards of a
  shuffled index; a plain permutation avoids a `datasets.Dataset` round trip per message);
- its policy: the built-in node policy, declaring the dataset's five labels, with a cap of
  `DEMO_MAX_EPSILON` per node, the
  default federation's target; the server's request is checked against it as a deployed
  node's is (`fedtune.privacy.policy.NodePolicy.config_for`);
- its state dir and budget: `$FLWR_HOME/fedtune-virtual-nodes/run-RUN_ID/node-NNNNN`, one
  per run: each `flwr run .` simulates a fresh federation of fresh sites, as
  `fedtune simulate` does in its run folder.

A deployed node always has `state-dir` (`fedtune client` sets it), so it never takes this
path; its operator would have to set Flower's simulation keys by hand and leave out the
state dir, and it would then train on public articles, never on its own rows. The harness
(`fedtune simulate`, `flwr run simulations/flwr_app`) injects its own virtual nodes instead.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from clients.node import NodeSetup
from fedtune.config import build_config
from fedtune.data.tables import load_table, select
from fedtune.errors import ConfigError
from fedtune.privacy.policy import STATE_DIR_KEY, NodePolicy

PARTITION_KEY = "partition-id"      # set by Flower's simulation runtime for each virtual node
PARTITIONS_KEY = "num-partitions"
DEMO_DATASET = "bbc-news"
DEMO_MAX_EPSILON = 8.0
DEMO_SHUFFLE_SEED = 0


def is_virtual(node_config) -> bool:
    """A virtual node of Flower's simulation runtime: its two keys, and no state dir."""
    return PARTITION_KEY in node_config and PARTITIONS_KEY in node_config and STATE_DIR_KEY not in node_config


@lru_cache(maxsize=1)
def _demo_table():
    """Loaded once per process: a simulation worker answers many messages."""
    config = build_config({"data": {"dataset": DEMO_DATASET}}, source="virtual node")
    return load_table(config.data, config.model.task)


def _shard(partition: int, partitions: int):
    table = _demo_table()
    order = np.random.default_rng(DEMO_SHUFFLE_SEED).permutation(len(table))
    return select(table, np.array_split(order, partitions)[partition].tolist())


def _state_root() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser() / "fedtune-virtual-nodes"


def virtual_setup(node_config, run_id: int) -> NodeSetup:
    """A demonstration site's setup (module docstring) from Flower's simulation node config."""
    try:
        partition, partitions = int(node_config[PARTITION_KEY]), int(node_config[PARTITIONS_KEY])
    except (TypeError, ValueError):
        raise ConfigError(f"node config: {PARTITION_KEY} = {node_config[PARTITION_KEY]!r}, {PARTITIONS_KEY} = "
                          f"{node_config[PARTITIONS_KEY]!r}: expected whole numbers") from None
    if not 0 <= partition < partitions:
        raise ConfigError(f"node config: {PARTITION_KEY} = {partition}: expected 0 to {PARTITIONS_KEY} - 1 "
                          f"({partitions - 1})")
    state_dir = _state_root() / f"run-{run_id}" / f"node-{partition:05d}"
    labels = sorted({str(label) for label in _demo_table().labels})  # the site declares what its rows may hold
    config = build_config({"data": {"dataset": DEMO_DATASET, "labels": labels}, "dp": {"target_epsilon": DEMO_MAX_EPSILON},
                           "node": {"max_epsilon": DEMO_MAX_EPSILON, "budget_dir": str(state_dir)}},
                          source="virtual node")
    return NodeSetup(NodePolicy.from_config(config), state_dir, _shard(partition, partitions))
