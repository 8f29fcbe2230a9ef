"""One local training call under DP-SGD (Opacus), or explicitly without DP.

The call is the unit the privacy ledger charges. Its order is the privacy contract:

1. plan the mechanism (noise, sample rate, steps) and charge the ledger, which refuses
   with `BudgetExhaustedError` if the call would exceed the node's cap;
2. persist the ledger durably (write-ahead: a crash from here on over-counts, never
   under-counts);
3. attach Opacus to the model for this call only (`wrap_model=False`) and train, with the
   Poisson batches and the noise drawn from secret generators (`fedtune.randomness`);
4. remove every hook and per-sample attribute (no growth across calls, opacus#608);
5. check that Opacus's own accountant saw exactly the charged steps, and that the
   adapter really changed (opacus#820).

fedtune drives the Poisson batches itself (`poisson_loader`: Opacus's own sampler and
empty-batch collate, with the step count given): Opacus's `DPDataLoader` runs int(1 / q)
steps per epoch with q = 1 / ceil(n / B), which floating point makes one fewer than
ceil(n / B) for some sizes (93, 99, 105, ...), and its accountant then assumes q =
1 / (that count). Here the plan's ceil(n / B) steps at q = 1 / ceil(n / B) are what runs,
what Opacus accounts and what the ledger charges. An empty Poisson batch is a step like
any other: the clipped sum is zero and the noise is added (noise only).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from opacus import PrivacyEngine
from opacus.data_loader import wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, default_collate

from fedtune.config import Config
from fedtune.errors import AdapterNotUpdatedError, ConfigError
from fedtune.losses import PerExampleLoss, trim_batch
from fedtune.model import trainable_named_parameters
from fedtune.privacy import PrivacyLedger, noise_for_budget
from fedtune.quiet import harmless_warnings_filtered, quiet_libraries
from fedtune.randomness import Randomness


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


def poisson_loader(dataset: Dataset, sample_rate: float, steps: int, generator: torch.Generator | None) -> DataLoader:
    """`steps` Poisson batches (each row independently with rate q) from `generator`.

    Opacus's sampler and its empty-batch collate, with the step count set here, so that
    Opacus's accountant (which takes q = 1 / len(loader)) sees exactly the plan's q."""
    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate, generator=generator,
                                            steps=steps)
    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *x.shape) for x in first],
                                      dtypes=[x.dtype for x in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=generator)


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
        target_epsilon=config.max_epsilon if plan.private else None,
        data_fingerprint=data_fingerprint,
    )


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples_seen: int
    mean_loss: float
    epsilon: float
    seconds: float
    private: bool
    empty_batches: int = 0  # Poisson batches that drew no row: noise-only steps


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


def save_to(path: str | Path) -> Callable[[PrivacyLedger], None]:
    """A `persist` callback for `train_call` that writes the ledger to one file."""
    return lambda ledger: ledger.save(path)


def train_call(
    model,
    dataset: Dataset,
    config: Config,
    plan: DPPlan,
    ledger: PrivacyLedger,
    persist: Callable[[PrivacyLedger], None] | None = None,
    label: str = "",
    on_step: Callable[[int, float], None] | None = None,
    randomness: Randomness | None = None,
) -> TrainResult:
    """Train `model`'s adapter for `plan.epochs` local epochs and charge `ledger`.

    The ledger is charged and `persist(ledger)` runs (durable write) before the first
    step. `on_step(step, loss)` is called after every optimizer step (progress bars).
    `randomness` draws the Poisson batches and the noise: secret unless the config asks
    for reproducible noise (`dp.noise_seed`); a reproducible stream is keyed by the data
    the ledger protects and the steps it has already charged.
    """
    started = time.perf_counter()
    steps = plan.steps_per_call
    randomness = randomness or Randomness.from_setting(config.dp.noise_seed)
    stream = (ledger.data_fingerprint, ledger.steps)  # before the charge: each call its own stream
    if plan.private:
        epsilon = ledger.charge(plan.noise_multiplier, plan.sample_rate, steps, label=label)
    else:
        ledger.charge_non_private(steps, label=label)
        epsilon = math.inf
    if persist is not None:
        persist(ledger)

    before = _snapshot(model)
    device = next(model.parameters()).device
    sampling = randomness.torch_generator("poisson", *stream)
    noise = randomness.torch_generator("noise", *stream, device=device)
    # Dropout draws from torch's global generator (whose default seed is a constant): give
    # it this call's own seed too, and leave the caller's generator as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), harmless_warnings_filtered():
        quiet_libraries()  # this may be a Ray worker: the driver's logging settings did not reach it
        torch.manual_seed(randomness.seed_for("dropout", *stream))
        if plan.private:
            losses, seen, empty = _train_private(model, dataset, config, plan, steps, on_step, sampling, noise)
        else:
            (losses, seen), empty = _train_plain(model, dataset, config, plan, steps, on_step, sampling), 0
    check_adapter_changed(model, before, plan.private)
    return TrainResult(
        steps=steps,
        examples_seen=seen,
        mean_loss=float(sum(losses) / max(len(losses), 1)),
        epsilon=epsilon,
        seconds=time.perf_counter() - started,
        private=plan.private,
        empty_batches=empty,
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


def _noise_only_step(dp_optimizer, parameters, mode: str) -> None:
    """One DP-SGD step on an empty Poisson batch: nothing to clip, the noise still goes in.

    Opacus clips and sums per-sample gradients (hooks: `grad_sample`; ghost clipping: the
    already-clipped `grad`); for an empty batch both are zero-sized / zero, and the
    optimizer adds N(0, (sigma C)^2) and scales by the expected batch size as usual."""
    for parameter in parameters:
        if mode == "ghost":
            parameter.grad = torch.zeros_like(parameter)
        else:
            parameter.grad_sample = torch.zeros((0,) + tuple(parameter.shape), dtype=parameter.dtype,
                                                device=parameter.device)
    dp_optimizer.step()


def _train_private(model, dataset, config: Config, plan: DPPlan, steps: int, on_step, sampling: torch.Generator,
                   noise: torch.Generator):
    clear_opacus_state(model)
    device = next(model.parameters()).device
    task = config.model.task
    criterion = PerExampleLoss(task)
    parameters = [p for _, p in trainable_named_parameters(model)]
    anchors = [p.detach().clone() for p in parameters]
    optimizer = _optimizer(config, parameters)
    secure = config.dp.secure_mode  # Opacus then draws both from torchcsprng and refuses other generators
    engine = PrivacyEngine(accountant=config.dp.accountant, secure_mode=secure)
    loader = poisson_loader(dataset, plan.sample_rate, plan.steps_per_epoch, engine.secure_rng if secure else sampling)
    if 1 / len(loader) != plan.sample_rate:  # what Opacus will account: a bug if it is not the plan's q
        raise RuntimeError(f"Opacus would account q = 1/{len(loader)}, the plan charges q = {plan.sample_rate}")
    mode = config.dp.grad_sample_mode
    prepared = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=False,  # the loader above already samples Poisson batches
        noise_generator=None if secure else noise,
        grad_sample_mode=mode,
        wrap_model=False,
    )
    if mode == "ghost":
        hooks, dp_optimizer, dp_criterion, dp_loader = prepared
    else:
        hooks, dp_optimizer, dp_loader = prepared
        dp_criterion = criterion
    hooks.forbid_grad_accumulation()  # one forward per step, as Poisson accounting assumes
    model.train()
    losses, seen, step, empty = [], 0, 0, 0
    try:
        for _ in range(plan.epochs):
            for batch in dp_loader:
                if len(batch[-1]) == 0:
                    _noise_only_step(dp_optimizer, parameters, mode)
                    empty += 1
                else:
                    logits, labels = _forward_loss(model, batch, criterion, task, device, config.training.precision)
                    loss = dp_criterion(logits, labels)
                    loss.backward()
                    dp_optimizer.step()
                    seen += len(labels)
                    losses.append(float(loss.item()))
                dp_optimizer.zero_grad(set_to_none=True)
                _proximal_step(parameters, anchors, config)
                step += 1
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
    return losses, seen, empty


def _train_plain(model, dataset, config: Config, plan: DPPlan, steps: int, on_step, sampling: torch.Generator):
    """NON-PRIVATE baseline training: same loss, shuffled fixed-size batches."""
    device = next(model.parameters()).device
    task = config.model.task
    criterion = PerExampleLoss(task)
    parameters = [p for _, p in trainable_named_parameters(model)]
    anchors = [p.detach().clone() for p in parameters]
    optimizer = _optimizer(config, parameters)
    loader = DataLoader(dataset, batch_size=config.training.batch_size, shuffle=True, generator=sampling)
    model.train()
    losses, seen, step = [], 0, 0
    for _ in range(plan.epochs):
        for batch_number, batch in enumerate(loader):
            if batch_number == plan.steps_per_epoch:  # the same step count as the private plan
                break
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
