"""The epsilon a one-run privacy audit proves: Steinke, Nasr and Jagielski (NeurIPS 2023).

An audit inserts m canaries, each included in the training by an independent fair coin,
trains once, and then guesses, for r of them (the rest abstained on), whether each was
included. If the training is (epsilon, delta)-DP, the number of correct guesses v is, up
to a delta term, no more likely than for r independent guesses that are each right with
probability e^eps / (1 + e^eps) (randomized response): the paper's Theorem 5.2 and its
Appendix D code. Rejecting that at confidence 1 - beta gives a lower bound on epsilon:
every epsilon whose p-value for v is below beta is ruled out.

This module is that formula and nothing else, checked in tests against the numbers the
paper prints. No maintained package ships it (the paper's authors publish it as code in
the appendix), so it is written out here from the theorem, vectorised:

    p(eps) = P[Binomial(r, q) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= Binomial(r, q) < v] / i,
    q = e^eps / (1 + e^eps),

and the bound is the largest eps with p(eps) < beta, found by bisection exactly as the
paper does (an upper bracket stepped up by 1, then 30 halvings, returning the low end, so
the number reported is never above what the test rejects).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

from fedtune.errors import ConfigError

BISECTION_STEPS = 30


def _check_counts(m: int, r: int, v: int, delta: float) -> None:
    if not (isinstance(m, (int, np.integer)) and isinstance(r, (int, np.integer)) and isinstance(v, (int, np.integer))):
        raise ConfigError(f"audit counts must be whole numbers: m={m!r}, r={r!r}, v={v!r}")
    if not 0 <= v <= r <= m:
        raise ConfigError(f"audit counts: expected 0 <= correct guesses v ({v}) <= guesses r ({r}) <= canaries m ({m})")
    if not 0 <= delta <= 1:
        raise ConfigError(f"audit delta = {delta!r}: expected a number in [0, 1]")


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The probability of at least `v` correct guesses out of `r` (with `m` canaries) under
    (epsilon, delta)-DP: small means the claim (epsilon, delta) is contradicted."""
    _check_counts(m, r, v, delta)
    if not epsilon >= 0:
        raise ConfigError(f"audit epsilon = {epsilon!r}: expected a number >= 0")
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v - i] for i = 1..v
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that `v` correct guesses out of `r` rule out at `confidence`
    (0 when they rule out nothing)."""
    if not 0 < confidence < 1:
        raise ConfigError(f"audit confidence = {confidence!r}: expected a number in (0, 1), e.g. 0.95")
    beta = 1 - confidence
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        high += 1.0
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < beta:
            low = middle
        else:
            high = middle
    return low


def best_possible_bound(m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The bound if every one of the `r` guesses were right: the most an audit with these
    m and r can ever prove (it grows only like log r), printed beside every audit so that a
    bound is read against what the design could show."""
    return epsilon_lower_bound(m, r, r, delta, confidence)
