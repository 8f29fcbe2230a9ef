"""Epsilon of distributed discrete Gaussian steps: Poisson-subsampled, composed, per record.

A distributed step (`fedtune.privacy.ddgauss`) releases the sum over at least n honest
nodes of integer vectors, each node's vector its Poisson batch's conditionally rounded
examples plus N_Z(0, sigma^2) noise. For a record of one node (sampled with that node's
rate q), it is a Poisson-subsampled mechanism whose base is the sum of n discrete
Gaussians with L2 sensitivity Delta2. Two published bounds compose it:

* The base (Kairouz, Liu and Steinke 2021, Proposition 14, the Renyi form): for alpha > 1,
  D_alpha <= min{ alpha Delta2^2 / (2 n sigma^2) + tau d,
                  (alpha / 2) (Delta2 / (sqrt(n) sigma) + tau sqrt(d))^2 },
  tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1)), d the dimension. With z the
  noise over Delta2 of the n shares together (z^2 = n sigma^2 / Delta2^2) and tau -> 0 this
  is alpha / (2 z^2), the Gaussian's.
* Poisson subsampling for a base mechanism known only by its RDP curve (Zhu and Wang,
  "Poisson Subsampled Renyi Differential Privacy", ICML 2019, Theorem 6, the general upper
  bound), for integer alpha >= 2:
  (alpha - 1) eps(alpha) <= log{ (1-q)^(alpha-1) (alpha q - q + 1)
                                 + C(alpha, 2) q^2 (1-q)^(alpha-2) e^{eps_0(2)}
                                 + 3 sum_{l=3}^{alpha} C(alpha, l) q^l (1-q)^(alpha-l) e^{(l-1) eps_0(l)} }.
  It holds for any base mechanism, so it does not lean on the discrete Gaussian sum being
  Gaussian; it is looser than the sampled Gaussian's exact RDP (the factor 3), which this
  project pays rather than assume more.

Steps compose by adding RDP at each integer order; a ledger's ordinary (sampled Gaussian)
steps join at the same orders through dp-accounting's RDP accountant, and the sum converts
to (epsilon, delta) by dp-accounting's conversion (Canonne, Kamath and Steinke 2020). The
same path is what the Google and FL4Health DDGauss accountants take; tests recompute it
independently in exact arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from fedtune.errors import ConfigError
from fedtune.privacy.ddgauss import DDGaussSpec

ORDERS = tuple(range(2, 257))  # integer orders: the subsampling bound is stated for them


@dataclass(frozen=True)
class DistributedSteps:
    """Steps of the distributed mechanism as a ledger records them: noise multiplier z over
    Delta2 carried by the honest shares counted, tau of Proposition 14, the dimension, the
    record's Poisson rate q, and how many steps."""

    noise_multiplier: float
    tau: float
    dim: int
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"distributed noise multiplier = {self.noise_multiplier!r}: expected a number > 0")
        if not (0 < self.sample_rate <= 1):
            raise ConfigError(f"distributed sample rate = {self.sample_rate!r}: expected a number in (0, 1]")
        if self.tau < 0 or self.dim < 1 or self.steps < 0:
            raise ConfigError(f"distributed steps {self!r}: tau >= 0, dim >= 1 and steps >= 0 expected")

    def as_tuple(self) -> tuple:
        return (float(self.noise_multiplier), float(self.tau), int(self.dim), float(self.sample_rate), int(self.steps))


def tau(local_stddev: float, shares: int) -> float:
    """Kairouz et al. 2021, Proposition 14: the distance of a sum of `shares` discrete
    Gaussians N_Z(0, sigma^2) from one discrete Gaussian, in the bound's units."""
    return 10 * sum(math.exp(-2 * math.pi ** 2 * local_stddev ** 2 * k / (k + 1)) for k in range(1, shares))


def steps_for(spec: DDGaussSpec, sample_rate: float, steps: int, colluders: int = 0) -> DistributedSteps:
    """The record-level mechanism of `steps` steps of `spec` for a record sampled at
    `sample_rate`, when `colluders` of the t contributors pool their shares with the server
    (their noise is then known and subtracted: t - colluders honest shares remain)."""
    honest = spec.contributors - colluders
    if honest < 1:
        raise ConfigError(f"{colluders} colluders of {spec.contributors} contributors leave no honest noise share")
    z = spec.noise_multiplier * math.sqrt(honest / spec.contributors)
    return DistributedSteps(z, tau(spec.local_stddev, honest), spec.padded_dim, float(sample_rate), int(steps))


def base_rdp(entry: DistributedSteps, order: int) -> float:
    """Proposition 14's Renyi bound of one unsampled step at `order`."""
    z, t, d = entry.noise_multiplier, entry.tau, entry.dim
    return min(order / (2 * z * z) + t * d, order / 2 * (1 / z + t * math.sqrt(d)) ** 2)


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def subsampled_rdp(entry: DistributedSteps, order: int) -> float:
    """Zhu and Wang 2019, Theorem 6 (general upper bound), one step at integer `order`."""
    q, a = entry.sample_rate, order
    if q == 1:
        return base_rdp(entry, a)
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(a - 1) * log_1q + math.log(a * q - q + 1),
             _log_comb(a, 2) + 2 * log_q + (a - 2) * log_1q + base_rdp(entry, 2)]
    terms += [math.log(3) + _log_comb(a, l) + l * log_q + (a - l) * log_1q + (l - 1) * base_rdp(entry, l)
              for l in range(3, a + 1)]
    return _logsumexp(terms) / (a - 1)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


@lru_cache(maxsize=4096)
def _rdp_curve(entry: tuple) -> tuple[float, ...]:
    steps = DistributedSteps(*entry)
    return tuple(steps.steps * subsampled_rdp(steps, a) for a in ORDERS)


def rdp_curve(entries: list[tuple], gaussian_history: list[tuple[float, float, int]] = ()) -> list[float]:
    """The composed RDP at `ORDERS` of distributed `entries` (DistributedSteps tuples) and
    ordinary Poisson-subsampled Gaussian steps (sigma, q, steps), add/remove."""
    total = [0.0] * len(ORDERS)
    for entry in entries:
        if entry[4]:
            total = [x + y for x, y in zip(total, _rdp_curve(tuple(entry)))]
    if any(n for *_, n in gaussian_history):
        import dp_accounting
        from dp_accounting import rdp

        counter = rdp.RdpAccountant(orders=[float(a) for a in ORDERS])
        for sigma, q, steps in gaussian_history:
            if steps:
                event = dp_accounting.GaussianDpEvent(float(sigma))
                counter.compose(event if q >= 1 else dp_accounting.PoissonSampledDpEvent(float(q), event), int(steps))
        total = [x + float(y) for x, y in zip(total, counter._rdp)]  # dp-accounting keeps no public getter
    return total


def epsilon(entries: list[tuple], delta: float, gaussian_history: list[tuple[float, float, int]] = ()) -> float:
    """(epsilon, delta) of everything in `entries` and `gaussian_history`, composed."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    curve = rdp_curve(entries, gaussian_history)
    if not any(curve):
        return 0.0
    return float(compute_epsilon([float(a) for a in ORDERS], curve, float(delta))[0])


def noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int, dim: int,
                     spent: list[tuple] = (), gaussian_history: list[tuple[float, float, int]] = ()) -> float:
    """The smallest noise multiplier z (over Delta2, tau taken as 0, which is what shares of
    the sizes fedtune plans give: tau < 1e-100) whose `steps` steps at `sample_rate`, after
    what is `spent`, stay within `target_epsilon`. Bisection on the accountant itself."""
    def eps(z: float) -> float:
        return epsilon(list(spent) + [DistributedSteps(z, 0.0, dim, sample_rate, steps).as_tuple()], delta,
                       gaussian_history)

    low, high = 0.05, 1.0
    while eps(high) > target_epsilon:
        high *= 2
        if high > 1e4:
            raise ConfigError(f"epsilon {target_epsilon} cannot be met at q = {sample_rate}, {steps} steps, "
                              f"delta {delta:g}: what is already spent leaves too little")
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return high


def with_colluders(entry: tuple, contributors: int, colluders: int, local_stddev: float) -> tuple:
    """A logged entry (z, tau, dim, q, steps) of t = `contributors` shares of standard
    deviation `local_stddev` each, recomputed for when `colluders` of them pool their shares
    with the server: z shrinks by sqrt((t - c) / t) and tau is that of t - c shares."""
    honest = contributors - colluders
    if honest < 1:
        raise ConfigError(f"{colluders} colluders of {contributors} contributors leave no honest noise share")
    z, _, dim, rate, steps = entry
    return (float(z) * math.sqrt(honest / contributors), tau(local_stddev, honest), int(dim), float(rate), int(steps))


def colluding_epsilons(entries: list[tuple], contributors: int, local_stddev: float, delta: float,
                       gaussian_history: list[tuple[float, float, int]] = ()) -> dict[int, float]:
    """A ledger's epsilon if c = 0, 1 or t/2 of its t contributors collude with the server
    (their noise known and subtracted), from the logged parameters alone."""
    out = {}
    for colluders in sorted({0, min(1, contributors - 1), contributors // 2}):
        recomputed = [with_colluders(e, contributors, colluders, local_stddev) for e in entries]
        out[colluders] = epsilon(recomputed, delta, gaussian_history)
    return out


def collusion_epsilons(spec: DDGaussSpec, sample_rate: float, steps: int, delta: float,
                       spent: list[tuple] = ()) -> dict[int, float]:
    """Epsilon after `steps` more steps if c contributors collude with the server (their
    shares subtracted), for c = 0, 1 and t/2: what a node's privacy report shows."""
    out = {}
    for colluders in sorted({0, min(1, spec.contributors - 1), spec.contributors // 2}):
        if spec.contributors - colluders >= 1:
            out[colluders] = epsilon(list(spent) + [steps_for(spec, sample_rate, steps, colluders).as_tuple()], delta)
    return out
