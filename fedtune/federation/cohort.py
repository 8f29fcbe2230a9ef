"""Which nodes train in a round, drawn the way user-level DP accounts for it.

Amplification by sampling holds only for the sampling actually used, and only while the
sample stays secret. fedtune draws cohorts from secret randomness (OS entropy; a seed only
in reproducible simulations) over the nodes actually registered in that round, and says
what the accountant may assume:

* "poisson": every registered node joins independently with rate q = clients_per_round /
  registered. User-level DP is accounted as the Poisson-subsampled Gaussian at that q.
* "fixed": exactly m = min(clients_per_round, registered) of the N registered nodes,
  without replacement. Poisson bounds do not cover fixed-size cohorts (autodp#3), and
  neither does full participation (q = 1) when m < N: removing one user lets another take
  its slot, so the noised sum moves by up to twice the clip. Such a round is accounted as
  what it is, sampling without replacement of m of N under the replace-one relation
  (dp-accounting's `SampledWithoutReplacementDpEvent`); N is the count registered in that
  round, so every round's event is recorded on its own. A cohort of every registered node
  (m = N) is full participation, accounted at q = 1 (add/remove).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Cohort:
    """One round's draw and what the accountant may assume about it."""

    registered: int           # nodes registered when the round was drawn
    sampled: tuple[int, ...]  # node ids that were sent the round
    method: str               # "poisson" or "fixed"
    rate: float               # Poisson rate q, or the fixed cohort's share of the registered nodes
    expected_size: float      # the fixed denominator of DP-FedAvg: q x registered, or the cohort size

    @property
    def without_replacement(self) -> bool:
        """A fixed-size cohort of fewer nodes than were registered: sampling without replacement."""
        return self.method == "fixed" and 0 < len(self.sampled) < self.registered

    @property
    def accounted_rate(self) -> float:
        """The sampling rate user-level DP is accounted at: Poisson's q, m / N for a fixed
        cohort drawn without replacement, 1 for full participation."""
        if self.method == "poisson":
            return self.rate
        return len(self.sampled) / self.registered if self.without_replacement else 1.0

    @property
    def accounted_as(self) -> str:
        """How user-level DP accounts this round (`fedtune.federation.strategy.charge_user_level`)."""
        if self.method == "poisson":
            return "poisson"
        return "without replacement" if self.without_replacement else "full participation"


def draw_cohort(node_ids: Iterable[int], clients_per_round: int, method: str, rng: np.random.Generator) -> Cohort:
    """Sample a round's cohort from `node_ids` (ids may exceed int64: never through numpy).
    A `range` is used as it is: a simulated population registered lazily hands its node ids
    as one, and sorting a million of them would build a million ints every round."""
    nodes = node_ids if isinstance(node_ids, range) else sorted(node_ids)
    registered = len(nodes)
    if registered == 0:
        return Cohort(0, (), method, 0.0, 0.0)
    if method == "poisson":
        rate = min(1.0, clients_per_round / registered)
        picks = np.flatnonzero(rng.random(registered) < rate)
        return Cohort(registered, tuple(nodes[i] for i in picks), method, rate, rate * registered)
    if method != "fixed":
        raise ValueError(f"cohort sampling {method!r}: expected poisson or fixed")
    size = min(clients_per_round, registered)
    picks = sorted(rng.choice(registered, size=size, replace=False).tolist())
    return Cohort(registered, tuple(nodes[i] for i in picks), method, size / registered, float(size))
