"""Privacy accountants: epsilon of a mechanism history, noise for a budget, and an
independent check.

Every epsilon fedtune prints comes from one accountant of `ACCOUNTANTS`, fed with a
history of (noise_multiplier, sample_rate, steps), and can be recomputed by the other
library (`independent_epsilon`). `ACCOUNTANTS` is the one registry, as Opacus's
`create_accountant` is for Opacus: config validation, the ledger, DP training, planning
and the command line all read it, so a new accountant is one entry here. Pure functions
of their arguments (memoised: Opacus's bisection and PRV are slow); state lives in
`ledger.py`. Heavy libraries (Opacus, dp-accounting) load inside the functions: config
validation imports this registry before torch may load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

History = list[tuple[float, float, int]]


def _opacus_epsilon(kind: str) -> Callable[[History, float], float]:
    def epsilon(history: History, delta: float) -> float:
        return float(_opacus_accountant(kind, history).get_epsilon(delta=delta))

    return epsilon


def _dp_accounting(kind: str) -> Callable[[History, float], float]:
    def epsilon(history: History, delta: float) -> float:
        from dp_accounting import pld, rdp

        counter = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
        return _dp_accounting_epsilon(counter, history, delta)

    return epsilon


@dataclass(frozen=True)
class Accountant:
    """One way of counting epsilon, and how the rest of fedtune uses it."""

    help: str                                        # one line for --help and docs
    epsilon: Callable[[History, float], float]       # history, delta -> epsilon (an upper bound)
    library: str                                     # who computes `epsilon`
    independent: Callable[[History, float], float]   # the same epsilon from the other library
    check_library: str                               # who computes `independent`
    opacus_engine: str                               # the Opacus accountant that records steps during training
    opacus_bisection: bool = False                   # Opacus's get_noise_multiplier knows it (faster planning)
    fixed_cohorts: bool = False                      # may hold fixed cohorts drawn without replacement (server)


ACCOUNTANTS: dict[str, Accountant] = {
    "rdp": Accountant("Renyi DP (Opacus RDPAccountant); the only one that accounts fixed cohorts without replacement",
                      _opacus_epsilon("rdp"), "Opacus", _dp_accounting("rdp"), "dp-accounting RDP", "rdp",
                      opacus_bisection=True, fixed_cohorts=True),
    "prv": Accountant("privacy random variables (Opacus PRVAccountant), numerically tight",
                      _opacus_epsilon("prv"), "Opacus", _dp_accounting("pld"), "dp-accounting PLD", "prv",
                      opacus_bisection=True),
    # dp-accounting's PLD, pessimistic discretization: an upper bound, about 10% below RDP's
    "pld": Accountant("privacy loss distribution (Google dp-accounting), pessimistic discretization",
                      lambda history, delta: pld_epsilon(history, delta), "dp-accounting",
                      _opacus_epsilon("prv"), "Opacus PRV", "prv"),
}


def accountant_named(name: str) -> Accountant:
    """The registry entry `name`, or a one-line error naming the valid ones."""
    if name not in ACCOUNTANTS:
        raise ConfigError(f"accountant = {name!r}: expected one of {', '.join(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]


def _check_accountant(name: str) -> str:
    accountant_named(name)
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


def subsampled_gaussian_pld(noise_multiplier: float, sample_rate: float, steps: int, interval: float = PLD_INTERVAL):
    """dp-accounting's privacy loss distribution of `steps` Poisson-subsampled Gaussian steps
    (pessimistic: its hockey-stick divergences never fall below the true ones, in both the
    add and the remove direction): what an audit reads the mechanism's trade-off curve from."""
    from dp_accounting.pld import privacy_loss_distribution

    one = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=float(noise_multiplier), sampling_prob=float(min(sample_rate, 1.0)),
        value_discretization_interval=interval, pessimistic_estimate=True, use_connect_dots=True)
    return one.self_compose(int(steps))


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


def _replace_one_accountant(history, without_replacement):
    """dp-accounting's RDP accountant under the replace-one relation, holding fixed-size
    cohorts as sampling without replacement and every `history` entry as a plain Gaussian.

    Calibration. fedtune's noise multiplier z is the noise's standard deviation over the clip
    S: noise z * S on a sum of updates each clipped to S. dp-accounting takes a Gaussian's
    noise multiplier as the standard deviation over the sensitivity *under the accountant's
    neighbouring relation*, and `SampledWithoutReplacementDpEvent` uses it as is (Wang, Balle
    and Kasiviswanathan 2019, Theorem 27: the base mechanism's RDP is that of the Gaussian on
    the sample, for samples that differ in one replaced element). Replacing one user by
    another moves the sum by up to 2S (S one way, S the other), so the Gaussian passed is
    z / 2. Passing z would claim half the sensitivity and under-count (10 of 10 nodes, 5 a
    round, z = 1, 20 rounds, delta 0.01: 20.4, below the 29.97 that one pair of neighbouring
    federations already forces).

    `history` entries (sigma, q, steps) were charged under add/remove. Under replace-one the
    full-participation sum (q = 1) also moves by up to 2S, so Gaussian(sigma / 2) is exact for
    it; a Poisson entry (q < 1) is taken without amplification, an upper bound (the subsampled
    mechanism is a mixture of the full one and of doing nothing). No strategy mixes Poisson
    and fixed cohorts; this only keeps a ledger that ever did from under-counting."""
    import dp_accounting
    from dp_accounting import rdp

    counter = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for sigma, _, steps in history:
        if steps:
            counter.compose(dp_accounting.GaussianDpEvent(float(sigma) / 2), int(steps))
    for sigma, registered, size, rounds in without_replacement:
        if rounds:
            counter.compose(dp_accounting.SampledWithoutReplacementDpEvent(
                int(registered), int(size), dp_accounting.GaussianDpEvent(float(sigma) / 2)), int(rounds))
    return counter


def without_replacement_epsilon(history, without_replacement, delta: float) -> float:
    """Epsilon (replace-one) of fixed-size cohorts, each round `size` of `registered` users
    drawn without replacement, composed with `history` (see `_replace_one_accountant`).

    `without_replacement` holds (noise_multiplier, registered, size, rounds); only
    dp-accounting implements this bound (its RDP accountant), so it is the ledger's accountant
    whatever the ledger is named."""
    _check_delta(delta)
    return _cached_without_replacement(
        tuple((float(s), float(q), int(n)) for s, q, n in history),
        tuple((float(s), int(big), int(m), int(r)) for s, big, m, r in without_replacement), float(delta))


@lru_cache(maxsize=256)
def _cached_without_replacement(history: tuple, without_replacement: tuple, delta: float) -> float:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # one warning per fractional order it drops
    if not any(n for *_, n in history + without_replacement):
        return 0.0
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    events = [(_gaussian_rdp, (float(sigma),), int(steps)) for sigma, _, steps in history] + \
        [(_without_replacement_rdp, (float(sigma), int(big), int(m)), int(rounds))
         for sigma, big, m, rounds in without_replacement]
    orders, total = None, None
    for rdp_of, args, count in events:
        if not count:
            continue
        orders, curve = rdp_of(*args)
        total = count * curve if total is None else total + count * curve
    if total is None:
        return 0.0
    return float(compute_epsilon(orders, total, delta)[0])


# One event's RDP curve, computed once. A fixed cohort of m of N drawn without replacement
# costs dp-accounting ~0.2 s to evaluate at its orders, and the ledger's epsilon is asked
# again after every round (the server waited on it while every node idled, ~0.2 s a round);
# RDP composes by adding curves, so the composition of `count` rounds is `count` times the
# curve, exactly what the accountant's `compose(event, count)` adds (`_replace_one_accountant`
# builds the same sum through dp-accounting's own `compose`; a test holds the two equal).
@lru_cache(maxsize=256)
def _gaussian_rdp(sigma: float):
    return _one_event_rdp(("gaussian", sigma))


@lru_cache(maxsize=256)
def _without_replacement_rdp(sigma: float, registered: int, size: int):
    return _one_event_rdp(("without replacement", sigma, registered, size))


def _one_event_rdp(event: tuple):
    import dp_accounting
    from dp_accounting import rdp

    counter = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    gaussian = dp_accounting.GaussianDpEvent(event[1] / 2)  # z / 2: see `_replace_one_accountant`
    counter.compose(gaussian if event[0] == "gaussian" else
                    dp_accounting.SampledWithoutReplacementDpEvent(event[2], event[3], gaussian), 1)
    orders, curve = getattr(counter, "_orders", None), getattr(counter, "_rdp", None)
    if orders is None or curve is None:
        raise RuntimeError("dp-accounting's RdpAccountant no longer keeps _orders / _rdp: pin dp-accounting 0.6")
    return orders, curve.copy()


def _opacus_accountant(kind: str, history: History) -> "IAccountant":
    from opacus.accountants import PRVAccountant, RDPAccountant

    counter = RDPAccountant() if kind == "rdp" else PRVAccountant()
    counter.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return counter


def make_accountant(name: str, history: History = ()) -> "IAccountant":
    """A fresh Opacus accountant of the kind that records `name`'s training steps, holding
    `history` (for "pld", Opacus's nearest, PRV: Opacus only keeps the history during
    training)."""
    return _opacus_accountant(accountant_named(name).opacus_engine, list(history))


def _epsilon_of(name: str, history: list[tuple[float, float, int]], delta: float) -> float:
    return _cached_epsilon(name, tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@lru_cache(maxsize=1024)
def _cached_epsilon(name: str, history: tuple, delta: float) -> float:
    """Pure in its arguments, so memoised: a ledger asks the same question several times
    per training call (budget check, charge, save), and PRV takes ~0.1-1 s each."""
    if not any(steps for _, _, steps in history):
        return 0.0
    return accountant_named(name).epsilon(list(history), delta)


def independent_epsilon(name: str, history: list[tuple[float, float, int]], delta: float,
                        without_replacement: list[tuple[float, int, int, int]] = ()) -> float:
    """The same epsilon from the other library: Google's dp-accounting for Opacus ledgers
    (its RDP accountant for "rdp", its PLD accountant for "prv"), Opacus's PRV for "pld"
    ledgers, whose epsilon dp-accounting computes (all numeric
    methods agree with Opacus's to about 1%; RDP may differ where one library drops orders
    it cannot evaluate, always on the conservative side). A ledger with fixed-size cohorts
    (`without_replacement`) has one library that implements its bound, dp-accounting:
    recomputed here from the logged parameters, uncached."""
    if any(rounds for *_, rounds in without_replacement):
        import logging

        logging.getLogger("absl").setLevel(logging.ERROR)
        _check_delta(delta)
        return float(_replace_one_accountant(history, without_replacement).get_epsilon(delta))
    import logging

    # dp-accounting logs a warning for every fractional order it cannot evaluate and drops
    # (the epsilon is then conservative); one report would print hundreds of them
    logging.getLogger("absl").setLevel(logging.ERROR)
    _check_delta(delta)
    check = accountant_named(name).independent
    if not any(steps for _, _, steps in history):
        return 0.0
    return float(check(list(history), delta))


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
    entry = accountant_named(accountant)
    also = tuple((float(s), float(q), int(n)) for s, q, n in also if n)
    if not also and entry.opacus_bisection:
        return _cached_noise(float(target_epsilon), float(delta), float(sample_rate), int(steps), entry.opacus_engine)
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
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=accountant))
