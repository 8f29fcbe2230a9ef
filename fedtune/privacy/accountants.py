"""Privacy accountants: epsilon of a mechanism history, noise for a budget, and an
independent check.

Every epsilon fedtune prints comes from Opacus's own accountants (`RDPAccountant`,
`PRVAccountant`) fed with a history of (noise_multiplier, sample_rate, steps), and can be
recomputed by Google's dp-accounting (`independent_epsilon`). Pure functions of their
arguments (memoised: Opacus's bisection and PRV are slow); state lives in `ledger.py`.
"""

from __future__ import annotations

import math
from functools import lru_cache

from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune.config import ACCOUNTANTS
from fedtune.errors import ConfigError




def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant = {name!r}: expected one of {', '.join(ACCOUNTANTS)}")
    return name


def _check_mechanism(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and noise_multiplier > 0):
        raise ConfigError(f"noise_multiplier = {noise_multiplier!r}: expected a number > 0")
    if not (isinstance(sample_rate, (int, float)) and 0 < sample_rate <= 1):
        raise ConfigError(f"sample_rate = {sample_rate!r}: expected a number in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ConfigError(f"steps = {steps!r}: expected a whole number >= 0")


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ConfigError(f"delta = {delta!r}: expected a number in (0, 1)")


# dp-accounting's loss discretization: pessimistic, so a coarser grid only over-counts. At
# `fedtune simulate`'s defaults (q = 1/12, 60 steps, delta 1/3780, epsilon 8) PLD needs noise
# 0.681 where RDP needs 0.736: 7.5% less noise for the same guarantee.
PLD_INTERVAL = 1e-3


def pld_epsilon(history, delta: float, interval: float = PLD_INTERVAL) -> float:
    """Epsilon of a history by dp-accounting's PLD accountant (pessimistic estimate: never
    below the true epsilon of the Poisson-subsampled Gaussian, add-or-remove-one)."""
    from dp_accounting import pld

    return _dp_accounting_epsilon(pld.PLDAccountant(value_discretization_interval=interval), history, delta)


def _dp_accounting_epsilon(counter, history, delta: float) -> float:
    """Compose a (sigma, q, steps) history into a dp-accounting accountant: Poisson-subsampled
    Gaussian steps, or plain Gaussian releases where q = 1."""
    import dp_accounting

    for sigma, q, steps in history:
        if steps:
            event = dp_accounting.GaussianDpEvent(float(sigma))
            if q < 1:
                event = dp_accounting.PoissonSampledDpEvent(float(q), event)
            counter.compose(event, int(steps))
    return float(counter.get_epsilon(delta))


def make_accountant(name: str, history: list[tuple[float, float, int]] = ()) -> IAccountant:
    """A fresh Opacus accountant of kind `name` holding `history` (for "pld", Opacus's
    nearest, PRV: Opacus only keeps the history during training)."""
    accountant = RDPAccountant() if _check_accountant(name) == "rdp" else PRVAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return accountant


def _epsilon_of(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    return _cached_epsilon(name, tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@lru_cache(maxsize=1024)
def _cached_epsilon(name: str, history: tuple, delta: float) -> float:
    """Pure in its arguments, so memoised: a ledger asks the same question several times
    per training call (budget check, charge, save), and PRV takes ~0.1-1 s each."""
    if not any(steps for _, _, steps in history):
        return 0.0
    if name == "pld":
        return pld_epsilon(history, delta)
    return float(make_accountant(name, list(history)).get_epsilon(delta=delta))


def independent_epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """The same epsilon from the other library: Google's dp-accounting for Opacus ledgers
    (its RDP accountant for "rdp", its PLD accountant for "prv"), Opacus's PRV for "pld"
    ledgers, whose epsilon dp-accounting computes (all numeric
    methods agree with Opacus's to about 1%; RDP may differ where one library drops orders
    it cannot evaluate, always on the conservative side)."""
    import logging

    from dp_accounting import pld, rdp

    # dp-accounting logs a warning for every fractional order it cannot evaluate and drops
    # (the epsilon is then conservative); one report would print hundreds of them
    logging.getLogger("absl").setLevel(logging.ERROR)
    _check_delta(delta)
    if not any(steps for _, _, steps in history):
        return 0.0
    if _check_accountant(accountant) == "pld":  # a dp-accounting ledger is checked by Opacus's PRV
        return float(make_accountant("prv", history).get_epsilon(delta=delta))
    return _dp_accounting_epsilon(rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant(), history, delta)


def compute_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps, by Opacus's accountant."""
    _check_mechanism(noise_multiplier, sample_rate, steps)
    _check_delta(delta)
    return _epsilon_of(accountant, [(noise_multiplier, sample_rate, steps)], delta)


def noise_for_budget(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
    also: tuple[tuple[float, float, int], ...] = (),
) -> float:
    """The smallest noise multiplier (to Opacus's 0.01 tolerance) that keeps `steps`
    steps at `sample_rate`, composed with the mechanisms in `also` (e.g. the metric
    releases a node's policy plans), within `target_epsilon`."""
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0):
        raise ConfigError(f"target_epsilon = {target_epsilon!r}: expected a number > 0")
    _check_delta(delta)
    _check_mechanism(1.0, sample_rate, steps)
    if steps == 0:
        raise ConfigError("steps = 0: there is nothing to plan noise for")
    accountant = _check_accountant(accountant)
    also = tuple((float(s), float(q), int(n)) for s, q, n in also if n)
    if not also and accountant != "pld":  # Opacus's own bisection knows rdp and prv only
        return _cached_noise(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant)
    return _cached_noise_with(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant, also)


@lru_cache(maxsize=256)
def _cached_noise_with(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                       also: tuple) -> float:
    """Opacus's bisection (`get_noise_multiplier`), over the composition of the training
    steps with fixed extra mechanisms."""
    def epsilon(sigma: float) -> float:
        return _epsilon_of(accountant, list(also) + [(sigma, sample_rate, steps)], delta)

    floor = _epsilon_of(accountant, list(also), delta)
    if floor >= target_epsilon:
        raise ConfigError(f"the planned metric releases alone spend epsilon {floor:.3f} >= target {target_epsilon:g}: "
                          "raise node.metric_noise_multiplier, or release fewer metrics")
    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > 1e6:
            raise ConfigError(f"target_epsilon = {target_epsilon:g}: no noise multiplier up to 1e6 reaches it")
        eps_high = epsilon(high)
    while target_epsilon - eps_high > 0.01:
        middle = (low + high) / 2
        eps = epsilon(middle)
        if eps < target_epsilon:
            high, eps_high = middle, eps
        else:
            low = middle
    return high


@lru_cache(maxsize=256)
def _cached_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """Opacus's bisection costs 0.7 s (RDP) to 1.6 s (PRV); every round of every client
    would pay it again for the same plan. Pure in its arguments, so memoised."""
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))
