"""The server's round logic, one seam: who trains, what travels, how replies combine.

A `Strategy` configures a round (`cohort`: which nodes, from secret randomness;
`payload`: what the global adapter sends, FFA-LoRA's B only after round 1), screens the
replies (`screen`: refusals, invalid updates), aggregates the rest and averages federated
evaluations (`average_evaluations`). It owns its state for checkpoints (the server
optimizer's moments, the user-level ledger). The Flower layer only moves messages.

Aggregation is a composition of steps, each built from the config once:
(a) `RobustAggregation` (no user-level DP): the adaptive norm bound, the weight cap and
    the `AGGREGATORS` entry, over the updates the server sees;
(b) the secure sum: under SecAgg+ the server holds only the mean of the nodes' updates,
    each clipped by its node, and `secure_sum` turns it back into their sum;
(c) `UserLevelDP` (user-level DP on): one object for the plain and the secure path. It
    takes the sum of clipped updates (`constrain_sensitivity` then the sum, or the secure
    sum), checks the population, charges its ledger for the cohort sampling that ran,
    adds the noise and divides by the expected cohort size. A harness may inject a
    subclass (the federated audit's canaries and noise-off control);
(d) the server optimizer (`fedtune.federation.server_optimizers`), which also takes a
    distributed-DP round's gradient step.

What the classic names are, as compositions of the config:
* FedAvg: `aggregator = "mean"`, `server_optimizer = "fedavg"`.
* FedProx: FedAvg plus `proximal_mu > 0`, which the nodes apply (a request field).
* FedAdam / FedYogi: `server_optimizer = "fedadam" / "fedyogi"` on the aggregated update.
* DP-FedAvg: `user_dp_clip` + `user_dp_noise`: `constrain_sensitivity`, the sum, then
  `add_noise`, accounted for the cohort sampling used (`fedtune.federation.cohort`) by
  `user_dp_accountant`.
* FFA-LoRA: `lora.ffa`: A is frozen on every node and only B (and the head) travel.
* Robust FedAvg: `aggregator = "median" / "trimmed-mean"`, `weight_cap`, `adaptive_norm_bound`.
Aggregators and server optimizers are each chosen by name from one registry
(`fedtune.federation.aggregate.AGGREGATORS`, `fedtune.federation.server_optimizers.SERVER_OPTIMIZERS`).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

from fedtune.federation.aggregate import (AGGREGATORS, add_noise, capped_weights, check_update, clip_to,
                                          constrain_sensitivity, deltas, norm, sum_updates, unflatten)
from fedtune.federation.cohort import Cohort, draw_cohort
from fedtune.federation.server_optimizers import server_optimizer
from fedtune.config import Config, FederationConfig
from fedtune.errors import ConfigError
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.randomness import Randomness

State = Mapping[str, np.ndarray]

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


def secure_sum(mean_update: State, contributors: int, reference: State) -> "OrderedDict[str, np.ndarray]":
    """Step (b): SecAgg+ hands the server the mean of the contributors' updates (uniform
    weights); their sum is that mean times their count, in float64."""
    return OrderedDict((k, np.asarray(mean_update[k], np.float64) * contributors) for k in reference)


class RobustAggregation:
    """Step (a) when no user-level noise is added: each update clipped to the adaptive
    bound (a multiple of the round's median norm, with 3+ replies), example counts capped
    at a multiple of the median claim, then the configured aggregator."""

    def __init__(self, fed: FederationConfig):
        self.norm_bound = fed.adaptive_norm_bound
        self.weight_cap = fed.weight_cap
        self.aggregator = AGGREGATORS[fed.aggregator]
        self.options = {"cut": fed.trim_fraction} if fed.aggregator == "trimmed-mean" else {}

    def __call__(self, updates: Sequence[State], claimed_examples: Sequence[int]) -> "OrderedDict[str, np.ndarray]":
        if self.norm_bound and len(updates) >= 3:
            limit = self.norm_bound * float(np.median([norm(u) for u in updates]))
            updates = [clip_to(u, limit) for u in updates]
        return self.aggregator(updates, capped_weights(list(claimed_examples), self.weight_cap))


class UserLevelDP:
    """Step (c), DP-FedAvg's release, the same for the plain and the secure path.

    It takes the sum of updates each clipped to `clip` (one node moves it by at most the
    clip), checks that no more nodes registered than the population the delta assumes,
    charges the ledger for the cohort sampling that ran, adds N(0, (z clip)^2) and divides
    by the expected cohort size. `charge` and `noised` are the hooks a harness may
    override (the federated audit's canaries and noise-off control); production builds
    this class from the config."""

    def __init__(self, ledger: PrivacyLedger, clip: float, noise_multiplier: float, randomness: Randomness,
                 population: int = 0):
        self.ledger = ledger
        self.clip = clip
        self.noise_multiplier = noise_multiplier
        self.randomness = randomness
        self.population = population

    @classmethod
    def from_config(cls, config: Config, randomness: Randomness, **options) -> "UserLevelDP":
        """The step `config.federation` describes; its ledger counts with
        `federation.user_dp_accountant` at the user-level delta. `options` go to a
        subclass's constructor."""
        fed = config.federation
        ledger = PrivacyLedger(fed.user_dp_accountant, delta=user_level_delta(fed), max_epsilon=None)
        return cls(ledger, fed.user_dp_clip, fed.user_dp_noise, randomness, fed.population, **options)

    def clipped_sum(self, updates: Sequence[State], reference: State) -> "OrderedDict[str, np.ndarray]":
        """The plain path's input: every update clipped to the clip, then summed."""
        return sum_updates(constrain_sensitivity(updates, self.clip), reference)

    def step(self, server_round: int, reference: State, clipped_sum: State,
             cohort: Cohort) -> "OrderedDict[str, np.ndarray]":
        """The noisy mean update of the round, charged before it is computed."""
        self.check_population(server_round, cohort)
        self.charge(server_round, cohort)
        rng = self.randomness.numpy_generator("server", "user-level noise", server_round)
        return self.noised(clipped_sum, reference, cohort, rng)

    def check_population(self, server_round: int, cohort: Cohort) -> None:
        if self.population and cohort.registered > self.population:
            raise ConfigError(f"round {server_round}: {cohort.registered} nodes registered, more than "
                              f"federation.population = {self.population}, which the user-level delta assumes")

    def charge(self, server_round: int, cohort: Cohort) -> None:
        charge_user_level(self.ledger, self.noise_multiplier, cohort, label=f"round {server_round}")

    def noised(self, clipped_sum: State, reference: State, cohort: Cohort,
               rng: np.random.Generator) -> "OrderedDict[str, np.ndarray]":
        return add_noise([clipped_sum], reference, self.clip, self.noise_multiplier, cohort.expected_size, rng)


class Strategy:
    """The round logic, composed from the config: `robust` (step a), `user_level` (step c,
    None without user-level DP; injected by a harness, else built from the config) and
    `optimizer` (step d)."""

    def __init__(self, config: Config, user_level: UserLevelDP | None = None):
        self.config = config
        fed = config.federation
        self.randomness = Randomness.from_setting(config.dp.noise_seed)
        self.optimizer = server_optimizer(fed.server_optimizer, fed.server_learning_rate)
        if user_level is not None and fed.user_dp_noise <= 0:
            raise ConfigError("federation.user_dp_noise = 0: a user-level DP step was given to a federation "
                              "without user-level DP")
        if user_level is None and fed.user_dp_noise > 0:
            user_level = UserLevelDP.from_config(config, self.randomness)
        self.user_level = user_level
        self.robust = RobustAggregation(fed)

    @property
    def user_ledger(self) -> PrivacyLedger | None:
        """The user-level ledger (None without user-level DP)."""
        return self.user_level.ledger if self.user_level is not None else None

    @user_ledger.setter
    def user_ledger(self, ledger: PrivacyLedger) -> None:
        if self.user_level is None:
            raise ConfigError("federation.user_dp_noise = 0: this federation has no user-level DP, yet a user-level "
                              "ledger was to be resumed; resume it with the user-level settings it ran with")
        self.user_level.ledger = ledger

    # -- configure a round -----------------------------------------------------------
    def cohort(self, node_ids: Iterable[int], server_round: int) -> Cohort:
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
        """The new travelling tensors from the accepted replies: the user-level DP step on
        their clipped sum, or robust aggregation; then the server optimizer."""
        updates = deltas([r.arrays for r in accepted], reference)
        if self.user_level is not None:
            clipped = self.user_level.clipped_sum(updates, reference)
            step = self.user_level.step(server_round, reference, clipped, cohort)
        else:
            step = self.robust(updates, [r.num_examples for r in accepted])
        return self._server_step(server_round, reference, step)

    def aggregate_secure(self, server_round: int, reference: Mapping[str, np.ndarray],
                         mean_update: Mapping[str, np.ndarray], contributors: int,
                         cohort: Cohort) -> "OrderedDict[str, np.ndarray]":
        """The new travelling tensors from a SecAgg+ round: the server holds only the mean
        of the nodes' updates (each clipped by its node, uniform weights). With user-level
        DP the same step as the plain path runs on the unmasked sum: every update was
        clipped to user_dp_clip by its node, so one node moves the sum by at most that."""
        if self.user_level is not None:
            step = self.user_level.step(server_round, reference, secure_sum(mean_update, contributors, reference),
                                        cohort)
        else:
            step = OrderedDict((k, np.asarray(mean_update[k], np.float64)) for k in reference)
        return self._server_step(server_round, reference, step)

    def aggregate_distributed(self, server_round: int, reference: Mapping[str, np.ndarray], noisy_sum: np.ndarray,
                              contributors: int) -> "OrderedDict[str, np.ndarray]":
        """One DP-SGD step over the union of the contributors' batches: the noisy sum of
        their clipped example gradients (flat, in `reference`'s order) over the expected
        total batch (each node's Poisson batch expects training.batch_size rows), taken by
        the server optimizer as a gradient step (`apply_gradient_step`)."""
        expected = contributors * self.config.training.batch_size
        shapes = OrderedDict((k, np.shape(reference[k])) for k in reference)
        step = OrderedDict((k, -g) for k, g in unflatten(np.asarray(noisy_sum, np.float64) / expected, shapes).items())
        return self.optimizer.apply_gradient_step(reference, step, server_round)

    def _server_step(self, server_round: int, reference: Mapping[str, np.ndarray],
                     step: State) -> "OrderedDict[str, np.ndarray]":
        """Step (d): the aggregated update through the server optimizer."""
        target = OrderedDict((k, reference[k] + step[k]) for k in reference)
        return self.optimizer.apply(reference, target, server_round)

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
