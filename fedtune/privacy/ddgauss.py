"""The distributed discrete Gaussian mechanism (DDGauss) for one DP-SGD step over secure aggregation.

Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021 (arXiv 2102.06387), Algorithm 1. Each node
holds the per-example gradients of its own Poisson batch and sends one vector of integers
modulo 2^bits through SecAgg+; the server learns only the modular sum, decodes it, and
steps. Per node, in order:

1. clip each example's gradient to L2 norm C (float domain);
2. rotate it with a randomised Hadamard transform H D (D: random signs from a public seed),
   padding to a power of two: the coordinates of a rotated vector are small and alike, so
   the modular sum rarely wraps (the rotation is public; privacy does not depend on it);
3. scale by 1/gamma and round each coordinate stochastically, *conditionally*: redraw the
   rounding until the rounded vector's norm is at most Delta2 (the paper's eq. for the
   norm bound with beta = exp(-1/2), its recommended value), so that one example moves
   the node's integer sum by at most Delta2 in L2, whatever the rounding drew;
4. sum the rounded examples, add this node's noise share, N_Z(0, sigma_local^2) per
   coordinate, drawn exactly by OpenDP from a cryptographically secure source (the node
   never learns any other node's share), and reduce modulo 2^bits.

Why rounding per example: rounding the node's sum instead would let one example move the
rounded sum by up to C/gamma + sqrt(d) (every coordinate may round the other way), a
sensitivity far above Delta2. Per example, the rounding of the other rows is independent of
the one added or removed, so the node's sum differs by exactly one rounded example.

sigma_local = z Delta2 / sqrt(t): t honest shares sum to variance z^2 Delta2^2, noise
multiplier z against the sensitivity Delta2. The sum of discrete Gaussians is not exactly a
discrete Gaussian; the paper's Proposition 14 bounds the gap with tau, which the accountant
(`fedtune.privacy.ddgauss_accounting`) includes. The server (`decode`) reduces the sum to
[-2^(bits-1), 2^(bits-1)), multiplies by gamma and undoes the rotation: the noisy sum of
the clipped gradients of every contributing node's batch.

Everything public here (C, gamma, bits, t, z, dim, the rotation seed) is announced by the
server and checked by each node against its own policy; only the rounding and the noise
are the node's secrets.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from fedtune.errors import ConfigError

# The conditional-rounding failure bound the paper uses (Section 5: beta = exp(-1/2)). A
# smaller beta loosens Delta2; the rounding is redrawn until it holds, so beta affects only
# how often a redraw happens, never the guarantee.
ROUNDING_BETA = math.exp(-0.5)
MAX_BITS = 26  # Flower's SecAgg+ sums modulo 2^32: n vectors of 2^bits must fit (see server/secagg.py)
MAX_ROUNDING_TRIES = 1000


def padded_dim(dim: int) -> int:
    """The smallest power of two >= dim: the Hadamard transform's length."""
    return 1 << max(0, (int(dim) - 1).bit_length())


@dataclass(frozen=True)
class DDGaussSpec:
    """The public parameters of one distributed round, as the server announces them.

    clip: per-example L2 bound C; granularity: gamma, the float value of one integer step;
    bits: the sum is taken modulo 2^bits; contributors: t, the fewest honest noise shares
    that carry the whole noise; noise_multiplier: z, the total noise's standard deviation
    over the sensitivity Delta2 (integer domain); dim: the flattened update's length."""

    clip: float
    granularity: float
    bits: int
    contributors: int
    noise_multiplier: float
    dim: int

    def __post_init__(self) -> None:
        for name in ("clip", "granularity", "noise_multiplier"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"distributed DP {name} = {value!r}: expected a finite number > 0")
        if not (isinstance(self.bits, int) and 8 <= self.bits <= MAX_BITS):
            raise ConfigError(f"distributed DP bits = {self.bits!r}: expected a whole number in [8, {MAX_BITS}]")
        if not (isinstance(self.contributors, int) and self.contributors >= 1):
            raise ConfigError(f"distributed DP contributors = {self.contributors!r}: expected a whole number >= 1")
        if not (isinstance(self.dim, int) and self.dim >= 1):
            raise ConfigError(f"distributed DP dim = {self.dim!r}: expected a whole number >= 1")

    @property
    def padded_dim(self) -> int:
        return padded_dim(self.dim)

    @property
    def norm_bound(self) -> float:
        """Delta2: the L2 bound of one conditionally rounded example (integer domain).

        Kairouz et al. 2021, Theorem 1: Delta2^2 = min{ c^2/gamma^2 + d/4 + sqrt(2 ln(1/beta))
        (c/gamma + sqrt(d)/2), (c/gamma + sqrt(d))^2 }, d the (padded) dimension."""
        scaled, d = self.clip / self.granularity, self.padded_dim
        first = scaled ** 2 + d / 4 + math.sqrt(2 * math.log(1 / ROUNDING_BETA)) * (scaled + math.sqrt(d) / 2)
        return math.sqrt(min(first, (scaled + math.sqrt(d)) ** 2))

    @property
    def rounding_inflation(self) -> float:
        """Delta2 over C/gamma: how much rounding widens the sensitivity (1.0 = not at all).
        The node refuses a granularity that wastes its budget on rounding."""
        return self.norm_bound / (self.clip / self.granularity)

    @property
    def local_stddev(self) -> float:
        """sigma_local = z Delta2 / sqrt(t): t such shares sum to the planned noise."""
        return self.noise_multiplier * self.norm_bound / math.sqrt(self.contributors)

    @property
    def effective_noise_multiplier(self) -> float:
        """The total noise's standard deviation over the clip C, in the float domain: z
        shrunk by the rounding inflation (what central DP-SGD would call sigma)."""
        return self.noise_multiplier / self.rounding_inflation

    def to_dict(self) -> dict:
        return {"clip": self.clip, "granularity": self.granularity, "bits": self.bits,
                "contributors": self.contributors, "noise_multiplier": self.noise_multiplier, "dim": self.dim}

    @classmethod
    def from_dict(cls, data: dict) -> "DDGaussSpec":
        try:
            return cls(clip=float(data["clip"]), granularity=float(data["granularity"]), bits=int(data["bits"]),
                       contributors=int(data["contributors"]), noise_multiplier=float(data["noise_multiplier"]),
                       dim=int(data["dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"distributed DP parameters: {exc!r} (expected clip, granularity, bits, contributors, "
                              "noise_multiplier, dim)") from None


def granularity_for(clip: float, bits: int, dim: int, expected_examples: float, noise_multiplier: float,
                    stddevs: float = 4.0) -> float:
    """A gamma that keeps the modular sum from wrapping with high probability.

    After rotation each coordinate of a clipped example is about C sqrt(2 ln(2d)) / sqrt(d)
    at most (with high probability; Kairouz et al., Section 4), so `expected_examples`
    aligned examples reach that many times it; the noise adds `stddevs` x z x Delta2. The
    sum must stay inside +-2^(bits-1). Solved for C/gamma (Delta2 ~ C/gamma), halved for
    slack: a wrap is a utility loss, never a privacy one (the modulus is post-processing)."""
    d = padded_dim(dim)
    per_example = math.sqrt(2 * math.log(2 * d)) / math.sqrt(d)
    scaled = 2 ** (bits - 1) / (2 * (2 * expected_examples * per_example + stddevs * noise_multiplier * 1.01))
    return clip / scaled


# Integer steps per clip: C / gamma. 1000 keeps the rounding's share of the sensitivity
# under 0.2% for the dimensions of adapters (d/4 next to 10^6 in Delta2^2), and the
# noise shares small integers, which the exact sampler draws fast.
STEPS_PER_CLIP = 1000


def choose_granularity(clip: float, bits: int, dim: int, expected_examples: float, noise_multiplier: float) -> float:
    """The server's gamma: C / STEPS_PER_CLIP, or coarser when that would let the modular sum
    wrap (`granularity_for`)."""
    return max(clip / STEPS_PER_CLIP, granularity_for(clip, bits, dim, expected_examples, noise_multiplier))


# -- rotation -------------------------------------------------------------------------------
def _hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform along the last axis (length a power of 2)."""
    x = np.array(x, dtype=np.float64, copy=True)
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = x[..., 0, :].copy(), x[..., 1, :].copy()
        x[..., 0, :], x[..., 1, :] = a + b, a - b
        x = x.reshape(*lead, n)
        h *= 2
    return x / math.sqrt(n)


def _signs(seed: int, length: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & (2 ** 63 - 1), 0x44444747])).choice(
        np.array([-1.0, 1.0]), size=length)


def rotate(vectors: np.ndarray, seed: int) -> np.ndarray:
    """H D x for each row (padded with zeros to a power of two): orthonormal, so norms keep."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float64))
    d = padded_dim(vectors.shape[-1])
    padded = np.zeros((vectors.shape[0], d))
    padded[:, :vectors.shape[-1]] = vectors
    return _hadamard(padded * _signs(seed, d))


def unrotate(vector: np.ndarray, seed: int, dim: int) -> np.ndarray:
    """The inverse of `rotate` for one vector: D H y (H is its own inverse), cut to `dim`."""
    vector = np.asarray(vector, dtype=np.float64)
    return (_hadamard(vector) * _signs(seed, vector.shape[-1]))[..., :dim]


# -- the node's side ---------------------------------------------------------------------------
def clip_rows(rows: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled to L2 norm at most `clip` (Opacus's flat per-sample clipping)."""
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    norms = np.linalg.norm(rows, axis=1)
    return rows * np.minimum(1.0, clip / np.maximum(norms, 1e-12))[:, None]


def conditional_round(scaled: np.ndarray, bound: float, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of each row, redrawn until the row's L2 norm is <= `bound`
    (Kairouz et al., Algorithm 1, "conditional randomized rounding")."""
    scaled = np.atleast_2d(scaled)
    floor = np.floor(scaled)
    frac = scaled - floor
    out = np.empty_like(floor)
    todo = np.arange(scaled.shape[0])
    for _ in range(MAX_ROUNDING_TRIES):
        draw = floor[todo] + (rng.random(frac[todo].shape) < frac[todo])
        fits = np.linalg.norm(draw, axis=1) <= bound
        out[todo[fits]] = draw[fits]
        todo = todo[~fits]
        if not len(todo):
            return out.astype(np.int64)
    raise RuntimeError(f"conditional rounding found no draw within the norm bound {bound:.3f} in "
                       f"{MAX_ROUNDING_TRIES} tries (a clipped row cannot exceed it this often)")


def rounding_generator() -> np.random.Generator:
    """The rounding's randomness: fresh OS entropy per call (never seeded by the server)."""
    return np.random.default_rng(secrets.randbits(128))


def encode_examples(gradients: np.ndarray, spec: DDGaussSpec, rotation_seed: int,
                    rng: np.random.Generator | None = None) -> np.ndarray:
    """The node's integer sum: each row clipped to C, rotated, scaled by 1/gamma and
    conditionally rounded, then summed (int64, length `spec.padded_dim`). An empty batch
    gives zeros (the noise still goes on: `noise_share`)."""
    gradients = np.asarray(gradients, dtype=np.float64).reshape(-1, spec.dim) if np.size(gradients) else \
        np.zeros((0, spec.dim))
    if not len(gradients):
        return np.zeros(spec.padded_dim, dtype=np.int64)
    rotated = rotate(clip_rows(gradients, spec.clip), rotation_seed) / spec.granularity
    rounded = conditional_round(rotated, spec.norm_bound, rng or rounding_generator())
    return rounded.sum(axis=0)


def noise_share(spec: DDGaussSpec) -> np.ndarray:
    """This node's share: N_Z(0, sigma_local^2) on every coordinate, sampled exactly by
    OpenDP (Canonne, Kamath and Steinke's discrete Gaussian sampler, OpenDP's secure
    randomness). OpenDP's vector Gaussian on integers is that sampler applied per coordinate."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    measurement = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=int)), dp.l2_distance(T=int),
                                     scale=float(spec.local_stddev))
    return np.asarray(measurement([0] * spec.padded_dim), dtype=np.int64)


def to_modular(vector: np.ndarray, bits: int) -> np.ndarray:
    """An integer vector reduced to [0, 2^bits)."""
    return np.mod(np.asarray(vector, dtype=np.int64), 1 << bits)


def contribution(gradients: np.ndarray, spec: DDGaussSpec, rotation_seed: int,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """What one node sends into secure aggregation: (encoded sum + noise share) mod 2^bits."""
    return to_modular(encode_examples(gradients, spec, rotation_seed, rng) + noise_share(spec), spec.bits)


# -- the server's side --------------------------------------------------------------------------
def centered(modular_sum: np.ndarray, bits: int) -> np.ndarray:
    """The modular sum mapped to [-2^(bits-1), 2^(bits-1)): the signed integer sum when it did
    not wrap."""
    modulus = 1 << bits
    value = np.mod(np.asarray(modular_sum, dtype=np.int64), modulus)
    return np.where(value >= modulus // 2, value - modulus, value)


def decode(modular_sum: np.ndarray, spec: DDGaussSpec, rotation_seed: int) -> np.ndarray:
    """The noisy sum of every contributor's clipped gradients (float, length `spec.dim`)."""
    return unrotate(centered(modular_sum, spec.bits) * spec.granularity, rotation_seed, spec.dim)


def wrapped_share(modular_sum: np.ndarray, bits: int, margin: float = 0.95) -> float:
    """The share of coordinates whose centred value sits within (1 - margin) of the
    modulus edge: a run that shows many is wrapping and needs a coarser gamma or more bits."""
    limit = margin * (1 << (bits - 1))
    return float(np.mean(np.abs(centered(modular_sum, bits)) >= limit))
