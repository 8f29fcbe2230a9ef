"""`flwr run .` on Flower's local simulation runtime: a virtual node (node config holding only
Flower's partition-id and num-partitions) plays a demonstration site of the deployment
ClientApp; a deployed node (state-dir set) never does."""

from __future__ import annotations

from collections import Counter

import pytest
from flwr.app import Context, RecordDict

from clients.client_app import deployment_setup
from clients.virtual_node import DEMO_MAX_EPSILON, is_virtual
from fedtune.data.named import load_builtin
from fedtune.errors import ConfigError


def _context(node_config: dict, run_id: int = 7) -> Context:
    return Context(run_id=run_id, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_virtual_nodes_hold_disjoint_shards_of_the_demo_rows_and_the_default_cap(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    setups = [deployment_setup(_context({"partition-id": i, "num-partitions": 3})) for i in range(3)]
    every = load_builtin("bbc-news").texts
    assert Counter(text for setup in setups for text in setup.table.texts) == Counter(every)  # each row once
    assert [len(setup.table) for setup in setups] == [742, 742, 741]
    assert all(len(set(setup.table.labels)) == 5 for setup in setups)  # shuffled: every label at every site
    policy = setups[1].policy
    assert policy.own.max_epsilon == DEMO_MAX_EPSILON and not policy.allow_non_private
    assert setups[1].state_dir == tmp_path / "fedtune-virtual-nodes" / "run-7" / "node-00001"
    assert policy.own.node.budget_dir == str(setups[1].state_dir)
    again = deployment_setup(_context({"partition-id": 1, "num-partitions": 3}, run_id=8))
    assert again.state_dir.parent.name == "run-8" and again.table.texts == setups[1].table.texts


def test_a_deployed_node_never_becomes_a_virtual_one(tmp_path):
    """state-dir set (as `fedtune client` always sets it): the node's own policy rules, even
    with Flower's simulation keys beside it, and a node with neither refuses."""
    assert not is_virtual({"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="max-epsilon|data"):
        deployment_setup(_context({"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="state-dir is required"):
        deployment_setup(_context({}))
    with pytest.raises(ConfigError, match="partition-id = 3: expected 0 to num-partitions - 1"):
        deployment_setup(_context({"partition-id": 3, "num-partitions": 3}))
