"""Flower ClientApp: Message <-> `clients.node` calls, nothing else.

What the node enforces comes from its own side, never from a message: in deployment its
SuperNode's node config (set by the node's operator through `fedtune client`; a server
cannot set node config):

    state-dir     where the node keeps node.json and its lock (required)
    policy-file   STATE_DIR/policy.toml, the node's resolved policy (owner-only), whose keys are
                  the `fedtune client` flags' names: data (required), max-epsilon (required),
                  ... (`fedtune.privacy.policy.NODE_CONFIG_KEYS`)

Instead of policy-file, node config may hold the policy's keys themselves (a test, a
hand-started SuperNode); `fedtune client` never puts them there, as its command line is
visible to every local user.

The server's message carries a request (`fedtune-request`, TOML) that the node checks
against that policy (`fedtune.privacy.policy.NodePolicy.config_for`). Replies carry exactly the
values listed in `fedtune.privacy.releases`. The simulation harness builds its own app with
`make_client_app`, injecting each virtual client's policy, state dir and partition; this
module never imports it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.node import (STATUS_NODE_ERROR, STATUS_POLICY_REFUSED, EvaluateOutcome, NodeSetup, NodeState,
                          TrainOutcome, evaluate_round, train_round)
from clients.distributed_node import Announced, distributed_round
from clients.secagg import is_secagg, secagg_train
from clients.virtual_node import is_virtual, virtual_setup
from fedtune.errors import ConfigError, FedtuneError
from fedtune.privacy.policy import DISTRIBUTED_FIELD, REQUEST_KEY, STATE_DIR_KEY, NodePolicy, parse_request
from fedtune.privacy.releases import EVALUATE_RELEASES, TRAIN_RELEASES, checked



def deployment_setup(context: Context) -> NodeSetup:
    """A deployed node's setup from its own node config. A node without a cap refuses. A
    virtual node of Flower's simulation runtime plays a demonstration site (`clients.virtual_node`).

    Called for every message, so the policy file is read again for every message, with the
    same validation (`NodePolicy.from_node_config`; its errors name the file). Chosen over a
    cache because it behaves one way however Flower runs the app: in Flower's default
    subprocess isolation each message is handled by a new `flwr-clientapp` process, so a
    per-process cache would be a per-message read there and a cache for the SuperNode's life
    in process isolation. A file changed after start therefore rules from the next message
    on; one that no longer validates makes the node answer node-error (it trains and releases
    nothing: it fails closed). A hand edit skips `fedtune client`'s start checks (files exist,
    rows within the declared labels) and is overwritten at its next start: change the policy
    by restarting `fedtune client` with the new --policy file or flags."""
    node = dict(context.node_config)
    if is_virtual(node):  # `flwr run .` on Flower's local simulation runtime
        return virtual_setup(node, context.run_id)
    if not node.get(STATE_DIR_KEY):
        raise ConfigError("node config: state-dir is required: the folder that keeps this node's state and lock "
                          "(start nodes with `fedtune client`)")
    return NodeSetup(NodePolicy.from_node_config(node), Path(str(node[STATE_DIR_KEY])))


def _arrays(msg: Message) -> dict:
    return {key: array.numpy() for key, array in msg.content["arrays"].items()}


def _record(values: dict) -> RecordDict:
    """Released values -> Flower records: tensors, text, numbers."""
    content = RecordDict()
    arrays = values.pop("arrays", None)
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    content["status"] = ConfigRecord({k: v for k, v in values.items() if isinstance(v, str)})
    content["metrics"] = MetricRecord({k: (int(v) if k == "num-examples" else float(v))
                                       for k, v in values.items() if not isinstance(v, str)})
    return content


def _common(outcome: TrainOutcome | EvaluateOutcome) -> dict:
    values = {"status": outcome.status, "message": outcome.message, "noise": outcome.noise,
              "num-examples": outcome.num_examples, "epsilon": outcome.epsilon, **outcome.metrics}
    if outcome.ledger is not None:  # mechanism parameters only: anyone can recompute the epsilon
        values["ledger"] = json.dumps({"accountant": outcome.ledger.accountant, "delta": outcome.ledger.delta,
                                       "history": outcome.ledger.history,
                                       **_distributed_release(outcome.ledger),
                                       "non_private_steps": outcome.ledger.non_private_steps})
    return values


def _distributed_release(ledger) -> dict:
    """A ledger's distributed steps and what recomputes them under collusion: the node's t
    and its share's standard deviation (its policy and the announced parameters: no row
    enters them)."""
    if not ledger.distributed:
        return {}
    return {"distributed": ledger.distributed, **ledger.distributed_parameters()}


def train_release(outcome: TrainOutcome) -> dict:
    """The values a training reply releases (checked against `fedtune.privacy.releases`)."""
    values = _common(outcome)
    if outcome.arrays is not None:
        values["arrays"] = outcome.arrays
    return checked(values, TRAIN_RELEASES, "train")


def evaluate_release(outcome: EvaluateOutcome) -> dict:
    return checked(_common(outcome), EVALUATE_RELEASES, "evaluate")


MISCONFIGURED = "node-error: this node is misconfigured (see the node's log)"


def _outcome(setup_for, msg: Message, context: Context, work, outcome_type):
    """Run `work(setup, request, config_record)` for a message, or the refusal it earns:
    a node that cannot set itself up (node-error), a request that is not TOML (policy-refused)."""
    try:
        setup = setup_for(context)
    except FedtuneError as exc:  # the detail names the node's files (its data's path): its log only
        print(f"fedtune node: {exc}", file=sys.stderr, flush=True)
        return outcome_type(STATUS_NODE_ERROR, message=MISCONFIGURED), {}
    try:
        record = msg.content["config"]
        request = parse_request(str(record[REQUEST_KEY]))
        int(record["server-round"]), _arrays(msg)  # a message without them is malformed
    except FedtuneError as exc:
        return outcome_type(STATUS_POLICY_REFUSED, message=str(exc)), {}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return outcome_type(STATUS_POLICY_REFUSED, message=f"policy-refused: message: malformed ({type(exc).__name__})"), {}
    return work(setup, request, record), record


def _secure_fit(setup_for, context: Context, global_arrays: dict, fit_config: dict) -> TrainOutcome:
    """The node's round inside a SecAgg+ round: the same checks, charge and training."""
    try:
        setup = setup_for(context)
        request = parse_request(str(fit_config[REQUEST_KEY]))
        timeout = float(fit_config.get("round-timeout", 0.0))
        return train_round(setup, request, global_arrays, int(fit_config["server-round"]),
                           str(fit_config.get("evaluation", "federated")) == "central",
                           time.time() + timeout if timeout > 0 else 0.0, released_later=True)
    except (FedtuneError, KeyError, TypeError, ValueError) as exc:
        return TrainOutcome(STATUS_POLICY_REFUSED, message=f"policy-refused: message: {type(exc).__name__}")


def _distributed_fit(setup_for, context: Context, global_arrays: dict, fit_config: dict, protocol):
    """A distributed-DP round inside SecAgg+: the node's checks, charge and encoded step."""
    try:
        setup = setup_for(context)
        request = parse_request(str(fit_config[REQUEST_KEY]))
        announced = Announced.from_dict(json.loads(str(fit_config[DISTRIBUTED_FIELD])))
        timeout = float(fit_config.get("round-timeout", 0.0))
    except (FedtuneError, KeyError, TypeError, ValueError) as exc:
        return TrainOutcome(STATUS_POLICY_REFUSED, message=f"policy-refused: message: {type(exc).__name__}: {exc}"), None
    return distributed_round(setup, request, global_arrays, int(fit_config["server-round"]), announced, protocol,
                             str(fit_config.get("evaluation", "federated")) == "central",
                             time.time() + timeout if timeout > 0 else 0.0)


def _released(setup_for, context: Context) -> None:
    """The node answered a SecAgg+ unmask: its round's charge released something (the sum),
    so it no longer counts against node.max_unreleased_rounds."""
    state = NodeState(setup_for(context).state_dir)
    with state.locked():
        state.record_unreleased(-1)


def make_client_app(setup_for: Callable[[Context], NodeSetup]) -> ClientApp:
    """A ClientApp whose node setup (policy, state dir, rows) comes from `setup_for`."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if is_secagg(msg):
            return secagg_train(msg, context, lambda arrays, fit_config: _secure_fit(setup_for, context, arrays, fit_config),
                                train_release, lambda: setup_for(context).policy.own.node.secagg_max_clip,
                                lambda arrays, fit_config, protocol: _distributed_fit(setup_for, context, arrays,
                                                                                      fit_config, protocol),
                                lambda: _released(setup_for, context))

        def work(setup, request, record):
            if setup.policy.own.node.require_secure_aggregation:
                return TrainOutcome(STATUS_POLICY_REFUSED, message="policy-refused: federation.secure_aggregation: this "
                                    "node trains only in SecAgg+ rounds (its update never leaves unmasked)")
            central = str(record.get("evaluation", "federated")) == "central"  # train on every row
            timeout = float(record.get("round-timeout", 0.0))  # the server stops waiting then: so does the node
            deadline = time.time() + timeout if timeout > 0 else 0.0
            return train_round(setup, request, _arrays(msg), int(record["server-round"]), central, deadline)

        outcome, record = _outcome(setup_for, msg, context, work, TrainOutcome)
        if outcome.status != "ok":
            print(f"fedtune node: round {record.get('server-round')}: {outcome.message or outcome.status}",
                  file=sys.stderr, flush=True)
        return Message(content=_record(train_release(outcome)), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        def work(setup, request, record):
            return evaluate_round(setup, request, _arrays(msg), int(record["server-round"]))

        outcome, _ = _outcome(setup_for, msg, context, work, EvaluateOutcome)
        return Message(content=_record(evaluate_release(outcome)), reply_to=msg)

    return app


app = make_client_app(deployment_setup)
