"""One local training call under DP-SGD (Opacus), or explicitly without DP.

The call is the unit the privacy ledger charges. Its order is the privacy contract:

1. plan the mechanism (noise, sample rate, steps) and charge the ledger, which refuses
   with `BudgetExhaustedError` if the call would exceed the target;
2. persist the ledger durably (write-ahead: a crash from here on over-counts, never
   under-counts);
3. attach Opacus to the model for this call only (`wrap_model=False`) and train;
4. remove every hook and per-sample attribute (no growth across calls, opacus#608);
5. check that Opacus's own accountant saw exactly the charged steps, and that the
   adapter really changed (opacus#820).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, Dataset

from fedtune.config import Config
from fedtune.errors import AdapterNotUpdatedError, ConfigError
from fedtune.losses import PerExampleLoss, trim_batch
from fedtune.model import trainable_named_parameters
from fedtune.privacy import PrivacyLedger, noise_for_budget


@dataclass(frozen=True)
class DPPlan:
    """The mechanism of every training call of one node, fixed for its whole training.

    `sample_rate` and `steps_per_epoch` are exactly what Opacus's Poisson loader uses
    (q = 1 / ceil(n / B), ceil(n / B) steps per epoch), so the ledger charges what runs.
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

    @property
    def steps_per_call(self) -> int:
        return self.steps_per_epoch * self.epochs

    def to_dict(self) -> dict:
        return {**self.__dict__, "steps_per_call": self.steps_per_call}


def plan_training(config: Config, n_train: int) -> DPPlan:
    """Calibrate the noise once for rounds x epochs x steps, so every later call fits."""
    batch = config.training.batch_size
    if batch > n_train:
        raise ConfigError(f"training.batch_size = {batch}: expected at most the {n_train} training examples")
    steps_per_epoch = math.ceil(n_train / batch)
    sample_rate = 1.0 / steps_per_epoch
    dp = config.dp
    delta = dp.resolved_delta(n_train)
    total_steps = steps_per_epoch * config.training.epochs * config.training.rounds
    if not dp.enabled:
        sigma = 0.0
    elif dp.noise_multiplier > 0:
        sigma = dp.noise_multiplier
    else:
        sigma = noise_for_budget(dp.target_epsilon, delta, sample_rate, total_steps, dp.accountant)
    return DPPlan(
        private=dp.enabled,
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        epochs=config.training.epochs,
        planned_calls=config.training.rounds,
        delta=delta,
        target_epsilon=dp.target_epsilon,
        max_grad_norm=dp.max_grad_norm,
    )


def new_ledger(config: Config, plan: DPPlan) -> PrivacyLedger:
    return PrivacyLedger(
        accountant=config.dp.accountant,
        delta=plan.delta,
        target_epsilon=plan.target_epsilon if plan.private else None,
    )


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples_seen: int
    mean_loss: float
    epsilon: float
    seconds: float
    private: bool


def _optimizer(config: Config, parameters):
    training = config.training
    if training.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)
    return torch.optim.AdamW(parameters, lr=training.learning_rate, weight_decay=training.weight_decay)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable_named_parameters(model)}


def check_adapter_changed(model, before: dict[str, torch.Tensor], private: bool) -> None:
    """Raise if training left the adapter untouched (opacus#820 / peft#3409).

    Under DP every trainable tensor receives Gaussian noise, so any tensor that is
    bit-identical means the optimizer never reached it. Without DP a tensor can
    legitimately sit still for a step (LoRA A while B is still zero), so at least one
    must have moved.
    """
    current = dict(trainable_named_parameters(model))
    unchanged = [n for n, old in before.items() if torch.equal(old, current[n].detach())]
    if (private and unchanged) or len(unchanged) == len(before):
        raise AdapterNotUpdatedError(
            f"training ran but {len(unchanged)} of {len(before)} adapter tensors did not change "
            f"(first: {unchanged[0]}); the update would be empty (see opacus#820)"
        )


def train_call(
    model,
    dataset: Dataset,
    config: Config,
    plan: DPPlan,
    ledger: PrivacyLedger,
    ledger_path: str | Path | None = None,
    label: str = "",
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `model`'s adapter for `plan.epochs` local epochs and charge `ledger`.

    The ledger is charged (and saved to `ledger_path`) before the first step.
    `on_step(step, loss)` is called after every optimizer step (progress bars).
    """
    started = time.perf_counter()
    steps = plan.steps_per_call
    if plan.private:
        epsilon = ledger.charge(plan.noise_multiplier, plan.sample_rate, steps, label=label)
    else:
        ledger.charge_non_private(steps, label=label)
        epsilon = math.inf
    if ledger_path is not None:
        ledger.save(ledger_path)

    before = _snapshot(model)
    # Derive this call's seed from the config seed and the steps already taken, so each
    # call is reproducible yet draws fresh noise and fresh Poisson batches.
    seed = config.training.seed * 1_000_003 + ledger.steps
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if plan.private:
            losses, seen = _train_private(model, dataset, config, plan, steps, on_step)
        else:
            losses, seen = _train_plain(model, dataset, config, plan, steps, on_step)
    check_adapter_changed(model, before, plan.private)
    return TrainResult(
        steps=steps,
        examples_seen=seen,
        mean_loss=float(sum(losses) / max(len(losses), 1)),
        epsilon=epsilon,
        seconds=time.perf_counter() - started,
        private=plan.private,
    )


def _proximal_step(parameters, anchors, config: Config) -> None:
    """FedProx as a decoupled proximal pull towards the round's global adapter:
    w <- w - lr * mu * (w - w_global). It touches no data, so under DP it is
    post-processing and costs no privacy."""
    mu = config.federation.proximal_mu
    if mu <= 0:
        return
    step = config.training.learning_rate * mu
    with torch.no_grad():
        for parameter, anchor in zip(parameters, anchors):
            parameter.sub_(step * (parameter - anchor))


def autocast(device: torch.device, precision: str):
    """The forward pass's autocast context: bf16 on CUDA or CPU, or a no-op for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _forward_loss(model, batch, criterion, task, device, precision: str = "fp32"):
    input_ids, attention_mask, labels = trim_batch(*batch, task)
    input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
    with autocast(device, precision):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits.float(), labels  # the loss (and Opacus's loss scaling) in fp32


_OPACUS_MODULE_STATE = ("activations", "max_batch_len")
_OPACUS_PARAMETER_STATE = ("grad_sample", "_current_grad_sample", "_forward_counter", "summed_grad")


def clear_opacus_state(model) -> None:
    """Drop Opacus's per-batch bookkeeping from a model that outlives one training call.

    A worker keeps one model for every virtual client it serves (`fedtune.runtime`). Opacus
    keeps captured activations on modules and partial per-sample gradients on parameters;
    if a call ends between a forward and its backward (an exception, an interrupted step),
    those leftovers would be mixed into the next client's first batch."""
    for module in model.modules():
        for name in _OPACUS_MODULE_STATE:
            module.__dict__.pop(name, None)  # own attributes only: peft wrappers forward getattr
    for parameter in model.parameters():
        for name in _OPACUS_PARAMETER_STATE:
            parameter.__dict__.pop(name, None)


def _train_private(model, dataset, config: Config, plan: DPPlan, steps: int, on_step=None):
    clear_opacus_state(model)
    device = next(model.parameters()).device
    task = config.model.task
    criterion = PerExampleLoss(task)
    parameters = [p for _, p in trainable_named_parameters(model)]
    anchors = [p.detach().clone() for p in parameters]
    optimizer = _optimizer(config, parameters)
    loader = DataLoader(dataset, batch_size=config.training.batch_size)
    engine = PrivacyEngine(accountant=config.dp.accountant, secure_mode=config.dp.secure_mode)
    mode = config.dp.grad_sample_mode
    prepared = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=mode,
        wrap_model=False,
    )
    if mode == "ghost":
        hooks, dp_optimizer, dp_criterion, dp_loader = prepared
    else:
        hooks, dp_optimizer, dp_loader = prepared
        dp_criterion = criterion
    model.train()
    losses, seen, step = [], 0, 0
    try:
        for _ in range(plan.epochs):
            for batch in dp_loader:
                logits, labels = _forward_loss(model, batch, criterion, task, device, config.training.precision)
                loss = dp_criterion(logits, labels)
                loss.backward()
                dp_optimizer.step()
                dp_optimizer.zero_grad(set_to_none=True)
                _proximal_step(parameters, anchors, config)
                step += 1
                seen += len(labels)
                if len(labels):
                    losses.append(float(loss.item()))
                if on_step:
                    on_step(step, losses[-1] if losses else float("nan"))
    finally:
        hooks.cleanup()
        clear_opacus_state(model)
        for parameter in parameters:
            parameter.grad = None
    accounted = engine.accountant.history
    expected = [(plan.noise_multiplier, plan.sample_rate, steps)]
    if [tuple(e) for e in accounted] != expected:  # the ledger must charge what ran
        raise RuntimeError(f"Opacus accounted {accounted}, the ledger charged {expected}")
    return losses, seen


def _train_plain(model, dataset, config: Config, plan: DPPlan, steps: int, on_step=None):
    """NON-PRIVATE baseline training: same loss, shuffled fixed-size batches."""
    device = next(model.parameters()).device
    task = config.model.task
    criterion = PerExampleLoss(task)
    parameters = [p for _, p in trainable_named_parameters(model)]
    anchors = [p.detach().clone() for p in parameters]
    optimizer = _optimizer(config, parameters)
    loader = DataLoader(dataset, batch_size=config.training.batch_size, shuffle=True)
    model.train()
    losses, seen, step = [], 0, 0
    for _ in range(plan.epochs):
        for batch in loader:
            logits, labels = _forward_loss(model, batch, criterion, task, device, config.training.precision)
            loss = criterion(logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _proximal_step(parameters, anchors, config)
            step += 1
            seen += len(labels)
            losses.append(float(loss.item()))
            if on_step:
                on_step(step, losses[-1])
    for parameter in parameters:
        parameter.grad = None
    return losses, seen
