"""Planning a node's DP training: the mechanism fixed once for all its planned calls.

The noise multiplier is calibrated once for the whole planned training (rounds x epochs x
steps, plus the metric releases the node's policy plans), never re-planned from a
restored accountant (which would silently overspend). The step count and sample rate are
exactly what runs and what Opacus accounts: ceil(n / B) Poisson steps at q = 1 / ceil(n / B).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config import Config
from fedtune.errors import ConfigError
from fedtune.privacy.accountants import noise_for_budget
from fedtune.privacy.ledger import PrivacyLedger


@dataclass(frozen=True)
class DPPlan:
    """The mechanism of every training call of one node, fixed for its whole training.

    `sample_rate` and `steps_per_epoch` are exactly what Opacus's Poisson loader uses
    (q = 1 / ceil(n / B), int(1 / q) steps per epoch), so the ledger charges what runs.
    `metric_releases_per_call` Gaussian releases (noise `metric_noise_multiplier`) are
    planned into the calibration, so a node that releases metrics stays within target.
    """

    private: bool
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    planned_calls: int
    delta: float
    target_epsilon: float
    max_grad_norm: float
    metric_releases_per_call: int = 0
    metric_noise_multiplier: float = 0.0

    @property
    def steps_per_call(self) -> int:
        return self.steps_per_epoch * self.epochs

    def to_dict(self) -> dict:
        return {**self.__dict__, "steps_per_call": self.steps_per_call}


def poisson_schedule(n_train: int, batch_size: int) -> tuple[float, int]:
    """(q, steps per epoch): ceil(n / B) steps at q = 1 / ceil(n / B), so one epoch draws
    n examples in expectation with an expected batch of about B."""
    if batch_size > n_train:
        raise ConfigError(f"training.batch_size = {batch_size}: expected at most the {n_train} training examples")
    steps = math.ceil(n_train / batch_size)
    return 1 / steps, steps


def plan_training(config: Config, n_train: int, delta: float | None = None, metric_releases_per_call: int = 0) -> DPPlan:
    """Calibrate the noise once for rounds x epochs x steps, so every later call fits.

    `delta` overrides the config's (a node accounts at the smaller of its own and its
    ledger's); `metric_releases_per_call` are planned Gaussian metric releases."""
    sample_rate, steps_per_epoch = poisson_schedule(n_train, config.training.batch_size)
    dp = config.dp
    delta = dp.resolved_delta(n_train) if delta is None else delta
    rounds = config.training.rounds
    total_steps = steps_per_epoch * config.training.epochs * rounds
    metric_sigma = config.node.metric_noise_multiplier
    releases = ((metric_sigma, 1.0, metric_releases_per_call * rounds),) if metric_releases_per_call else ()
    if not dp.enabled:
        sigma = 0.0
    elif dp.noise_multiplier > 0:
        sigma = dp.noise_multiplier
    else:
        sigma = noise_for_budget(dp.target_epsilon, delta, sample_rate, total_steps, dp.accountant, also=releases)
    return DPPlan(
        private=dp.enabled,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        epochs=config.training.epochs,
        planned_calls=rounds,
        delta=delta,
        target_epsilon=dp.target_epsilon,
        max_grad_norm=dp.max_grad_norm,
        metric_releases_per_call=metric_releases_per_call if dp.enabled else 0,
        metric_noise_multiplier=metric_sigma if metric_releases_per_call and dp.enabled else 0.0,
    )


def new_ledger(config: Config, plan: DPPlan, data_fingerprint: str = "") -> PrivacyLedger:
    """An empty ledger for this node: capped at the node's max_epsilon (no cap when the
    node trains without DP: its epsilon is infinite anyway)."""
    return PrivacyLedger(
        accountant=config.dp.accountant,
        delta=plan.delta,
        max_epsilon=config.max_epsilon if plan.private else None,
        data_fingerprint=data_fingerprint,
    )
