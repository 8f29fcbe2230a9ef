"""A federated node's work and its durable state, independent of Flower.

What a node knows comes from its own side only (`NodeSetup`: its policy, its state dir
and, in simulation, its rows); what a server sends is a request (`fedtune.privacy.policy`). One
round is one locked cycle: check the request against the policy, open the data's budget,
charge the ledger (fsynced) before the first step, train, charge any metric release, and
hand back exactly the values `fedtune.privacy.releases` lists.

The state directory (`state-dir` in node config; one per client in simulation) holds:

    node.json     the steps charged to each ledger this node used (a record that catches a
                  lost or shortened ledger), rounds trained, evaluation counts, rounds
                  charged that released nothing
    node.lock     held for the whole cycle: a second process on this state dir refuses

The ledgers themselves live in the node's budget folder and follow the records they
protect (`fedtune.privacy.budget`): the same rows continue the same budget under any state
dir, and a node whose data grew keeps its state dir and its charges.
`client_app.py` only translates Flower messages to these calls.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from fedtune.models.adapter_io import load_state, trainable_state
from fedtune.system.atomic import atomic_write_json
from fedtune.privacy.budget import Budget, LedgerLostError, StateLockedError, exclusive_lock
from fedtune.config import Config
from fedtune.data.named import Table
from fedtune.training.dp_train import train_call
from fedtune.errors import BudgetExhaustedError, ConfigError, DeadlinePassedError, FedtuneError, ModelError
from fedtune.training.local import NodeData, prepare_data
from fedtune.privacy import PrivacyLedger
from fedtune.training.metric_release import exact_metrics, noisy_metrics
from fedtune.privacy.planning import DPPlan, plan_training
from fedtune.privacy.policy import NodePolicy, PolicyRefusal
from fedtune.privacy.randomness import Randomness
from fedtune.privacy.spending import OverBudgetError, spend
from fedtune.training.model_cache import MODELS

STATUS_OK = "ok"
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"
STATUS_POLICY_REFUSED = "policy-refused"
STATUS_NODE_ERROR = "node-error"  # state locked by another process, lost ledger, other data, bad data file


@dataclass(frozen=True)
class NodeSetup:
    """What only the node knows: its policy, its state dir, and (simulation) its rows."""

    policy: NodePolicy
    state_dir: Path
    table: Table | None = None


@dataclass
class TrainOutcome:
    status: str
    arrays: "OrderedDict[str, np.ndarray] | None" = None
    num_examples: int = 0
    epsilon: float = math.nan
    metrics: dict = field(default_factory=dict)
    message: str = ""
    ledger: PrivacyLedger | None = None
    noise: str = ""


@dataclass
class EvaluateOutcome:
    status: str
    num_examples: int = 0
    metrics: dict = field(default_factory=dict)
    message: str = ""
    epsilon: float = math.nan
    noise: str = ""
    ledger: PrivacyLedger | None = None


class NodeState:
    """The node's files in its state directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.info_path = self.directory / "node.json"
        self.lock_path = self.directory / "node.lock"

    @contextmanager
    def locked(self) -> Iterator[None]:
        with exclusive_lock(self.lock_path, f"node state {self.directory}"):
            yield

    def info(self) -> dict:
        if not self.info_path.exists():
            return {"last_round": 0, "rounds_trained": 0}
        try:
            info = json.loads(self.info_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FedtuneError(f"{self.info_path}: corrupt node state ({exc}); restore it from a backup") from None
        if not isinstance(info, dict):
            raise FedtuneError(f"{self.info_path}: corrupt node state (not a JSON object); restore it from a backup")
        return info

    def _write(self, info: dict) -> None:
        atomic_write_json(self.info_path, info)

    def recorded_steps(self, ledger_id: str) -> tuple[int, str]:
        """The steps this state dir records as charged to `ledger_id` (a check on the ledger
        that the budget folder holds), and where it records them."""
        info = self.info()
        steps = int(info.get("ledgers", {}).get(ledger_id, 0))
        legacy = str(info.get("data_fingerprint", ""))  # node.json written before budgets followed records
        if legacy and legacy[:len(ledger_id)] == ledger_id:
            steps = max(steps, int(info.get("steps_charged", 0)))
        return steps, str(self.info_path)

    def record_charge(self, budget: Budget, ledger: PrivacyLedger) -> None:
        info = self.info()
        ledgers = dict(info.get("ledgers", {}))
        ledger_id = ledger.data_fingerprint
        ledgers[ledger_id] = max(int(ledgers.get(ledger_id, 0)), ledger.steps)
        info.update({"ledgers": ledgers, "ledger": str(budget.ledger_path.resolve())})
        self._write(info)

    def unreleased_rounds(self) -> int:
        """Rounds this node charged and then released nothing for (past the deadline, a
        failure after the charge, a process killed mid-round): each spent budget for nothing."""
        return int(self.info().get("unreleased_rounds", 0))

    def record_unreleased(self, change: int) -> None:
        info = self.info()
        info["unreleased_rounds"] = max(0, int(info.get("unreleased_rounds", 0)) + change)
        self._write(info)

    def record_round(self, server_round: int, trained: bool, labels, central: bool = False) -> None:
        info = self.info()
        info["last_round"] = max(int(info.get("last_round", 0)), server_round)
        info["rounds_trained"] = int(info.get("rounds_trained", 0)) + int(trained)
        if trained:
            info["evaluations_since_training"] = 0
            info["central"] = central  # no evaluation release was planned for this round
        if labels is not None:
            info["labels"] = list(labels)
        self._write(info)

    def evaluations(self) -> int:
        """Evaluations answered since this node last trained. Counted against the node's own
        training rounds, not the round number a message claims, which a server could inflate."""
        return int(self.info().get("evaluations_since_training", 0))

    def record_evaluation(self) -> None:
        info = self.info()
        info["evaluations_since_training"] = self.evaluations() + 1
        self._write(info)


def _node_data(config: Config, table: Table | None, validation: bool = True) -> tuple[Any, NodeData]:
    """The model and the node's rows; a request value its rows rule out is a refusal."""
    num_labels = len(config.data.labels) if config.task_is_classification else None
    model, tokenizer = MODELS.get(config, num_labels)
    try:
        return model, prepare_data(config, tokenizer, MODELS.tokens, table, validation=validation)
    except ConfigError as exc:
        raise PolicyRefusal.of(exc) from None


def _load_global(model, global_arrays, config: Config) -> None:
    try:
        load_state(model, global_arrays, frozen_may_be_missing=True)
    except ModelError as exc:
        raise ModelError(f"the server's adapter does not fit this node's base model "
                         f"({config.model.path or 'the bundled all-MiniLM-L6-v2'}): {exc}") from None


def _planned_releases(config: Config, central_evaluation: bool) -> int:
    """Metric releases per round the noise calibration leaves room for."""
    releases = int(config.node.release_train_loss == "dp")
    if not central_evaluation and config.node.release_evaluation == "dp":
        releases += config.node.max_evaluations_per_round
    return releases


def _release_metrics(ledger: PrivacyLedger, persist, config: Config, model, dataset, label: str,
                     randomness: Randomness) -> dict | None:
    """Charge one Gaussian metric release, then compute it; None when it does not fit.
    A ledger that is already non-private (epsilon inf) releases exact values: noise would
    protect nothing."""
    node = config.node
    if not ledger.is_private:
        return exact_metrics(model, dataset, config.model.task, node.metric_loss_clip)
    sigma = node.metric_noise_multiplier
    if not ledger.remaining_fits(sigma, 1.0, 1):
        return None
    stream = (ledger.data_fingerprint, ledger.steps, len(ledger.calls))
    ledger.charge(sigma, 1.0, 1, label=label)
    persist(ledger)
    return noisy_metrics(model, dataset, config.model.task, sigma, node.metric_loss_clip,
                         randomness.torch_generator("metrics", *stream))


def _node_error(exc: BaseException) -> str:
    """What a node tells the server about its own failure: the kind, never the detail. A
    data error can quote a row (an unknown label is a cell of the file), so the detail goes
    to the node's own log only."""
    print(f"fedtune node: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if not isinstance(exc, FedtuneError):
        traceback.print_exc(file=sys.stderr)
    if isinstance(exc, StateLockedError):
        return "node-error: this node's state is in use by another process"
    if isinstance(exc, LedgerLostError):
        return "node-error: this node's ledger needs its operator (see the node's log)"
    if isinstance(exc, DeadlinePassedError):
        return "node-error: past the round's deadline; nothing released"
    return "node-error: this node could not serve the request (see the node's log)"


def _guarded(work: Callable[[], Any], outcome_type) -> Any:
    """Run a round; a request outside the policy is a refusal naming the field, anything
    else a node-error whose detail stays on the node. Whatever was charged stays charged."""
    try:
        return work()
    except PolicyRefusal as exc:
        return outcome_type(STATUS_POLICY_REFUSED, message=str(exc))
    except Exception as exc:  # noqa: BLE001 - nothing unexpected may leave the node as a traceback
        return outcome_type(STATUS_NODE_ERROR, message=_node_error(exc))


def _plan(config: Config, n_train: int, delta: float, releases: int = 0) -> DPPlan:
    try:
        return plan_training(config, n_train, delta=delta, metric_releases_per_call=releases)
    except ConfigError as exc:  # e.g. a target no noise reaches for the requested training
        raise PolicyRefusal.of(exc) from None


def train_round(setup: NodeSetup, request: Mapping[str, Any], global_arrays: "dict[str, np.ndarray]",
                server_round: int, central_evaluation: bool = False, deadline: float = 0.0,
                released_later: bool = False) -> TrainOutcome:
    """One round of local DP training from the global adapter, within the node's policy.

    `global_arrays` may be the full adapter or, in FFA-LoRA mode, only what travels (B and
    the head): the frozen A is rebuilt from the shared seed. `central_evaluation` (the
    server scores centrally) trains on all the node's rows. Nothing trains unless the
    request fits the policy and the budget. Past `deadline` (the server's round timeout) the
    node stops, releases nothing and frees its slot; what it charged stays charged.
    `released_later` (a SecAgg+ round): the round counts as charged-and-unreleased in
    node.json until the node answers the unmask stage (`NodeState.record_unreleased`), so a
    server that aborts after collecting, in this run or another, is counted durably."""
    return _guarded(lambda: _train(setup, request, global_arrays, server_round, central_evaluation, deadline,
                                   released_later), TrainOutcome)


def _train(setup: NodeSetup, request, global_arrays, server_round: int, central_evaluation: bool,
           deadline: float, released_later: bool = False) -> TrainOutcome:
    config = setup.policy.config_for(request)
    if config.dp.mode == "distributed":  # its noise share alone would be far too little for an update in the clear
        raise PolicyRefusal("dp.mode", "a distributed-DP step is computed only inside a secure aggregation round that "
                                       "announces its parameters; this round does not")
    state = NodeState(setup.state_dir)
    randomness = Randomness.from_setting(config.dp.noise_seed)
    label = f"round {server_round}"
    releases = _planned_releases(config, central_evaluation)
    with state.locked():
        _check_unreleased(state, config)
        model, data = _node_data(config, setup.table, validation=not central_evaluation)
        n = len(data.train)
        try:
            with spend(config, data.record_set, setup.policy.delta_for(config, data.records), label,
                       plan_at=lambda delta: _plan(config, n, delta, releases), steps_to_fit=lambda plan: plan.steps_per_call,
                       recorded_steps=state.recorded_steps, on_persist=state.record_charge) as spending:
                ledger, plan = spending.ledger, spending.plan
                _load_global(model, global_arrays, config)
                if deadline and time.time() >= deadline:  # nothing charged for a round already over
                    raise DeadlinePassedError("the round's deadline passed before training started; nothing charged")
                state.record_unreleased(+1)  # until the round's values are handed back
                try:
                    result = train_call(model, data.train, config, plan, ledger, spending.persist, label=label,
                                        randomness=randomness, deadline=deadline)
                except BudgetExhaustedError as exc:  # the charge was refused: nothing spent
                    state.record_unreleased(-1)
                    raise OverBudgetError(str(exc), ledger) from None
                metrics = {"train-seconds": result.seconds, "steps": result.steps,
                           "noise-multiplier": plan.noise_multiplier, "sample-rate": plan.sample_rate,
                           "delta": ledger.delta, "private": int(plan.private)}
                if config.node.release_train_loss == "dp":
                    released = _release_metrics(ledger, spending.persist, config, model, data.train,
                                                f"{label} train loss", randomness)
                    if released is not None:
                        metrics["train-loss"] = released["loss"]
                state.record_round(server_round, trained=True, labels=config.data.labels or None,
                                   central=central_evaluation)
                if not released_later:
                    state.record_unreleased(-1)
                return TrainOutcome(STATUS_OK, trainable_state(model), n, ledger.epsilon(), metrics,
                                    ledger=ledger, noise=randomness.label)
        except BudgetExhaustedError as exc:
            ledger = getattr(exc, "ledger", None)
            state.record_round(server_round, trained=False, labels=config.data.labels or None)
            return TrainOutcome(STATUS_BUDGET_EXHAUSTED, epsilon=ledger.epsilon() if ledger else math.nan,
                                message=str(exc), ledger=ledger, noise=randomness.label)


def _check_unreleased(state: NodeState, config: Config) -> None:
    """A server that stops waiting before the node can finish (a round timeout of a
    millisecond, again and again) makes it spend budget for nothing. The node tolerates
    `node.max_unreleased_rounds` such rounds over its life, then refuses until its operator
    looks (and raises the limit, if the cause was innocent)."""
    limit = config.node.max_unreleased_rounds
    if state.unreleased_rounds() >= limit:
        raise PolicyRefusal("node.max_unreleased_rounds", f"this node has charged {state.unreleased_rounds()} rounds "
                                                          f"that released nothing, its limit (node.max_unreleased_rounds "
                                                          f"= {limit}); its operator must look before it trains again")


def evaluate_round(setup: NodeSetup, request: Mapping[str, Any], global_arrays: "dict[str, np.ndarray]",
                   server_round: int) -> EvaluateOutcome:
    """Evaluate the global adapter on the node's validation rows, if its policy releases
    evaluation metrics: charged, noised, at most `max_evaluations_per_round` per round the
    node trains, and none after a round the server declared centrally evaluated (the
    node's calibration left no room for them)."""
    return _guarded(lambda: _evaluate(setup, request, global_arrays, server_round), EvaluateOutcome)


def _evaluate(setup: NodeSetup, request, global_arrays, server_round: int) -> EvaluateOutcome:
    config = setup.policy.config_for(request)
    if config.node.release_evaluation == "off":
        raise PolicyRefusal("evaluation", "this node releases no evaluation metrics (node.release_evaluation = off)")
    state = NodeState(setup.state_dir)
    randomness = Randomness.from_setting(config.dp.noise_seed)
    label = f"round {server_round} evaluation"
    with state.locked():
        if state.info().get("central"):
            raise PolicyRefusal("evaluation", "the server declared this round centrally evaluated; the node planned "
                                              "no evaluation release for it")
        if state.evaluations() >= config.node.max_evaluations_per_round:
            raise PolicyRefusal("evaluation", f"{config.node.max_evaluations_per_round} evaluation(s) answered since "
                                              "this node last trained, the node's limit per round")
        model, data = _node_data(config, setup.table, validation=True)
        if data.val is None or len(data.val) == 0:
            raise PolicyRefusal("evaluation", "no validation rows")
        with spend(config, data.record_set, setup.policy.delta_for(config, data.records), label,
                   recorded_steps=state.recorded_steps, on_persist=state.record_charge) as spending:
            ledger = spending.ledger
            _load_global(model, global_arrays, config)
            released = _release_metrics(ledger, spending.persist, config, model, data.val, label, randomness)
            state.record_evaluation()
            if released is None:
                return EvaluateOutcome(STATUS_BUDGET_EXHAUSTED, epsilon=ledger.epsilon(), noise=randomness.label,
                                       message="budget exhausted: this evaluation release would pass the node's cap",
                                       ledger=ledger)
            return EvaluateOutcome(STATUS_OK, len(data.val), released, epsilon=ledger.epsilon(),
                                   noise=randomness.label, ledger=ledger)
