"""Which nodes train in a round, drawn the way user-level DP accounts for it.

Amplification by sampling holds only for the sampling actually used, and only while the
sample stays secret. fedtune draws cohorts from secret randomness (OS entropy; a seed only
in reproducible simulations) over the nodes actually registered in that round, and says
what the accountant may assume:

* "poisson": every registered node joins independently with rate q = clients_per_round /
  registered. User-level DP is accounted as the Poisson-subsampled Gaussian at that q.
* "fixed": exactly min(clients_per_round, registered) nodes, without replacement. Poisson
  bounds do not cover fixed-size cohorts (autodp#3), so user-level DP is accounted without
  amplification (q = 1), as Flower's own server-side accountant does.
"""

from __future__ import annotations

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
    def accounted_rate(self) -> float:
        """The sampling rate user-level DP may be accounted with."""
        return self.rate if self.method == "poisson" else 1.0


def draw_cohort(node_ids: list[int], clients_per_round: int, method: str, rng: np.random.Generator) -> Cohort:
    """Sample a round's cohort from `node_ids` (ids may exceed int64: never through numpy)."""
    nodes = sorted(node_ids)
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
