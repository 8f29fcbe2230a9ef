"""Flower ServerApp: moves messages, and hands the rest to `fedtune.federation.server.FederationServer`
and its strategy (`fedtune.federation.strategy`: cohorts, screening, aggregation, evaluation
averaging, user-level accounting, checkpoints, metrics).

Run config (`[tool.flwr.app.config]` or `--run-config`):
    config    path of the federation's fedtune TOML (required)
    run-dir   where checkpoints, metrics and the exported adapter go (default: runs/federation)
    log-to    experiment trackers, e.g. "tensorboard,mlflow" (`fedtune.reporting.tracking`; default none)
    any field, e.g. `training.rounds=10 dp.target-epsilon=3`, over the TOML's value; fields
              the nodes decide are refused (`fedtune.run_config`)
A restarted ServerApp with the same run-dir resumes after the last completed round.

What is not about messages lives in the core, which never imports Flower: the console
display (`fedtune.reporting.progress`), the memory probe (`fedtune.system.memory`), central
and zero-shot evaluation (`fedtune.federation.central_eval`), the export at the end
(`fedtune.reporting.export`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Collection

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.config import Config, secagg_bound
from fedtune.data.named import Table
from fedtune.errors import ConfigError
from fedtune.federation.central_eval import central_evaluator, write_zero_shot
from fedtune.federation.cohort import Cohort
from fedtune.federation.server import ClientReply, FederationServer, RoundFailedError, check_federation_config
from fedtune.federation.strategy import short_reason
from fedtune.models.adapter_io import adapter_state, trainable_keys
from fedtune.models.base import load_tokenizer, resolve_model_path
from fedtune.privacy.policy import DISTRIBUTED_FIELD, REQUEST_KEY, SECAGG_CLIP_FIELD, request_text, server_request
from fedtune.reporting.export import export_federation
from fedtune.reporting.progress import RoundProgress
from fedtune.reporting.run_report import SAMPLES_FILE, ZERO_SHOT_FILE, write_report
from fedtune.reporting.tracking import Trackers, config_params
from fedtune.run_config import RUN_DIR_KEY, config_from_run_config, log_to_of
from fedtune.system.atomic import append_jsonl, atomic_write_text
from fedtune.system.memory import resident_memory_mb
from fedtune.training.local import build_model
from server.secagg import secure_round


@dataclass(frozen=True)
class RunOptions:
    """What a caller may set besides the config and the run dir (`run_federation`'s keywords).

    Evaluation is central when there is a held-out table (`eval_table`, from a simulation's
    holdout, or the operator's `federation.central_eval_path`), federated otherwise. Each
    node may train for `node_time_share` of the round's timeout: deployed nodes run side by
    side (1.0); a simulation whose nodes queue for a few workers gives each its share, so a
    slow one cannot take the others' time. `log_to` names experiment trackers
    (`fedtune.reporting.tracking`) fed with each round's record, as metrics.jsonl is.
    `compute(fn)` runs the server's own model work (central evaluation) where the caller
    wants it: an in-process simulation runs it on the thread its clients train on
    (`simulations.in_process.ComputeSlots`).
    """

    log: Callable[[str], None] = print
    eval_table: Table | None = None
    node_time_share: float = 1.0
    log_to: tuple[str, ...] = ()
    compute: Callable | None = None


@dataclass
class _Run:
    """What every round of one federation reads, set up once by `_start`."""

    grid: Grid
    server: FederationServer
    run_dir: Path
    model: object  # the run's model: central evaluation loads each global adapter into it, the export the last
    central: Callable[[dict], dict] | None  # `fedtune.federation.central_eval.central_evaluator`; None: federated
    request: str  # what nodes may be asked (`fedtune.privacy.policy`): the same every round
    options: RunOptions
    progress: RoundProgress | None = None
    trackers: Trackers | None = None


@dataclass
class _Round:
    """One round in flight. `outcome` is what its record gets besides the replies (the
    evaluate, evaluation and extra arguments of `FederationServer.finish_*`)."""

    number: int
    cohort: Cohort
    started: float
    outcome: dict


def run_federation(grid: Grid, config: Config, run_dir: str | Path, **options) -> FederationServer:
    """Rounds until `training.rounds`, resuming from the run dir's checkpoint; then the global
    adapter is exported and the run report written. `options`: the fields of `RunOptions`."""
    options = RunOptions(**options)
    check_federation_config(config)
    run = _start(grid, config, Path(run_dir), options)
    for server_round in range(run.server.round_done + 1, config.training.rounds + 1):
        record = _play_round(run, server_round)
        _after_round(run, server_round, record)
    _finish(run)
    return run.server


def _start(grid: Grid, config: Config, run_dir: Path, options: RunOptions) -> _Run:
    """The run dir, the model, the server state (new, or resumed from the checkpoint), central
    evaluation and an instruct run's round-0 baseline, announced in the log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    model = build_model(config, tokenizer, len(config.data.labels) if config.task_is_classification else None)
    server = FederationServer.start_or_resume(config, run_dir, adapter_state(model), trainable_keys(model))
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    central = central_evaluator(config, model, tokenizer, options.eval_table, options.compute)
    run = _Run(grid, server, run_dir, model, central, request_text(server_request(config)), options)
    _announce(run)
    if central is not None and config.model.task == "instruct" and server.round_done == 0:  # never a trained adapter
        write_zero_shot(run_dir / ZERO_SHOT_FILE, central, server.adapter, options.log)
    run.trackers = Trackers(options.log_to, run_dir, config_params(config))
    run.progress = RoundProgress(config.training.rounds, server.round_done, options.log)
    return run


def _announce(run: _Run) -> None:
    """Before the first round: how the run is evaluated, where it resumes, how noise and cohorts are drawn."""
    log, central, server = run.options.log, run.central, run.server
    if central is not None:
        majority = central.majority_accuracy
        baseline = f", majority-class accuracy {majority:.4f}" if majority is not None else ""
        log(f"central evaluation on {central.size} held-out examples{baseline}")
    if server.round_done:
        log(f"resuming after round {server.round_done} from {run.run_dir / 'checkpoint.safetensors'}")
    log(f"noise: {server.randomness.label}; cohorts: {server.config.federation.cohort_sampling}")


def _round_config(run: _Run, server_round: int) -> dict:
    """The config every message of a round carries."""
    fed = run.server.config.federation
    return {"server-round": server_round, REQUEST_KEY: run.request,
            "evaluation": "central" if run.central else "federated",
            # when the server stops waiting, a slow node stops training and frees its slot
            # for the others (in simulation: its Ray actor); a duration, not a time, so that
            # the machines' clocks need not agree
            "round-timeout": float(fed.round_timeout) * run.options.node_time_share,
            SECAGG_CLIP_FIELD: secagg_bound(fed)}


def _play_round(run: _Run, server_round: int) -> dict:
    """One round: wait for nodes, draw the cohort, train, aggregate, evaluate; its record. A
    round that fails is recorded in failures.jsonl before it stops the run."""
    started = time.perf_counter()
    fed = run.server.config.federation
    with failures_recorded(run.run_dir, server_round, run.options.log):
        nodes = _wait_for_nodes(run.grid, fed.min_clients, fed.round_timeout, server_round, run.options.log)
        cohort = run.server.strategy.cohort(nodes, server_round)
        payload = _arrays_record(run.server.payload(server_round))
        evaluate = run.central if run.central is not None else partial(_federated_evaluation, run,
                                                                         list(cohort.sampled), server_round)
        outcome = dict(evaluate=evaluate, evaluation="central" if run.central else "federated",
                       extra={"resident_mb": resident_memory_mb()})
        return _train_and_aggregate(run, _Round(server_round, cohort, started, outcome), payload)


def _after_round(run: _Run, server_round: int, record: dict) -> None:
    """A round's record goes to the console, the trackers and (instruct) the samples file."""
    run.progress.update(record)
    run.trackers.log(record)
    if run.central is not None and run.central.samples:
        append_jsonl(run.run_dir / SAMPLES_FILE, {"round": server_round, "samples": run.central.samples})


def _finish(run: _Run) -> None:
    """After the last round: the global adapter exported, the run report written."""
    run.progress.close()
    run.trackers.close()
    export_federation(run.model, run.server, run.run_dir / "adapter")
    run.options.log(f"exported the global adapter to {run.run_dir / 'adapter'}")
    written = write_report(run.run_dir)
    run.options.log(f"wrote {', '.join(p.name for p in written)} in {run.run_dir}")


def _arrays_record(state) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def _reply(message: Message) -> ClientReply:
    node = message.metadata.src_node_id
    if message.has_error():
        return ClientReply(node, "error", message=f"client error: {message.error.reason}")
    content = message.content
    metrics = dict(content["metrics"]) if "metrics" in content else {}
    status = content["status"] if "status" in content else {}
    arrays = content["arrays"] if "arrays" in content else None
    try:
        privacy = json.loads(str(status["ledger"])) if "ledger" in status else None
    except json.JSONDecodeError:
        privacy = None
    return ClientReply(
        node_id=node,
        status=str(status.get("status", "error")),
        arrays={k: a.numpy() for k, a in arrays.items()} if arrays is not None else None,
        num_examples=int(metrics.pop("num-examples", 0)),
        epsilon=float(metrics.pop("epsilon", math.nan)),
        metrics=metrics,
        message=str(status.get("message", "")),
        nbytes=arrays.count_bytes() if arrays is not None else 0,
        privacy=privacy if isinstance(privacy, dict) else None,
        noise=str(status.get("noise", "")),
    )


POLL_FIRST, POLL_MAX = 0.01, 0.05  # seconds between pulls: a reply waits at most POLL_MAX to be seen


def send_and_watch(grid: Grid, messages: list[Message], timeout: float, on_reply) -> list[Message]:
    """Flower's send_and_receive, reporting each reply as it lands (`on_reply(done, total)`),
    so a long round shows its progress; replies not back by `timeout` are left out."""
    pending = {i for i in grid.push_messages(messages) if i}
    total, replies = len(pending), []
    deadline = time.monotonic() + timeout
    wait = POLL_FIRST
    while pending and time.monotonic() < deadline:
        arrived = list(grid.pull_messages(list(pending)))
        replies += arrived
        pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
        if arrived:
            on_reply(len(replies), total)
        # poll soon after a reply (the next often follows), back off while nodes are busy
        wait = POLL_FIRST if arrived else min(wait * 2, POLL_MAX)
        if pending:
            time.sleep(wait)
    return replies


def _send(run: _Run, node_ids: list[int], message_type: str, arrays: ArrayRecord, server_round: int) -> list[Message]:
    """A round's message to each node; the replies back before the round's timeout."""
    record = ConfigRecord(_round_config(run, server_round))
    messages = [Message(content=RecordDict({"arrays": arrays, "config": record}), dst_node_id=n,
                        message_type=message_type) for n in node_ids]
    what = "trained" if message_type == MessageType.TRAIN else "evaluated"
    return send_and_watch(run.grid, messages, run.server.config.federation.round_timeout,
                          partial(_show_replies, run.progress, server_round, what))


def _show_replies(progress: RoundProgress, server_round: int, what: str, done: int, total: int) -> None:
    progress.inside(f"round {server_round}: {done}/{total} nodes {what}")


def _federated_evaluation(run: _Run, sampled: list[int], server_round: int, adapter) -> dict:
    """The cohort scores a new global adapter on its own validation splits; the average."""
    answers = [_reply(m) for m in _send(run, sampled, MessageType.EVALUATE, _arrays_record(adapter), server_round)]
    for answer in answers:
        run.server.observe(answer)  # an evaluation release is charged: its epsilon is the node's latest
    return run.server.strategy.average_evaluations(answers)


def _train_and_aggregate(run: _Run, this: _Round, payload: ArrayRecord) -> dict:
    """One round's training and aggregation: plain messages, or a SecAgg+ round in which
    the server only ever holds the cohort's masked sum."""
    bytes_sent = payload.count_bytes() * len(this.cohort.sampled)
    config = run.server.config
    if not config.federation.secure_aggregation:
        return _plain_round(run, this, payload, bytes_sent)
    if len(this.cohort.sampled) < 3:  # the protocol needs 3 (a mean of 2 hides nothing from the two)
        return _thin_secure_round(run, this)
    if config.dp.mode == "distributed":
        return _distributed_round(run, this, bytes_sent)
    return _secure_round(run, this, bytes_sent)


def _plain_round(run: _Run, this: _Round, payload: ArrayRecord, bytes_sent: int) -> dict:
    """The adapter to each node, its update back; a node silent past the timeout is an error."""
    sampled = list(this.cohort.sampled)
    replies = [_reply(m) for m in _send(run, sampled, MessageType.TRAIN, payload, this.number)]
    answered = {r.node_id for r in replies}
    replies += [ClientReply(n, "error", message="no reply before round_timeout") for n in sampled if n not in answered]
    return run.server.finish_round(this.number, replies, this.started, bytes_sent, cohort=this.cohort, **this.outcome)


def _thin_secure_round(run: _Run, this: _Round) -> dict:
    """A SecAgg+ cohort too small for the protocol: nothing is sent, the round fails, unless
    user-level DP is on: a thin draw still releases the round's noise."""
    server = run.server
    zero = {k: np.zeros_like(server.adapter[k], dtype=np.float64) for k in server.travel_keys}
    noise_only = zero if server.config.federation.user_dp_noise > 0 else None
    reason = f"secure aggregation needs 3 or more nodes, the cohort drew {len(this.cohort.sampled)}"
    return server.finish_secure_round(this.number, noise_only, [], this.cohort, this.started, 0, reason,
                                      **this.outcome)


def _secure_round(run: _Run, this: _Round, bytes_sent: int) -> dict:
    """A SecAgg+ round: the server holds the mean of the contributors' updates, no one update."""
    server = run.server
    secure = secure_round(run.grid, list(this.cohort.sampled), server.payload(this.number), server.travel_keys,
                          _round_config(run, this.number), server.config.federation, this.number)
    replies = [_released(node, secure.metrics[node]) for node in secure.contributors]
    this.outcome["extra"] = {**this.outcome.get("extra", {}),
                             "secure_failures": [short_reason(f) for f in secure.failures]}
    return server.finish_secure_round(this.number, secure.mean_update, replies, this.cohort, this.started, bytes_sent,
                                      secure.reason, **this.outcome)


def _distributed_round(run: _Run, this: _Round, bytes_sent: int) -> dict:
    """A distributed-DP round: SecAgg+ carries each node's integer vector (its part of one
    DP-SGD step, with its noise share); the server decodes the modular sum and steps."""
    server, config = run.server, run.server.config
    announced = server.distributed_announcement(this.number, this.cohort)
    fit_config = {**_round_config(run, this.number), DISTRIBUTED_FIELD: json.dumps(announced)}
    secure = secure_round(run.grid, list(this.cohort.sampled), server.payload(this.number), announced["keys"],
                          fit_config, config.federation, this.number, integer_bits=config.dp.distributed_bits)
    replies = [_released(node, secure.metrics[node]) for node in secure.contributors]
    noisy_sum, decoded = server.decode_distributed(secure.modular_sum, announced, len(replies))
    extra = {"secure_failures": [short_reason(f) for f in secure.failures], **decoded}
    this.outcome["extra"] = {**this.outcome.get("extra", {}), **extra}
    return server.finish_distributed_round(this.number, noisy_sum, replies, this.cohort, this.started, bytes_sent,
                                           secure.reason, **this.outcome)


@contextmanager
def failures_recorded(run_dir: Path, server_round: int, log):
    """A round that fails (too few valid replies, a secure aggregation below its threshold)
    is recorded with its reason in failures.jsonl before the run stops."""
    try:
        yield
    except RoundFailedError as exc:
        append_jsonl(run_dir / "failures.jsonl", {"round": server_round, "time": time.time(), "reason": str(exc)})
        log(f"round {server_round} FAILED: {exc}")
        raise


def _released(node: int, metrics: dict) -> ClientReply:
    """A SecAgg+ contributor's released scalars (its update stays inside the masked sum)."""
    reply = dict(metrics)
    try:
        privacy = json.loads(str(reply.pop("ledger"))) if "ledger" in reply else None
    except json.JSONDecodeError:
        privacy = None
    return ClientReply(node, str(reply.pop("status", "ok")), None, int(reply.pop("num-examples", 0)),
                       float(reply.pop("epsilon", math.nan)),
                       {k: v for k, v in reply.items() if not isinstance(v, str)},
                       str(reply.get("message", "")), privacy=privacy if isinstance(privacy, dict) else None,
                       noise=str(reply.get("noise", "")))


NODES_HINT_AFTER = 10.0  # seconds of waiting before the server says what it waits for


def _wait_for_nodes(grid: Grid, needed: int, timeout: float, server_round: int, log) -> Collection[int]:
    """The connected nodes, once `needed` (federation.min_clients) are; said once after a few
    seconds of waiting, and a failed round (before anything is sent) at the round's timeout.
    Flower's local simulation runtime connects all its virtual nodes at once, so a wait there
    means too few of them (Flower's default is 2)."""
    started = time.monotonic()
    said = False
    while True:
        nodes = grid.get_node_ids()  # a set; a range from a lazily registered simulated population
        if len(nodes) >= needed:
            return nodes
        waited = time.monotonic() - started
        if waited > timeout:
            raise RoundFailedError(f"round {server_round}: {len(nodes)} node(s) connected in {timeout:.0f} s, "
                                   f"federation.min_clients = {needed}")
        if not said and waited > NODES_HINT_AFTER:
            log(f"waiting for nodes: {len(nodes)} connected, federation.min_clients = {needed} (on Flower's local "
                f"simulation runtime, start more: flwr run . --federation-config num-supernodes={max(needed, 5)})")
            said = True
        time.sleep(1.0)


def make_server_app(config: Config, run_dir: str | Path, **options) -> ServerApp:
    """A ServerApp bound to a config object (simulation harness, tests); `options`: `RunOptions`' fields."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir, **options)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .` (the local simulation runtime, `clients.virtual_node`) or
    `flwr run . FEDERATION` (a deployment): the federation pyproject.toml's
    [tool.flwr.app.config] describes; `config="/abs/fed.toml"` names a fedtune TOML over
    it, and `--run-config` values win over both (`fedtune.run_config.config_from_run_config`)."""
    run_config = context.run_config
    config = config_from_run_config(run_config, typed=grid.run.override_config.keys())
    run_federation(grid, config, run_config.get(RUN_DIR_KEY) or "runs/federation", log_to=log_to_of(run_config))
