"""Server-side math of a federated round, in plain numpy (no Flower).

* `check_update`: a client reply must have the global adapter's names, shapes and dtypes,
  finite values, and an update (reply - global) under a norm bound; otherwise it is left
  out with a reason.
* `weighted_mean`: FedAvg, weights = examples. In FFA-LoRA mode only B travels and every
  client shares the same frozen A, so mean(B_i) A = mean(B_i A): the aggregate is exact.
* `ServerOptimizer`: FedAdam / FedYogi (Reddi et al. 2021) on the averaged update, with a
  state that checkpoints.
* `dp_fedavg`: user-level DP (McMahan et al. 2018): clip each client's update to S, average
  with equal weights, add N(0, (z S / m)^2) with m the expected cohort size.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def update_norm(update: State, reference: State) -> float:
    """Global L2 norm of `update - reference` over all tensors."""
    return float(np.sqrt(sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in reference)))


def check_update(update: State, reference: State, max_update_norm: float | None) -> str | None:
    """Why `update` must be left out, or None when it is acceptable."""
    missing = [k for k in reference if k not in update]
    if missing:
        return f"missing tensor {missing[0]} ({len(missing)} missing)"
    extra = [k for k in update if k not in reference]
    if extra:
        return f"unexpected tensor {extra[0]}"
    for key, expected in reference.items():
        got = update[key]
        if tuple(got.shape) != tuple(expected.shape):
            return f"tensor {key} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"tensor {key} has dtype {got.dtype}, expected {expected.dtype}"
        if not np.all(np.isfinite(got)):
            return f"tensor {key} has non-finite values"
    if max_update_norm is not None:
        norm = update_norm(update, reference)
        if norm > max_update_norm:
            return f"update norm {norm:.4g} exceeds the bound {max_update_norm:g}"
    return None


def weighted_mean(states: Sequence[State], weights: Sequence[float]) -> "OrderedDict[str, np.ndarray]":
    """Per-tensor weighted mean (FedAvg); weights need not be normalised."""
    if not states:
        raise ValueError("no states to average")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    out = OrderedDict()
    for key, first in states[0].items():
        acc = np.zeros(first.shape, dtype=np.float64)
        for state, weight in zip(states, weights):
            acc += state[key].astype(np.float64) * (weight / total)
        out[key] = acc.astype(first.dtype)
    return out


@dataclass
class ServerOptimizer:
    """FedAvg (`kind="fedavg"`: take the aggregate), FedAdam or FedYogi on the update."""

    kind: str = "fedavg"
    learning_rate: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)

    KINDS = ("fedavg", "fedadam", "fedyogi")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"server optimizer {self.kind!r}: expected one of {', '.join(self.KINDS)}")

    def apply(self, global_state: State, aggregate: State) -> "OrderedDict[str, np.ndarray]":
        if self.kind == "fedavg":
            return OrderedDict((k, np.asarray(v)) for k, v in aggregate.items())
        out = OrderedDict()
        for key, current in global_state.items():
            delta = aggregate[key].astype(np.float64) - current
            m = self.m.get(key, np.zeros_like(delta))
            v = self.v.get(key, np.zeros_like(delta))
            m = self.beta1 * m + (1 - self.beta1) * delta
            if self.kind == "fedadam":
                v = self.beta2 * v + (1 - self.beta2) * delta**2
            else:
                v = v - (1 - self.beta2) * delta**2 * np.sign(v - delta**2)
            self.m[key], self.v[key] = m, v
            out[key] = (current + self.learning_rate * m / (np.sqrt(v) + self.tau)).astype(current.dtype)
        return out

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.asarray(v) for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v) for k, v in arrays.items() if k.startswith("v/")}


def clip_update(update: State, reference: State, clip_norm: float) -> "OrderedDict[str, np.ndarray]":
    """`reference + (update - reference) * min(1, S / ||update - reference||)`."""
    norm = update_norm(update, reference)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return OrderedDict((k, reference[k] + (update[k].astype(np.float64) - reference[k]) * scale) for k in reference)


def dp_fedavg(
    states: Sequence[State],
    reference: State,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: int,
    rng: np.random.Generator,
) -> "OrderedDict[str, np.ndarray]":
    """User-level DP aggregate: clipped updates, equal weights, Gaussian noise.

    Dividing the noisy sum by the *expected* cohort size (not the realised one) keeps the
    sensitivity of the mean at S / m whatever the sampling draws (fixed-denominator
    estimator of McMahan et al. 2018).
    """
    total = OrderedDict((k, np.zeros(v.shape, np.float64)) for k, v in reference.items())
    for state in states:
        for key, value in clip_update(state, reference, clip_norm).items():
            total[key] += value - reference[key]
    out = OrderedDict()
    for key, value in total.items():
        noise = rng.normal(0.0, noise_multiplier * clip_norm, size=value.shape)
        out[key] = (reference[key] + (value + noise) / expected_clients).astype(reference[key].dtype)
    return out
