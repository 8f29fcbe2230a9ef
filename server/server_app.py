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
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.models.adapter_io import adapter_state, load_state, save_adapter_dir, trainable_keys
from fedtune.system.atomic import append_jsonl, atomic_write_text
from fedtune.federation.central_eval import CentralEvaluator, central_table
from fedtune.config import Config, secagg_bound
from fedtune.data.tables import LabelMap
from fedtune.errors import ConfigError
from fedtune.reporting.export import federation_card
from fedtune.federation.server import ClientReply, FederationServer, RoundFailedError
from fedtune.training.local import build_model
from fedtune.models.base import load_tokenizer, resolve_model_path
from fedtune.training.model_card import base_model_reference
from fedtune.privacy import ddgauss
from fedtune.privacy.policy import DISTRIBUTED_FIELD, REQUEST_KEY, SECAGG_CLIP_FIELD, request_text, server_request
from fedtune.run_config import CONFIG_KEY, RUN_DIR_KEY, config_from_run_config, log_to_of
from fedtune.reporting.run_report import SAMPLES_FILE, ZERO_SHOT_FILE, write_report
from fedtune.federation.strategy import short_reason
from fedtune.reporting.tracking import Trackers, config_params
from server.secagg import secure_round



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


POLL_FIRST, POLL_MAX = 0.01, 0.1  # seconds between pulls: a reply waits at most POLL_MAX to be seen


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


def _train_and_aggregate(grid: Grid, server: FederationServer, server_round: int, cohort, payload: ArrayRecord,
                         fit_config: dict, send, started: float, outcome: dict) -> dict:
    """One round's training and aggregation: plain messages, or a SecAgg+ round in which
    the server only ever holds the cohort's masked sum."""
    sampled = list(cohort.sampled)
    bytes_sent = payload.count_bytes() * len(sampled)
    fed = server.config.federation
    if fed.secure_aggregation:
        if len(sampled) < 3:  # the protocol needs 3 (a mean of 2 hides nothing from the two)
            zero = {k: np.zeros_like(server.adapter[k], dtype=np.float64) for k in server.travel_keys}
            noise_only = zero if fed.user_dp_noise > 0 else None  # user-level DP: a thin draw still releases noise
            return server.finish_secure_round(server_round, noise_only, [], cohort, started, 0,
                                              f"secure aggregation needs 3 or more nodes, the cohort drew {len(sampled)}",
                                              **outcome)
        if server.config.dp.mode == "distributed":
            return _distributed_round(grid, server, server_round, cohort, fit_config, started, bytes_sent, outcome)
        secure = secure_round(grid, sampled, server.payload(server_round), server.travel_keys, fit_config, fed,
                              server_round)
        replies = [_released(node, secure.metrics[node]) for node in secure.contributors]
        outcome["extra"] = {**outcome.get("extra", {}), "secure_failures": [short_reason(f) for f in secure.failures]}
        return server.finish_secure_round(server_round, secure.mean_update, replies, cohort, started, bytes_sent,
                                          secure.reason, **outcome)
    replies = [_reply(m) for m in send(sampled, MessageType.TRAIN, payload, server_round)]
    answered = {r.node_id for r in replies}
    replies += [ClientReply(n, "error", message="no reply before round_timeout") for n in sampled if n not in answered]
    return server.finish_round(server_round, replies, started, bytes_sent, cohort=cohort, **outcome)


def check_distributed(config: Config) -> None:
    """A distributed-DP federation's settings, checked before anything runs: the noise goes on
    inside secure aggregation, so that must be on; user-level noise and a fixed noise
    multiplier are the server's to set right."""
    if config.dp.mode != "distributed":
        return
    if not config.federation.secure_aggregation:
        raise ConfigError("dp.mode = 'distributed' needs federation.secure_aggregation = true: each node adds only a "
                          "share of the noise, which is enough only inside the masked sum")
    if not config.dp.enabled:
        raise ConfigError("dp.mode = 'distributed' needs dp.enabled = true")
    if not config.dp.noise_multiplier > 0:
        raise ConfigError("dp.noise_multiplier: set the noise multiplier of a distributed-DP federation (every node adds "
                          "its share of it; `fedtune simulate` calibrates it from dp.target_epsilon)")
    if config.federation.user_dp_noise > 0:
        raise ConfigError("federation.user_dp_noise: user-level noise and distributed DP are separate modes; choose one")


def _distributed_round(grid: Grid, server: FederationServer, server_round: int, cohort, fit_config: dict,
                       started: float, bytes_sent: int, outcome: dict) -> dict:
    """A distributed-DP round: SecAgg+ carries each node's integer vector (its part of one
    DP-SGD step, with its noise share); the server decodes the modular sum and steps."""
    config = server.config
    keys = list(server.travel_keys)
    dim = int(sum(np.size(server.adapter[k]) for k in keys))
    bits, clip = config.dp.distributed_bits, config.dp.max_grad_norm
    granularity = ddgauss.choose_granularity(clip, bits, dim, len(cohort.sampled) * config.training.batch_size,
                                             config.dp.noise_multiplier)
    seed = int(server.randomness.numpy_generator("server", "rotation", server_round).integers(2 ** 62))
    announced = {"granularity": granularity, "rotation_seed": seed, "keys": keys}
    fit_config = {**fit_config, DISTRIBUTED_FIELD: json.dumps(announced)}
    secure = secure_round(grid, list(cohort.sampled), server.payload(server_round), keys, fit_config,
                          config.federation, server_round, integer_bits=bits)
    replies = [_released(node, secure.metrics[node]) for node in secure.contributors]
    noisy_sum = None
    extra = {"secure_failures": [short_reason(f) for f in secure.failures]}
    if secure.modular_sum is not None:
        extra["wrapped_share"] = ddgauss.wrapped_share(secure.modular_sum, bits)
        spec = ddgauss.DDGaussSpec(clip=clip, granularity=granularity, bits=bits, contributors=max(1, len(replies)),
                                   noise_multiplier=config.dp.noise_multiplier, dim=dim)
        noisy_sum = ddgauss.decode(secure.modular_sum, spec, seed)
    outcome["extra"] = {**outcome.get("extra", {}), **extra}
    return server.finish_distributed_round(server_round, noisy_sum, replies, cohort, started, bytes_sent,
                                           secure.reason, **outcome)


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
                       float(reply.pop("epsilon", math.nan)), {k: v for k, v in reply.items() if not isinstance(v, str)},
                       str(reply.get("message", "")), privacy=privacy if isinstance(privacy, dict) else None,
                       noise=str(reply.get("noise", "")))


def _wait_for_nodes(grid: Grid, needed: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= needed or time.monotonic() > deadline:
            return nodes
        time.sleep(1.0)


def run_federation(grid: Grid, config: Config, run_dir: str | Path, log=print, eval_table=None,
                   node_time_share: float = 1.0, log_to: tuple[str, ...] = (), compute=None) -> FederationServer:
    """Rounds until `training.rounds`, resuming from the run dir's checkpoint.

    Evaluation is central when there is a held-out table (`eval_table`, from a simulation's
    holdout, or the operator's `federation.central_eval_path`), federated otherwise. Each
    node may train for `node_time_share` of the round's timeout: deployed nodes run side by
    side (1.0); a simulation whose nodes queue for a few workers gives each its share, so a
    slow one cannot take the others' time. `log_to` names experiment trackers
    (`fedtune.reporting.tracking`) fed with each round's record, as metrics.jsonl is. `compute(fn)`
    runs the server's own model work (central evaluation) where the caller wants it: an
    in-process simulation runs it on the thread its clients train on
    (`simulations.in_process.ComputeThread`).
    """
    if config.task_is_classification and not config.data.labels:
        raise ConfigError("data.labels: a federation must fix its label set (e.g. labels = [\"neg\", \"pos\"]) "
                          "so that every node maps labels to the same ids")
    check_distributed(config)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fed = config.federation
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    num_labels = len(config.data.labels) if config.task_is_classification else None
    model = build_model(config, tokenizer, num_labels)
    server = FederationServer.start_or_resume(config, run_dir, adapter_state(model), trainable_keys(model))
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    request = request_text(server_request(config))  # what nodes may be asked: the same every round
    eval_table = eval_table if eval_table is not None else central_table(config)
    central = CentralEvaluator(config, model, tokenizer, eval_table) if eval_table is not None else None
    if central is not None and compute is not None:
        central = _ComputedElsewhere(central, compute)
    if central is not None:
        baseline = f", majority-class accuracy {central.majority_accuracy:.4f}" if central.majority_accuracy is not None else ""
        log(f"central evaluation on {central.size} held-out examples{baseline}")
    if server.round_done:
        log(f"resuming after round {server.round_done} from {run_dir / 'checkpoint.safetensors'}")

    log(f"noise: {server.randomness.label}; cohorts: {fed.cohort_sampling}")
    if central is not None and config.model.task == "instruct" and server.round_done == 0:  # never a trained adapter
        write_zero_shot(run_dir, central, server.adapter, log)

    def fit_config(server_round) -> dict:
        return {"server-round": server_round, REQUEST_KEY: request,
                "evaluation": "central" if central else "federated",
                # when the server stops waiting, a slow node stops training and frees its slot
                # for the others (in simulation: its Ray actor); a duration, not a time, so that
                # the machines' clocks need not agree
                "round-timeout": float(fed.round_timeout) * node_time_share,
                SECAGG_CLIP_FIELD: secagg_bound(fed)}

    def send(node_ids, message_type, arrays, server_round):
        record = ConfigRecord(fit_config(server_round))
        messages = [Message(content=RecordDict({"arrays": arrays, "config": record}), dst_node_id=n,
                            message_type=message_type) for n in node_ids]
        what = "trained" if message_type == MessageType.TRAIN else "evaluated"
        return send_and_watch(grid, messages, fed.round_timeout,
                              lambda done, total: progress.inside(f"round {server_round}: {done}/{total} nodes {what}"))

    trackers = Trackers(log_to, run_dir, config_params(config))
    progress = RoundProgress(config.training.rounds, server.round_done, log)
    for server_round in range(server.round_done + 1, config.training.rounds + 1):
        started = time.perf_counter()
        nodes = _wait_for_nodes(grid, fed.min_clients, timeout=fed.round_timeout)
        cohort = server.strategy.cohort([int(n) for n in nodes], server_round)
        sampled = list(cohort.sampled)
        payload = _arrays_record(server.payload(server_round))

        def federated_evaluation(adapter):
            answers = [_reply(m) for m in send(sampled, MessageType.EVALUATE, _arrays_record(adapter), server_round)]
            for answer in answers:
                server.observe(answer)  # an evaluation release is charged: its epsilon is the node's latest
            return server.strategy.average_evaluations(answers)

        outcome = dict(evaluate=central or federated_evaluation, evaluation="central" if central else "federated",
                       extra={"resident_mb": resident_memory_mb()})
        with failures_recorded(run_dir, server_round, log):
            record = _train_and_aggregate(grid, server, server_round, cohort, payload, fit_config(server_round), send,
                                          started, outcome)
        progress.update(record)
        trackers.log(record)
        if central is not None and central.samples:
            append_jsonl(run_dir / SAMPLES_FILE, {"round": server_round, "samples": central.samples})
    progress.close()
    trackers.close()

    load_state(model, server.adapter)
    meta = {"node_epsilon": server.node_epsilon, "node_privacy": server.node_privacy, **server.strategy.state_meta()}
    extra = {"README.md": federation_card(config, meta, server.round_done)}
    if num_labels:
        extra["label_map.json"] = json.dumps(LabelMap.from_config(config.data.labels).to_dict(), indent=2)
    save_adapter_dir(model, run_dir / "adapter", extra, base_reference=base_model_reference(config))
    log(f"exported the global adapter to {run_dir / 'adapter'}")
    written = write_report(run_dir)
    log(f"wrote {', '.join(p.name for p in written)} in {run_dir}")
    return server


class _ComputedElsewhere:
    """A central evaluator whose calls run through `compute` (its attributes pass through)."""

    def __init__(self, evaluator: CentralEvaluator, compute):
        self._evaluator, self._compute = evaluator, compute

    def __call__(self, adapter) -> dict:
        return self._compute(lambda: self._evaluator(adapter))

    def __getattr__(self, name):
        return getattr(self._evaluator, name)


def write_zero_shot(run_dir: Path, central, adapter, log) -> None:
    """Round 0 of an instruct run: the initial adapter scored like every later round. For
    LoRA (B = 0) and IA3 (all scales 1) that is exactly the base model: the zero-shot
    baseline the federation has to beat."""
    started = time.perf_counter()
    scores = central(adapter)
    record = {"round": 0, **scores, "seconds": round(time.perf_counter() - started, 1), "samples": central.samples,
              "held_out": central.summary}
    atomic_write_text(run_dir / ZERO_SHOT_FILE, json.dumps(record, indent=2) + "\n")
    log(f"round 0 (initial adapter, before any training): accuracy {scores['accuracy']:.4f}, loss {scores['loss']:.4f}")


def resident_memory_mb() -> float:
    """Resident memory of this process and its descendants (in simulation: the Ray
    workers that host the virtual clients), so growth across rounds is visible."""
    import psutil

    total = 0
    for process in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            total += process.memory_info().rss
        except psutil.Error:  # a worker that exited meanwhile
            pass
    return round(total / 2**20, 1)


class RoundProgress:
    """Live display: a bar over rounds with accuracy, loss and epsilon, plus one line a round."""

    def __init__(self, rounds: int, done: int, log):
        from tqdm.auto import tqdm

        self.log = log
        self.bar = tqdm(total=rounds, initial=done, desc="rounds", unit="round", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        self.bar.set_description_str("rounds", refresh=False)
        self.bar.update(1)
        shown = {k: f"{record[k]:.4f}" for k in ("accuracy", "loss") if isinstance(record.get(k), float)}
        if record.get("epsilon_max") is not None:
            eps = record["epsilon_max"]
            shown["eps"] = eps if isinstance(eps, str) else f"{eps:.3f}"
        self.bar.set_postfix(shown, refresh=True)
        self.bar.clear()
        self.log(_round_line(record))
        self.bar.refresh()

    def inside(self, text: str) -> None:
        """Progress within a round: shown on the bar, not logged."""
        self.bar.set_description_str(text, refresh=True)

    def close(self) -> None:
        self.bar.close()


def _round_line(record: dict) -> str:
    parts = [f"round {record['round']}"]
    for key in ("accuracy", "loss", "perplexity"):
        if isinstance(record.get(key), float):
            parts.append(f"{key} {record[key]:.4f}")
    if record.get("epsilon_max") is not None:
        parts.append(f"epsilon max {record['epsilon_max'] if isinstance(record['epsilon_max'], str) else round(record['epsilon_max'], 3)}")
    if record["clients_rejected"] or record["clients_refused"]:
        parts.append(f"rejected {len(record['clients_rejected'])}, refused {len(record['clients_refused'])}")
    parts.append(f"{record['seconds']:.1f}s")
    return ", ".join(parts)


def make_server_app(config: Config, run_dir: str | Path, eval_table=None, log=print,
                    node_time_share: float = 1.0, log_to: tuple[str, ...] = (), compute=None) -> ServerApp:
    """A ServerApp bound to a config object (simulation harness, tests)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, run_dir, log=log, eval_table=eval_table, node_time_share=node_time_share,
                       log_to=log_to, compute=compute)

    return app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run . FEDERATION --run-config 'config="..." run-dir="..."'`: a deployment.
    Simulations run through `fedtune simulate` or `flwr run simulations/flwr_app`."""
    run_config = context.run_config
    if not run_config.get(CONFIG_KEY):
        raise ConfigError("run config: config is required: the federation's TOML (flwr run . FEDERATION --run-config "
                          "'config=\"/abs/federation.toml\" run-dir=\"/abs/run\"'); for a simulation use "
                          "`fedtune simulate` or `flwr run simulations/flwr_app`")
    run_federation(grid, config_from_run_config(run_config), run_config.get(RUN_DIR_KEY) or "runs/federation",
                   log_to=log_to_of(run_config))
