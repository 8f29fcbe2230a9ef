"""Flower ClientApp: Message <-> `clients.node` calls, nothing else.

Node config (set by the node's operator, e.g. `--node-config` of flower-supernode):
    state-dir    where the node keeps its ledger (required in deployment)
    data-path    the node's private CSV / JSONL / Parquet file (deployment)
    max-epsilon  the node's own privacy cap; the lower of it and the federation's wins
In simulation, `partition-id` selects the client's share of the configured dataset and
the state lives under the run's state root.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.node import evaluate_round, train_round
from fedtune.config import Config, config_from_toml_text
from fedtune.errors import ConfigError

app = ClientApp()


def node_config(msg: Message, context: Context) -> tuple[Config, Path, object]:
    """The federation's config with this node's overrides, its state dir and its data."""
    record = msg.content["config"]
    config = config_from_toml_text(str(record["fedtune-config"]), source="federation config")
    node = context.node_config
    if "max-epsilon" in node:
        cap = float(node["max-epsilon"])
        config = config.replace(dp=dataclasses.replace(config.dp, target_epsilon=min(cap, config.dp.target_epsilon)))
    if "data-path" in node:
        config = config.replace(data=dataclasses.replace(config.data, path=str(node["data-path"]), max_examples=0))
        table = None
        state_dir = Path(str(node.get("state-dir", ""))) if node.get("state-dir") else None
    elif "partition-id" in node:
        from simulations.partition import client_table

        pid = int(node["partition-id"])
        table = client_table(config, pid)
        state_dir = Path(str(record["state-root"])) / f"client-{pid:05d}"
    else:
        raise ConfigError("node config needs data-path (and state-dir), or partition-id in simulation")
    if state_dir is None:
        raise ConfigError("node config needs state-dir: the folder that keeps this node's privacy ledger")
    return config, state_dir, table


def _arrays(msg: Message) -> dict:
    return {key: array.numpy() for key, array in msg.content["arrays"].items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, state_dir, table = node_config(msg, context)
    record = msg.content["config"]
    validation = str(record.get("evaluation", "federated")) != "central"  # central: no split needed
    outcome = train_round(config, _arrays(msg), int(record["server-round"]), state_dir, table, validation)
    content = RecordDict({
        "status": ConfigRecord({"status": outcome.status, "message": outcome.message}),
        "metrics": MetricRecord({"num-examples": outcome.num_examples, "epsilon": float(outcome.epsilon),
                                 **{k: float(v) for k, v in outcome.metrics.items()}}),
    })
    if outcome.arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in outcome.arrays.items()})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, _, table = node_config(msg, context)
    examples, metrics = evaluate_round(config, _arrays(msg), table)
    return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": examples, **metrics})}), reply_to=msg)
