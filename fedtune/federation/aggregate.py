"""Server-side math of a federated round, in plain numpy (no Flower). Pure functions on
named tensors; `fedtune.federation.strategy` decides which of them a round uses.

* `check_update`: a client reply must have the global adapter's names, shapes and dtypes,
  finite values, and an update (reply - global) under a norm bound; otherwise it is left
  out with a reason.
* Aggregators of updates (registry `AGGREGATORS`): the weighted mean (FedAvg: in FFA-LoRA
  mode only B travels and every client shares the same frozen A, so mean(B_i) A =
  mean(B_i A) and the aggregate is exact), and the coordinate-wise median and trimmed mean
  (unweighted, as Flower's FedMedian and FedTrimmedAvg compute them).
* Robustness: `capped_weights` (no reply weighs more than a multiple of the round's median
  example count) and `clip_to` (an update's norm at most a bound).
* User-level DP (McMahan et al. 2018) in two separate steps, as pfl-research separates
  them, so secure aggregation can sit between them: `constrain_sensitivity` (each node's
  update clipped to S) and `add_noise` (N(0, (z S)^2) on the sum, divided by the expected
  cohort size); `sum_updates` is the sum between them, which SecAgg+ computes instead when
  it runs.
* Server optimizers (FedAvg, FedAdam, FedYogi) live in `fedtune.federation.server_optimizers`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


def update_norm(update: State, reference: State) -> float:
    """Global L2 norm of `update - reference` over all tensors."""
    return float(np.sqrt(sum(float(np.sum((update[k].astype(np.float64) - reference[k]) ** 2)) for k in reference)))


def norm(state: State) -> float:
    return float(np.sqrt(sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in state.values())))


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
        size = update_norm(update, reference)
        if size > max_update_norm:
            return f"update norm {size:.4g} exceeds the bound {max_update_norm:g}"
    return None


def deltas(states: Sequence[State], reference: State) -> list["OrderedDict[str, np.ndarray]"]:
    """Each reply minus the global adapter, in float64."""
    return [OrderedDict((k, state[k].astype(np.float64) - reference[k]) for k in reference) for state in states]


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


def coordinate_median(states: Sequence[State], weights: Sequence[float] = ()) -> "OrderedDict[str, np.ndarray]":
    """Coordinate-wise median, unweighted (Flower's `aggregate_median`)."""
    return OrderedDict((k, np.median(np.stack([s[k] for s in states]), axis=0)) for k in states[0])


def trimmed_mean(states: Sequence[State], weights: Sequence[float] = (),
                 cut: float = 0.2) -> "OrderedDict[str, np.ndarray]":
    """Coordinate-wise mean after dropping the `cut` share at each end, unweighted (Flower's
    `aggregate_trimmed_avg`, itself scipy's `trim_mean`)."""
    if not 0 <= cut < 0.5:
        raise ValueError(f"trim fraction {cut}: expected a number in [0, 0.5)")
    low = int(cut * len(states))
    high = len(states) - low
    out = OrderedDict()
    for key in states[0]:
        stacked = np.partition(np.stack([s[key] for s in states]), (low, high - 1), axis=0)
        out[key] = np.mean(stacked[low:high], axis=0)
    return out


# name -> aggregator(states, weights) over updates; chosen by `federation.aggregator`
AGGREGATORS: dict[str, Callable[..., "OrderedDict[str, np.ndarray]"]] = {
    "mean": weighted_mean,
    "median": coordinate_median,
    "trimmed-mean": trimmed_mean,
}


def capped_weights(claimed: Sequence[float], cap: float) -> list[float]:
    """Example counts as FedAvg weights, none above `cap` x the round's median claim (0 =
    no cap): a node claiming a billion rows weighs like `cap` typical nodes, not all."""
    if cap <= 0 or not claimed:
        return [float(c) for c in claimed]
    limit = cap * float(np.median(claimed))
    return [float(min(c, limit)) for c in claimed]


def clip_to(update: State, bound: float) -> "OrderedDict[str, np.ndarray]":
    """`update * min(1, bound / ||update||)`: direction kept, norm at most `bound`."""
    size = norm(update)
    scale = min(1.0, bound / size) if size > 0 else 1.0
    return OrderedDict((k, np.asarray(v, np.float64) * scale) for k, v in update.items())


def constrain_sensitivity(updates: Sequence[State], clip_norm: float) -> list["OrderedDict[str, np.ndarray]"]:
    """User-level DP, step 1: every node's update clipped to S, so one node moves the sum
    by at most S."""
    return [clip_to(update, clip_norm) for update in updates]


def sum_updates(updates: Sequence[State], reference: State) -> "OrderedDict[str, np.ndarray]":
    """The per-tensor sum of `updates` in float64, in `reference`'s order (zeros for none):
    the clipped sum that user-level DP releases."""
    return OrderedDict((k, sum((np.asarray(u[k], np.float64) for u in updates), np.zeros(np.shape(v), np.float64)))
                       for k, v in reference.items())


def add_noise(updates: Sequence[State], reference: State, clip_norm: float, noise_multiplier: float,
              expected_clients: float, rng: np.random.Generator) -> "OrderedDict[str, np.ndarray]":
    """User-level DP, step 2: N(0, (z S)^2) on the sum, divided by the *expected* cohort
    size (not the realised one), so the mean's sensitivity stays S / m whatever the
    sampling draws (fixed-denominator estimator of McMahan et al. 2018)."""
    out = OrderedDict()
    for key, value in reference.items():
        total = sum((np.asarray(u[key], np.float64) for u in updates), np.zeros(value.shape, np.float64))
        out[key] = (total + rng.normal(0.0, noise_multiplier * clip_norm, size=value.shape)) / expected_clients
    return out


def unflatten(vector: np.ndarray, shapes: "OrderedDict[str, tuple]") -> "OrderedDict[str, np.ndarray]":
    """A flat vector back into named tensors of `shapes` (in their order)."""
    out, start = OrderedDict(), 0
    for key, shape in shapes.items():
        size = int(np.prod(shape)) if len(shape) else 1
        out[key] = np.asarray(vector[start:start + size]).reshape(shape)
        start += size
    if start != len(vector):
        raise ValueError(f"a flat vector of {len(vector)} values for tensors of {start} values")
    return out
