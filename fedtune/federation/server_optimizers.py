"""Server optimizers: what the server does with a round's aggregated update, one class each.

The aggregate (the mean update, or the user-level noisy mean) is a pseudo-gradient; a
server optimizer turns it into the new global adapter (Reddi et al. 2021):

* `FedAvg`: take the aggregate as it is.
* `FedAdam`: Adam on the update, bias-corrected exactly as Flower's FedAdam does it
  (eta x sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) in round t).
* `FedYogi`: Yogi's additive second moment, not bias-corrected, as in Flower.

Each holds its own state (the moments m and v, per tensor), which a checkpoint saves as
arrays named "m/<tensor>" and "v/<tensor>". Each also takes a distributed-DP round's
gradient step itself (`apply_gradient_step`), so no caller asks which optimizer runs.

`SERVER_OPTIMIZERS` is the one registry: `federation.server_optimizer` is validated
against it, and a new optimizer is one class and one entry here. Plain numpy; config
validation reads this module, so it never imports `fedtune.config`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np

from fedtune.errors import ConfigError

State = Mapping[str, np.ndarray]


class ServerOptimizer:
    """The common base: a learning rate, the moments a checkpoint keeps, and the
    distributed-DP step as a pseudo-update through `apply`."""

    def __init__(self, learning_rate: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        self.learning_rate = learning_rate
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def apply(self, global_state: State, aggregate: State, server_round: int = 1) -> "OrderedDict[str, np.ndarray]":
        """The new global tensors, from the current ones and the round's aggregate (the
        global plus the aggregated update), in the global tensors' dtypes."""
        raise NotImplementedError

    def apply_gradient_step(self, global_state: State, step: State,
                            server_round: int = 1) -> "OrderedDict[str, np.ndarray]":
        """A distributed-DP round: `step` is minus the noisy mean gradient, taken as the
        round's pseudo-update (an adaptive optimizer scales it by its own rates)."""
        target = OrderedDict((k, global_state[k] + step[k]) for k in global_state)
        return self.apply(global_state, target, server_round)

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.asarray(v) for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.asarray(v) for k, v in arrays.items() if k.startswith("v/")}


class FedAvg(ServerOptimizer):
    """Take the aggregate: the new global is the (noisy) mean update applied once."""

    def apply(self, global_state: State, aggregate: State, server_round: int = 1) -> "OrderedDict[str, np.ndarray]":
        return OrderedDict((k, np.asarray(aggregate[k]).astype(global_state[k].dtype)) for k in global_state)

    def apply_gradient_step(self, global_state: State, step: State,
                            server_round: int = 1) -> "OrderedDict[str, np.ndarray]":
        """Plain SGD at the server learning rate: a gradient, unlike a mean update, has no
        scale of its own."""
        return OrderedDict((k, (global_state[k] + self.learning_rate * step[k]).astype(global_state[k].dtype))
                           for k in global_state)


class AdaptiveOptimizer(ServerOptimizer):
    """FedAdam and FedYogi: the same first moment and step, each its own second moment and
    step size."""

    def step_size(self, server_round: int) -> float:
        return self.learning_rate

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, global_state: State, aggregate: State, server_round: int = 1) -> "OrderedDict[str, np.ndarray]":
        step = self.step_size(server_round)
        out = OrderedDict()
        for key, current in global_state.items():
            delta = aggregate[key].astype(np.float64) - current
            m = self.m.get(key, np.zeros_like(delta))
            v = self.v.get(key, np.zeros_like(delta))
            m = self.beta1 * m + (1 - self.beta1) * delta
            v = self.second_moment(v, delta)
            self.m[key], self.v[key] = m, v
            out[key] = (current + step * m / (np.sqrt(v) + self.tau)).astype(current.dtype)
        return out


class FedAdam(AdaptiveOptimizer):
    """Adam on the update, its step bias-corrected exactly as Flower's FedAdam does it:
    eta x sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) in round t."""

    def step_size(self, server_round: int) -> float:
        return self.learning_rate * (np.sqrt(1 - self.beta2 ** (server_round + 1.0))
                                     / (1 - self.beta1 ** (server_round + 1.0)))

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * delta**2


class FedYogi(AdaptiveOptimizer):
    """Yogi's second moment, which moves towards delta^2 by a fixed share of it (so it
    grows slowly after a large update); not bias-corrected, as in Flower."""

    def second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return v - (1 - self.beta2) * delta**2 * np.sign(v - delta**2)


# name -> optimizer class; chosen by `federation.server_optimizer`
SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    "fedavg": FedAvg,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def server_optimizer(name: str, learning_rate: float) -> ServerOptimizer:
    """The registered optimizer `name` at `learning_rate`, or a one-line ConfigError."""
    if name not in SERVER_OPTIMIZERS:
        error = ConfigError(f"federation.server_optimizer = {name!r}: expected one of {', '.join(SERVER_OPTIMIZERS)}")
        error.key = "federation.server_optimizer"
        raise error
    return SERVER_OPTIMIZERS[name](learning_rate)
