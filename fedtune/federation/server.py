"""The server's side of a federation, independent of Flower: state, rounds, checkpoints.

`FederationServer` holds the global adapter and everything a restarted server needs. Each
round it takes the clients' replies, leaves out refusals (a node's budget, policy or state
said no) and invalid replies with their reasons, aggregates the rest (FedAvg / FedAdam /
FedYogi, optional user-level DP), writes an atomic checkpoint *before* the new adapter is
evaluated or sent anywhere, and appends one line to metrics.jsonl.
`server/server_app.py` only moves messages.

User-level DP (DP-FedAvg) is accounted for the cohort sampling actually used
(`fedtune.federation.cohort`): Poisson-subsampled Gaussian at the rate drawn, sampling without
replacement for a fixed-size cohort of fewer nodes than registered, full participation for
a cohort of all of them; its delta comes from the population the operator declares; its
noise is secret (OS entropy) unless a simulation asks for reproducible noise. A user-level
round never fails for a small cohort: the noise covers any draw, and a retried draw would
no longer be the sampling that was accounted.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from fedtune.system.atomic import append_jsonl
from fedtune.federation.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedtune.federation.cohort import Cohort
from fedtune.config import Config, config_from_toml_text
from fedtune.errors import ConfigError, FedtuneError
from fedtune.federation.strategy import ClientReply, Strategy
from fedtune.privacy import ddgauss

CHECKPOINT_FILE = "checkpoint.safetensors"
METRICS_FILE = "metrics.jsonl"


def check_federation_config(config: Config) -> None:
    """What a federation must settle before anything runs (nodes cannot agree on it later)."""
    if config.task_is_classification and not config.data.labels:
        raise ConfigError("data.labels: a federation must fix its label set (e.g. labels = [\"neg\", \"pos\"]) "
                          "so that every node maps labels to the same ids")
    check_distributed(config)


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
        raise ConfigError("dp.noise_multiplier: set the noise multiplier of a distributed-DP federation (every node "
                          "adds its share of it; `fedtune simulate` calibrates it from dp.target_epsilon)")
    if config.federation.user_dp_noise > 0:
        raise ConfigError("federation.user_dp_noise: user-level noise and distributed DP are separate modes; "
                          "choose one")


class RoundFailedError(FedtuneError):
    """Too few valid replies to aggregate a round."""


class FederationServer:
    def __init__(self, config: Config, run_dir: str | Path, adapter: "OrderedDict[str, np.ndarray]",
                 travel_keys: list[str], round_done: int = 0):
        self.config = config
        self.run_dir = Path(run_dir)
        self.adapter = OrderedDict(adapter)
        self.travel_keys = list(travel_keys)
        self.round_done = round_done
        self.strategy = Strategy(config)
        self.node_epsilon: dict[str, float] = {}
        self.node_privacy: dict[str, dict] = {}
        self.history: list[dict] = []

    @property
    def user_ledger(self):
        return self.strategy.user_ledger

    @property
    def randomness(self):
        return self.strategy.randomness

    # -- start / resume --------------------------------------------------------------
    @staticmethod
    def check_run_dir(config: Config, run_dir: str | Path):
        """The run dir's checkpoint if it can be resumed with `config`, None for a new run;
        a one-line error (before anything is written) for a file or another model's run."""
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise FedtuneError(f"{run_dir}: a file, not a run folder; choose a new --out")
        path = run_dir / CHECKPOINT_FILE
        if not path.exists():
            return None
        checkpoint = load_checkpoint(path)
        saved = config_from_toml_text(str(checkpoint.meta.get("config", "")), source=str(path))
        if (saved.model, saved.adapter, saved.lora) != (config.model, config.adapter, config.lora):
            raise FedtuneError(f"{path}: checkpoint was made for another model or LoRA config; use a new run dir")
        return checkpoint

    @classmethod
    def start_or_resume(cls, config: Config, run_dir: str | Path, adapter, travel_keys) -> "FederationServer":
        checkpoint = cls.check_run_dir(config, run_dir)
        if checkpoint is None:
            return cls(config, run_dir, adapter, travel_keys)
        path = Path(run_dir) / CHECKPOINT_FILE
        server = cls(config, run_dir, checkpoint.adapter, travel_keys, round_done=checkpoint.round)
        server.strategy.load_state(checkpoint.optimizer, checkpoint.meta, source=str(path))
        server.node_epsilon = dict(checkpoint.meta.get("node_epsilon", {}))
        server.node_privacy = dict(checkpoint.meta.get("node_privacy", {}))
        server.history = list(checkpoint.meta.get("history", []))
        return server

    # -- what goes out ---------------------------------------------------------------
    def payload(self, server_round: int) -> "OrderedDict[str, np.ndarray]":
        return self.strategy.payload(server_round, self.adapter, self.travel_keys)

    # -- one round -------------------------------------------------------------------
    def observe(self, reply: ClientReply) -> None:
        """Keep what a node said about its privacy (training and evaluation replies)."""
        if not math.isnan(reply.epsilon):  # inf (non-private) is reported, NaN means unknown
            self.node_epsilon[str(reply.node_id)] = reply.epsilon
        if reply.privacy:
            self.node_privacy[str(reply.node_id)] = reply.privacy

    def finish_round(self, server_round: int, replies: list[ClientReply], started: float, bytes_sent: int,
                     evaluate: "Callable[[OrderedDict], dict] | None" = None, evaluation: str = "federated",
                     extra: dict | None = None, cohort: Cohort | None = None) -> dict:
        """Validate, aggregate, checkpoint, evaluate the new global (`evaluate(adapter)`), log.

        `cohort` is how the round's nodes were drawn (default: a fixed-size cohort of the
        nodes that replied); user-level DP is accounted for it. Replies are taken in node
        order, not arrival order: float sums depend on their order, and a run replayed from
        its seeds must aggregate the same whichever node answered first."""
        replies = sorted(replies, key=lambda r: r.node_id)
        cohort = cohort or Cohort(len(replies), tuple(r.node_id for r in replies), "fixed", 1.0, float(len(replies)))
        reference = OrderedDict((k, self.adapter[k]) for k in self.travel_keys)
        screened = self.strategy.screen(replies, reference)
        for reply in replies:
            self.observe(reply)  # what each node said of its privacy, even if the round fails
        self._check_enough(server_round, len(screened.accepted), cohort, screened.rejected, screened.refused)
        new = self._aggregated(lambda: self.strategy.aggregate(server_round, reference, screened.accepted, cohort))
        return self._complete(server_round, new, replies, screened.accepted, screened.rejected, screened.refused,
                              cohort, started, bytes_sent, evaluate, evaluation, extra)

    def finish_secure_round(self, server_round: int, mean_update: dict | None, replies: list[ClientReply],
                            cohort: Cohort, started: float, bytes_sent: int, reason: str = "",
                            evaluate: "Callable[[OrderedDict], dict] | None" = None, evaluation: str = "federated",
                            extra: dict | None = None) -> dict:
        """A SecAgg+ round: the server holds only the mean of the contributors' updates
        (`replies` carry their released scalars, no tensors). Nodes that refused or dropped
        out are recorded; a round whose masks could not be removed fails with `reason`."""
        return self._finish_masked(
            server_round, mean_update is not None, replies, cohort, started, bytes_sent, reason,
            lambda reference: self.strategy.aggregate_secure(server_round, reference, mean_update, len(replies), cohort),
            evaluate, evaluation, {"secure_aggregation": True, **(extra or {})})

    def finish_distributed_round(self, server_round: int, noisy_sum, replies: list[ClientReply], cohort: Cohort,
                                 started: float, bytes_sent: int, reason: str = "",
                                 evaluate: "Callable[[OrderedDict], dict] | None" = None, evaluation: str = "federated",
                                 extra: dict | None = None) -> dict:
        """A distributed-DP round: the server holds the decoded noisy sum of the contributors'
        clipped example gradients (`fedtune.privacy.ddgauss.decode`) and takes one step."""
        return self._finish_masked(
            server_round, noisy_sum is not None, replies, cohort, started, bytes_sent, reason,
            lambda reference: self.strategy.aggregate_distributed(server_round, reference, noisy_sum, len(replies)),
            evaluate, evaluation, {"secure_aggregation": True, "dp_mode": "distributed", **(extra or {})})

    def distributed_announcement(self, server_round: int, cohort: Cohort) -> dict:
        """What a distributed-DP round tells its nodes: the encoding's granularity (sized for
        the cohort's expected total batch within the modulus), this round's secret rotation
        seed and the order of the tensors in the flat vector."""
        config = self.config
        keys = list(self.travel_keys)
        dim = int(sum(np.size(self.adapter[k]) for k in keys))
        granularity = ddgauss.choose_granularity(config.dp.max_grad_norm, config.dp.distributed_bits, dim,
                                                 len(cohort.sampled) * config.training.batch_size,
                                                 config.dp.noise_multiplier)
        seed = int(self.randomness.numpy_generator("server", "rotation", server_round).integers(2 ** 62))
        return {"granularity": granularity, "rotation_seed": seed, "keys": keys}

    def decode_distributed(self, modular_sum, announced: dict, contributors: int) -> tuple:
        """(the decoded noisy sum or None, record extras) from SecAgg+'s modular sum of the
        contributors' integer vectors, as `announced`."""
        if modular_sum is None:
            return None, {}
        config, bits = self.config, self.config.dp.distributed_bits
        dim = int(sum(np.size(self.adapter[k]) for k in announced["keys"]))
        spec = ddgauss.DDGaussSpec(clip=config.dp.max_grad_norm, granularity=announced["granularity"], bits=bits,
                                   contributors=max(1, contributors), noise_multiplier=config.dp.noise_multiplier,
                                   dim=dim)
        return (ddgauss.decode(modular_sum, spec, announced["rotation_seed"]),
                {"wrapped_share": ddgauss.wrapped_share(modular_sum, bits)})

    def _finish_masked(self, server_round: int, unmasked: bool, replies: list[ClientReply], cohort: Cohort,
                       started: float, bytes_sent: int, reason: str, combine, evaluate, evaluation: str,
                       extra: dict) -> dict:
        contributed = {r.node_id for r in replies}
        for reply in replies:
            self.observe(reply)
        refused = [{"node": n, "status": "dropped", "reason": "no masked update (refused, failed or dropped out)"}
                   for n in cohort.sampled if n not in contributed]
        if not unmasked:
            raise RoundFailedError(f"round {server_round}: {reason}")
        self._check_enough(server_round, len(replies), cohort, [], refused)
        reference = OrderedDict((k, self.adapter[k]) for k in self.travel_keys)
        new = self._aggregated(lambda: combine(reference))
        return self._complete(server_round, new, replies, replies, [], refused, cohort, started, bytes_sent,
                              evaluate, evaluation, extra)

    def _check_enough(self, server_round: int, accepted: int, cohort: Cohort, rejected: list, refused: list) -> None:
        fed = self.config.federation
        if accepted < fed.min_clients and not (self.user_ledger is not None and cohort.expected_size > 0):
            raise RoundFailedError(
                f"round {server_round}: {accepted} valid replies, need min_clients = {fed.min_clients} "
                f"(rejected: {rejected}; refused: {[r['node'] for r in refused]})"
            )

    @staticmethod
    def _aggregated(aggregate: "Callable[[], OrderedDict]") -> "OrderedDict":
        try:
            return aggregate()
        except ConfigError as exc:  # e.g. more nodes registered than the declared population
            raise RoundFailedError(str(exc)) from None

    def _complete(self, server_round: int, new: "OrderedDict", replies: list[ClientReply], accepted: list[ClientReply],
                  rejected: list, refused: list, cohort: Cohort, started: float, bytes_sent: int, evaluate,
                  evaluation: str, extra: dict | None) -> dict:
        """Adopt the new adapter, make the round durable, evaluate it, log it."""
        self.adapter.update(new)
        self.round_done = server_round
        self.checkpoint()  # the charge is durable before the new adapter reaches anyone
        evaluation_started = time.perf_counter()
        scores = evaluate(self.adapter) if evaluate else {}
        evaluation_seconds = time.perf_counter() - evaluation_started
        epsilons = [e for e in self.node_epsilon.values() if not math.isnan(e)]
        record = {
            "round": server_round,
            "evaluation": evaluation,
            **{k: v for k, v in (scores or {}).items()},
            "train_loss": _weighted([r.metrics.get("train-loss", math.nan) for r in accepted], [r.num_examples for r in accepted]),
            "clients_accepted": [r.node_id for r in accepted],
            "clients_rejected": rejected,
            "clients_refused": refused,
            "epsilon_max": _finite_or_inf(max(epsilons)) if epsilons else None,
            "epsilon_mean": _finite_or_inf(sum(epsilons) / len(epsilons)) if epsilons else None,
            "user_epsilon": self.user_ledger.epsilon() if self.user_ledger else None,
            "cohort": {"method": cohort.method, "registered": cohort.registered, "sampled": len(cohort.sampled),
                       "rate": cohort.rate, "accounted_rate": cohort.accounted_rate,
                       "accounted_as": cohort.accounted_as},
            "noise": self.randomness.label,
            "bytes_sent": bytes_sent,
            "bytes_received": sum(r.nbytes for r in replies),
            "seconds": round(time.perf_counter() - started, 3),
            "evaluation_seconds": round(evaluation_seconds, 3),
            # the accepted clients' bare local training (DP-SGD steps only), summed
            "train_seconds_sum": round(sum(float(r.metrics.get("train-seconds", 0.0)) for r in accepted), 3),
            **(extra or {}),
        }
        self.history.append(record)
        self.checkpoint()
        append_jsonl(self.run_dir / METRICS_FILE, record)
        return record

    def checkpoint(self) -> None:
        meta = {
            "config": self.config.to_toml(),
            "node_epsilon": self.node_epsilon,
            "node_privacy": self.node_privacy,
            "history": self.history,
            **self.strategy.state_meta(),
        }
        save_checkpoint(self.run_dir / CHECKPOINT_FILE,
                        Checkpoint(self.round_done, self.adapter, self.strategy.state_arrays(), meta))


def _weighted(values, weights) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and math.isfinite(v)]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / max(sum(w for _, w in pairs), 1)


def _finite_or_inf(value: float):
    return "inf" if math.isinf(value) else value
