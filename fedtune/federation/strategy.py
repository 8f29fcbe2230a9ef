"""The server's round logic, one seam: who trains, what travels, how replies combine.

A `Strategy` configures a round (`cohort`: which nodes, from secret randomness;
`payload`: what the global adapter sends, FFA-LoRA's B only after round 1), screens the
replies (`screen`: refusals, invalid updates), aggregates the rest (`aggregate`), averages
federated evaluations (`average_evaluations`) and owns its state for checkpoints (the
server optimizer's moments, the user-level ledger). The Flower layer only moves messages.

What the classic names are, as compositions of the config:
* FedAvg: `aggregator = "mean"`, `server_optimizer = "fedavg"`.
* FedProx: FedAvg plus `proximal_mu > 0`, which the nodes apply (a request field).
* FedAdam / FedYogi: `server_optimizer = "fedadam" / "fedyogi"` on the aggregated update.
* DP-FedAvg: `user_dp_clip` + `user_dp_noise`: `constrain_sensitivity`, the sum, then
  `add_noise`, accounted for the cohort sampling used (`fedtune.federation.cohort`).
* FFA-LoRA: `lora.ffa`: A is frozen on every node and only B (and the head) travel.
* Robust FedAvg: `aggregator = "median" / "trimmed-mean"`, `weight_cap`, `adaptive_norm_bound`.
Aggregators and server optimizers are each chosen by name from one registry
(`fedtune.federation.aggregate.AGGREGATORS`, `ServerOptimizer.KINDS`).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from fedtune.federation.aggregate import (AGGREGATORS, ServerOptimizer, add_noise, capped_weights, check_update, clip_to,
                               constrain_sensitivity, deltas, norm, unflatten)
from fedtune.federation.cohort import Cohort, draw_cohort
from fedtune.config import Config, FederationConfig
from fedtune.errors import ConfigError
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.randomness import Randomness

# A node that answered but declined: its budget, its policy or its own state said no.
REFUSALS = ("budget-exhausted", "policy-refused", "node-error")


@dataclass
class ClientReply:
    node_id: int
    status: str  # "ok", one of REFUSALS, or "error" (no usable reply)
    arrays: dict | None = None
    num_examples: int = 0
    epsilon: float = math.nan
    metrics: dict = field(default_factory=dict)
    message: str = ""
    nbytes: int = 0
    privacy: dict | None = None  # the node's ledger history, as it released it
    noise: str = ""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REASON_LIMIT = 300


def short_reason(text: str) -> str:
    """A reason fit for a round record: no terminal colour codes, the last meaningful line
    of a long error (a Ray failure is kilobytes of repr), at most REASON_LIMIT characters."""
    lines = [line.strip() for line in _ANSI.sub("", str(text)).splitlines() if line.strip()]
    if not lines:
        return ""
    reason = lines[0] if len(lines) == 1 else f"{lines[0][:120]} ... {lines[-1]}"
    return reason if len(reason) <= REASON_LIMIT else reason[:REASON_LIMIT - 3] + "..."


@dataclass
class Screened:
    accepted: list[ClientReply]
    rejected: list[dict]
    refused: list[dict]


def user_level_delta(fed: FederationConfig) -> float:
    """User-level delta: the operator's, or 1 / (10 x the population it declares)."""
    if fed.user_dp_delta > 0:
        return fed.user_dp_delta
    if fed.population <= 0:
        raise ConfigError("federation.population: declare how many nodes the federation has (user-level delta is "
                          "1 / (10 x population)), or set federation.user_dp_delta")
    return 1.0 / (10 * fed.population)


def charge_user_level(ledger: PrivacyLedger, noise_multiplier: float, cohort: Cohort, rounds: int = 1,
                      label: str = "") -> float:
    """Charge `rounds` user-level rounds drawn like `cohort`, as the sampling that ran.

    Poisson cohorts: the Poisson-subsampled Gaussian at the drawn rate (add/remove). A fixed
    cohort of every registered node: full participation, q = 1, sensitivity the clip
    (add/remove). A fixed cohort of m of N registered nodes (m < N): sampling without
    replacement under replace-one, where N is the count registered in that round (never a
    config value), recorded per round because N and m may change. Returns epsilon after."""
    if cohort.without_replacement:
        return ledger.charge_without_replacement(noise_multiplier, cohort.registered, len(cohort.sampled), rounds,
                                                 label=label)
    return ledger.charge(noise_multiplier, cohort.accounted_rate, rounds, label=label)


class Strategy:
    def __init__(self, config: Config):
        self.config = config
        fed = config.federation
        self.randomness = Randomness.from_setting(config.dp.noise_seed)
        self.optimizer = ServerOptimizer(fed.server_optimizer, fed.server_learning_rate)
        self.user_ledger = (PrivacyLedger("rdp", delta=user_level_delta(fed), max_epsilon=None)
                            if fed.user_dp_noise > 0 else None)
        self.canaries = None  # UpdateCanaries: set only by a federated audit (simulations.federated_audit)
        self.noise_off = False  # the audit's noise-off control: set only by a federated audit, never by a config

    # -- configure a round -----------------------------------------------------------
    def cohort(self, node_ids: list[int], server_round: int) -> Cohort:
        fed = self.config.federation
        return draw_cohort(node_ids, fed.clients_per_round, fed.cohort_sampling,
                           self.randomness.numpy_generator("server", "cohort", server_round))

    def payload(self, server_round: int, adapter: Mapping[str, np.ndarray], travel_keys: list[str]):
        """Round 1: the whole adapter. Later: only what trains; tensors a method freezes at
        their seeded init (FFA-LoRA's A) never change, and every node rebuilds them."""
        if server_round == 1:
            return OrderedDict(adapter)
        return OrderedDict((k, adapter[k]) for k in travel_keys)

    # -- replies -----------------------------------------------------------------------
    def screen(self, replies: list[ClientReply], reference: Mapping[str, np.ndarray]) -> Screened:
        """Refusals (the node said no), invalid replies (wrong tensors, non-finite, over the
        fixed norm bound, no examples) and the accepted rest."""
        bound = self.config.federation.max_update_norm or None
        accepted, rejected, refused = [], [], []
        for reply in replies:
            if reply.status in REFUSALS:
                refused.append({"node": reply.node_id, "status": reply.status, "reason": short_reason(reply.message)})
            elif reply.status != "ok" or reply.arrays is None:
                rejected.append({"node": reply.node_id, "reason": short_reason(reply.message) or "error reply"})
            elif (reason := check_update(reply.arrays, reference, bound)) is not None:
                rejected.append({"node": reply.node_id, "reason": reason})
            elif reply.num_examples <= 0:
                rejected.append({"node": reply.node_id, "reason": f"num-examples = {reply.num_examples}"})
            else:
                accepted.append(reply)
        return Screened(accepted, rejected, refused)

    def aggregate(self, server_round: int, reference: Mapping[str, np.ndarray], accepted: list[ClientReply],
                  cohort: Cohort) -> "OrderedDict[str, np.ndarray]":
        """The new travelling tensors from the accepted replies (FedAvg family, robust or
        user-level DP), through the server optimizer."""
        fed = self.config.federation
        updates = deltas([r.arrays for r in accepted], reference)
        if self.user_ledger is not None:
            self._check_population(server_round, cohort)
            clipped = constrain_sensitivity(updates, fed.user_dp_clip)
            rng = self.randomness.numpy_generator("server", "user-level noise", server_round)
            if self.noise_off:  # a federated audit's control: the ledger says what ran, never less
                self.user_ledger.charge_non_private(1, label=f"round {server_round} (noise OFF: audit control)")
            else:
                charge_user_level(self.user_ledger, fed.user_dp_noise, cohort, label=f"round {server_round}")
            if self.canaries is not None:
                step = self._audited_step(clipped, reference, cohort, rng)
            else:
                step = add_noise(clipped, reference, fed.user_dp_clip, fed.user_dp_noise, cohort.expected_size, rng)
        else:
            if fed.adaptive_norm_bound and len(updates) >= 3:
                limit = fed.adaptive_norm_bound * float(np.median([norm(u) for u in updates]))
                updates = [clip_to(u, limit) for u in updates]
            weights = capped_weights([r.num_examples for r in accepted], fed.weight_cap)
            options = {"cut": fed.trim_fraction} if fed.aggregator == "trimmed-mean" else {}
            step = AGGREGATORS[fed.aggregator](updates, weights, **options)
        target = OrderedDict((k, reference[k] + step[k]) for k in reference)
        return self.optimizer.apply(reference, target, server_round)

    def _audited_step(self, clipped, reference, cohort: Cohort, rng) -> "OrderedDict[str, np.ndarray]":
        """The user-level step of a federated audit: the canary clients that joined this
        round are added to the clipped sum, the noise goes on as always (or not, for the
        noise-off control), and each canary is scored by the released sum minus the real
        nodes' clipped sum."""
        fed = self.config.federation
        noise = 0.0 if self.noise_off else fed.user_dp_noise
        joined = self.canaries.updates(reference, fed.user_dp_clip, cohort.accounted_rate)
        step = add_noise(list(clipped) + joined, reference, fed.user_dp_clip, noise, cohort.expected_size, rng)
        nodes = {k: sum((np.asarray(u[k], np.float64) for u in clipped), np.zeros(np.shape(v))) for k, v in reference.items()}
        self.canaries.score({k: v * cohort.expected_size for k, v in step.items()}, nodes, fed.user_dp_clip)
        return step

    def aggregate_secure(self, server_round: int, reference: Mapping[str, np.ndarray],
                         mean_update: Mapping[str, np.ndarray], contributors: int,
                         cohort: Cohort) -> "OrderedDict[str, np.ndarray]":
        """The new travelling tensors from a SecAgg+ round: the server holds only the mean
        of the nodes' updates (each clipped by its node, uniform weights). With user-level
        DP the noise goes on the unmasked sum: every update was clipped to user_dp_clip by
        its node, so one node moves the sum by at most that, as in `constrain_sensitivity`."""
        fed = self.config.federation
        if self.user_ledger is not None:
            self._check_population(server_round, cohort)
            total = OrderedDict((k, np.asarray(mean_update[k], np.float64) * contributors) for k in reference)
            rng = self.randomness.numpy_generator("server", "user-level noise", server_round)
            step = add_noise([total], reference, fed.user_dp_clip, fed.user_dp_noise, cohort.expected_size, rng)
            charge_user_level(self.user_ledger, fed.user_dp_noise, cohort, label=f"round {server_round}")
        else:
            step = OrderedDict((k, np.asarray(mean_update[k], np.float64)) for k in reference)
        target = OrderedDict((k, reference[k] + step[k]) for k in reference)
        return self.optimizer.apply(reference, target, server_round)

    def aggregate_distributed(self, server_round: int, reference: Mapping[str, np.ndarray], noisy_sum: np.ndarray,
                              contributors: int) -> "OrderedDict[str, np.ndarray]":
        """One DP-SGD step over the union of the contributors' batches: the noisy sum of
        their clipped example gradients (flat, in `reference`'s order) over the expected
        total batch (each node's Poisson batch expects training.batch_size rows), then the
        server optimizer: "fedavg" is plain SGD at server_learning_rate, "fedadam" /
        "fedyogi" take minus the gradient as their pseudo-update."""
        expected = contributors * self.config.training.batch_size
        shapes = OrderedDict((k, np.shape(reference[k])) for k in reference)
        step = OrderedDict((k, -g) for k, g in unflatten(np.asarray(noisy_sum, np.float64) / expected, shapes).items())
        if self.optimizer.kind == "fedavg":
            return OrderedDict((k, (reference[k] + self.optimizer.learning_rate * step[k]).astype(reference[k].dtype))
                               for k in reference)
        target = OrderedDict((k, reference[k] + step[k]) for k in reference)
        return self.optimizer.apply(reference, target, server_round)

    def _check_population(self, server_round: int, cohort: Cohort) -> None:
        population = self.config.federation.population
        if population and cohort.registered > population:
            raise ConfigError(f"round {server_round}: {cohort.registered} nodes registered, more than "
                              f"federation.population = {population}, which the user-level delta assumes")

    @staticmethod
    def average_evaluations(answers: list[ClientReply]) -> dict:
        """Example-weighted mean of the released evaluation metrics of the nodes that answered."""
        answers = [a for a in answers if a.status == "ok" and a.num_examples > 0]
        total = sum(a.num_examples for a in answers)
        keys = sorted({k for a in answers for k in a.metrics})
        return {k: sum(a.metrics.get(k, 0.0) * a.num_examples for a in answers) / total for k in keys} if total else {}

    # -- state ---------------------------------------------------------------------------
    def state_arrays(self) -> dict[str, np.ndarray]:
        return self.optimizer.state_arrays()

    def state_meta(self) -> dict:
        return {"user_ledger": self.user_ledger.to_dict() if self.user_ledger else None}

    def load_state(self, arrays: Mapping[str, np.ndarray], meta: dict, source: str) -> None:
        self.optimizer.load_state_arrays(arrays)
        if meta.get("user_ledger"):
            self.user_ledger = PrivacyLedger.from_dict(meta["user_ledger"], source=source)
