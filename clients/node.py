"""A federated node's work and its durable state, independent of Flower.

The state directory (`state-dir` in node config; one per client in simulation) holds:

    ledger.json   the privacy ledger: charged and fsynced before every update leaves
    node.json     last round seen, rounds trained, label set

A restarted node (a new process, a new ClientApp) continues its ledger from there; it
never starts a new one. `client_app.py` only translates Flower messages to these calls.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedtune.adapter import load_state, trainable_state
from fedtune.atomic import atomic_write_json
from fedtune.config import Config
from fedtune.datasets_builtin import Table
from fedtune.dp_train import new_ledger, plan_training, train_call
from fedtune.errors import BudgetExhaustedError, FedtuneError
from fedtune.evaluate import evaluate
from fedtune.local import NodeData, prepare_data
from fedtune.privacy import PrivacyLedger
from fedtune.runtime import MODELS

STATUS_OK = "ok"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"


@dataclass
class TrainOutcome:
    status: str
    arrays: "OrderedDict[str, np.ndarray] | None"
    num_examples: int
    epsilon: float
    metrics: dict = field(default_factory=dict)
    message: str = ""


class NodeState:
    """The node's files in its state directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.ledger_path = self.directory / "ledger.json"
        self.info_path = self.directory / "node.json"

    def ledger(self, config: Config, plan) -> PrivacyLedger:
        """The node's ledger: continued from disk when present, else a new one."""
        if self.ledger_path.exists():
            ledger = PrivacyLedger.load(self.ledger_path)
            if config.dp.enabled and ledger.target_epsilon is not None:
                # a node may lower its cap between runs; raising it is a new decision
                ledger.target_epsilon = min(ledger.target_epsilon, config.dp.target_epsilon)
            return ledger
        return new_ledger(config, plan)

    def info(self) -> dict:
        if not self.info_path.exists():
            return {"last_round": 0, "rounds_trained": 0}
        try:
            return json.loads(self.info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FedtuneError(f"{self.info_path}: corrupt node state ({exc})") from None

    def record_round(self, server_round: int, trained: bool, labels) -> None:
        info = self.info()
        info["last_round"] = max(int(info.get("last_round", 0)), server_round)
        info["rounds_trained"] = int(info.get("rounds_trained", 0)) + int(trained)
        if labels is not None:
            info["labels"] = list(labels)
        atomic_write_json(self.info_path, info)


def _node_data(config: Config, table: Table | None, validation: bool = True):
    num_labels = len(config.data.labels) if config.task_is_classification else None
    model, tokenizer = MODELS.get(config, num_labels)
    data: NodeData = prepare_data(config, tokenizer, MODELS.tokens, table, validation=validation)
    return model, data


def train_round(
    config: Config,
    global_arrays: "dict[str, np.ndarray]",
    server_round: int,
    state_dir: str | Path,
    table: Table | None = None,
    validation: bool = True,
) -> TrainOutcome:
    """One round of local DP training from the global adapter.

    `global_arrays` may be the full adapter or, in FFA-LoRA mode, only what travels (B
    and the head): the frozen A is rebuilt from the shared seed. The ledger is charged
    and saved before training; a budget-exhausted node does not train. `validation=False`
    (the server evaluates centrally) trains on all the node's rows.
    """
    state = NodeState(state_dir)
    model, data = _node_data(config, table, validation)
    plan = plan_training(config, len(data.train))
    ledger = state.ledger(config, plan)
    load_state(model, global_arrays, partial=config.lora.ffa)
    try:
        result = train_call(model, data.train, config, plan, ledger, state.ledger_path, label=f"round {server_round}")
    except BudgetExhaustedError as exc:
        state.record_round(server_round, trained=False, labels=config.data.labels or None)
        return TrainOutcome(STATUS_BUDGET_EXHAUSTED, None, 0, ledger.epsilon(), {}, str(exc))
    state.record_round(server_round, trained=True, labels=config.data.labels or None)
    return TrainOutcome(
        STATUS_OK,
        trainable_state(model),
        len(data.train),
        result.epsilon,
        {"train_loss": result.mean_loss, "train_seconds": result.seconds, "steps": result.steps,
         "noise_multiplier": plan.noise_multiplier, "sample_rate": plan.sample_rate, "delta": ledger.delta,
         "private": plan.private},
    )


def evaluate_round(config: Config, global_arrays: "dict[str, np.ndarray]", table: Table | None = None) -> tuple[int, dict]:
    """Evaluate the global adapter on the node's validation split."""
    model, data = _node_data(config, table)
    load_state(model, global_arrays, partial=config.lora.ffa)
    metrics = evaluate(model, data.val, config.model.task, num_classes=len(config.data.labels) or None)
    return len(data.val), {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
