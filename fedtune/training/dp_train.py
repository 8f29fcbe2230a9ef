"""One local training call under DP-SGD (Opacus), or explicitly without DP.

The call is the unit the privacy ledger charges. Its order is the privacy contract:

1. plan the mechanism (noise, sample rate, steps) and charge the ledger, which refuses
   with `BudgetExhaustedError` if the call would exceed the node's cap;
2. persist the ledger durably (write-ahead: a crash from here on over-counts, never
   under-counts);
3. attach Opacus to the model for this call only (`wrap_model=False`) and train, with the
   Poisson batches and the noise drawn from secret generators (`fedtune.privacy.randomness`);
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
from typing import TYPE_CHECKING, Callable

import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.data_loader import wrap_collate_with_empty
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, default_collate

from fedtune.config import Config
from fedtune.errors import AdapterNotUpdatedError, DeadlinePassedError
from fedtune.training.losses import PerExampleLoss, trim_batch
from fedtune.models.base import trainable_named_parameters
from fedtune.privacy.accountants import accountant_named
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.planning import DPPlan
from fedtune.system.quiet import harmless_warnings_filtered, quiet_libraries
from fedtune.privacy.randomness import Randomness

if TYPE_CHECKING:
    from fedtune.privacy.canaries import GradientCanaries


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
    deadline: float = 0.0,
    canaries: "GradientCanaries | None" = None,
) -> TrainResult:
    """Train `model`'s adapter for `plan.epochs` local epochs and charge `ledger`.

    The ledger is charged and `persist(ledger)` runs (durable write) before the first
    step. `on_step(step, loss)` is called after every optimizer step (progress bars).
    `randomness` draws the Poisson batches and the noise: secret unless the config asks
    for reproducible noise (`dp.noise_seed`); a reproducible stream is keyed by the data
    the ledger protects and the steps it has already charged.
       `deadline` (a time.time() value, 0 = none): past it the call stops with
    `DeadlinePassedError` and releases nothing; the charge stands (an over-count).
       `canaries` (only `fedtune.audit.node_audit` passes them): gradient canaries inserted into the
    noise step. A private plan with noise multiplier 0 is the audit's noise-off control:
    clipping without noise, charged to the ledger as NON-PRIVATE (epsilon infinite); no
    calibration ever plans it (`noise_for_budget` returns a positive multiplier).
    """
    started = time.perf_counter()
    steps = plan.steps_per_call
    randomness = randomness or Randomness.from_setting(config.dp.noise_seed)
    stream = (ledger.data_fingerprint, ledger.steps)  # before the charge: each call its own stream
    if plan.private and plan.noise_multiplier > 0:
        epsilon = ledger.charge(plan.noise_multiplier, plan.sample_rate, steps, label=label)
    elif plan.private:
        ledger.charge_non_private(steps, label=f"{label} (DP-SGD with the noise OFF: an audit control)")
        epsilon = math.inf
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
        losses, seen, empty = _train(model, dataset, config, plan, steps, on_step, sampling, noise, deadline, canaries)
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

    A worker keeps one model for every virtual client it serves (`fedtune.training.model_cache`). Opacus
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


def physical_chunks(batch, size: int) -> list:
    """A Poisson batch cut into chunks of at most `size` rows (0 = the whole batch)."""
    rows = len(batch[-1])
    if not size or rows <= size:
        return [batch]
    return [[part[start:start + size] for part in batch] for start in range(0, rows, size)]


def train_mode(model) -> None:
    """Training mode with the base model's dropout off: the base is frozen, so its dropout
    only perturbs the activations the adapter learns from, which DP-SGD's noise already
    does, and on a CPU it took about a tenth of each step (py-spy on the default
    simulation). The adapter's own dropout (`lora.dropout`) stays as configured. The default
    simulation (`dp.noise_seed = 0`, benchmarks/default_run.py, one run each) ended at
    accuracy 0.8772 in 305 s with it (the record at commit 2b1e844) and 0.8892 in 221 s
    without (docs/benchmark-runs/default_run.json)."""
    model.train()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and "lora_dropout" not in name:
            module.eval()


def _batch_step(model, batch, optimizer, criterion, step_criterion, config: Config, private: bool, device) -> float:
    """One optimizer step on one Poisson batch, run in chunks of `training.physical_batch_size`
    rows (Opacus's BatchMemoryManager, without its own sampler): under DP each chunk's
    per-example gradients are clipped and added to the running sum with the step skipped
    (`signal_skip_step`), and the last chunk's step adds the noise once and scales by the
    expected batch size, so the step is the same mechanism as one pass over the batch and
    Opacus's accountant counts it once. Without DP the chunks' gradients accumulate with
    weights that make them the batch mean. Returns the batch's mean loss."""
    chunks = physical_chunks(batch, config.training.physical_batch_size)
    rows = len(batch[-1])
    total = 0.0
    for index, chunk in enumerate(chunks):
        logits, labels = _forward_loss(model, chunk, criterion, config.model.task, device, config.training.precision)
        loss = step_criterion(logits, labels)
        share = len(chunk[-1]) / rows
        if private:
            loss.backward()
            if index < len(chunks) - 1:
                optimizer.signal_skip_step(do_skip=True)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        else:
            (loss * share).backward()
        total += float(loss.item()) * share
    optimizer.step()
    return total


def _loop_batch_step(model, batch, optimizer, criterion, parameters, config: Config, device) -> float:
    """One DP-SGD step with exact per-example gradients computed one example at a time
    (`dp.grad_sample_mode = "loop"`): for adapters Opacus has no per-layer rule for. The
    gradients go to Opacus's DP optimizer as `grad_sample`, which clips, sums, noises and
    accounts exactly as with its hooks. Returns the batch's mean loss."""
    rows = len(batch[-1])
    per_example: list[list[torch.Tensor]] = [[] for _ in parameters]
    total = 0.0
    for row in range(rows):
        example = [part[row:row + 1] for part in batch]
        logits, labels = _forward_loss(model, example, criterion, config.model.task, device, config.training.precision)
        loss = criterion(logits, labels)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        for store, grad, parameter in zip(per_example, grads, parameters):
            store.append(torch.zeros_like(parameter) if grad is None else grad.detach())
        total += float(loss.item())
    for parameter, store in zip(parameters, per_example):
        parameter.grad_sample = torch.stack(store)
    optimizer.step()
    return total / rows


def _attach_opacus(model, optimizer, criterion, loader, config: Config, plan: DPPlan, noise: torch.Generator | None):
    """Opacus for one call: per-sample clipping and noise on `optimizer`, hooks on `model`
    (`wrap_model=False`, removed by the caller's `hooks.cleanup()`)."""
    # Opacus's engine only records the history here (the ledger computes epsilon)
    engine = PrivacyEngine(accountant=accountant_named(config.dp.accountant).opacus_engine,
                           secure_mode=config.dp.secure_mode)
    mode = config.dp.grad_sample_mode
    if mode == "loop":  # no hooks: `_loop_batch_step` hands Opacus exact per-example gradients
        dp_optimizer = DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                                   expected_batch_size=int(len(loader.dataset) / len(loader)), loss_reduction="mean",
                                   generator=engine.secure_rng if config.dp.secure_mode else noise,
                                   secure_mode=config.dp.secure_mode)
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=1 / len(loader)))
        return engine, None, dp_optimizer, criterion
    prepared = engine.make_private(
        module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
        noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
        poisson_sampling=False,  # the loader already samples Poisson batches
        noise_generator=noise, grad_sample_mode=mode, wrap_model=False,
    )
    if mode == "ghost":
        hooks, dp_optimizer, dp_criterion, _ = prepared
    else:
        (hooks, dp_optimizer, _), dp_criterion = prepared, criterion
    hooks.forbid_grad_accumulation()  # one forward per step, as Poisson accounting assumes
    return engine, hooks, dp_optimizer, dp_criterion


def _train(model, dataset, config: Config, plan: DPPlan, steps: int, on_step, sampling: torch.Generator,
           noise: torch.Generator, deadline: float = 0.0, canaries=None):
    """The one training loop. With DP, Opacus clips per example and adds noise in the
    optimizer; without (a NON-PRIVATE baseline), the same loop runs on the same Poisson
    batches with plain steps, and an empty batch is a step with nothing to learn from."""
    clear_opacus_state(model)
    device = next(model.parameters()).device
    task = config.model.task
    criterion = PerExampleLoss(task)
    parameters = [p for _, p in trainable_named_parameters(model)]
    anchors = [p.detach().clone() for p in parameters]
    optimizer, step_criterion, engine, hooks = _optimizer(config, parameters), criterion, None, None
    secure = plan.private and config.dp.secure_mode  # Opacus then draws from torchcsprng, no generators
    secure_rng = PrivacyEngine(secure_mode=True).secure_rng if secure else None
    loader = poisson_loader(dataset, plan.sample_rate, plan.steps_per_epoch, secure_rng if secure else sampling)
    if 1 / len(loader) != plan.sample_rate:  # what Opacus will account: a bug if it is not the plan's q
        raise RuntimeError(f"Opacus would account q = 1/{len(loader)}, the plan charges q = {plan.sample_rate}")
    if plan.private:
        engine, hooks, optimizer, step_criterion = _attach_opacus(model, optimizer, criterion, loader, config, plan,
                                                                  None if secure else noise)
        if canaries is not None:
            canaries.attach(optimizer, plan.sample_rate)
    elif canaries is not None:
        raise ValueError("gradient canaries need a private plan: there is no DP-SGD noise step to insert them into")
    train_mode(model)
    losses, seen, step, empty = [], 0, 0, 0
    try:
        for _ in range(plan.epochs):
            for batch in loader:
                if deadline and time.time() > deadline:
                    raise DeadlinePassedError(f"stopped after {step} of {steps} steps at the round's deadline; "
                                              "the charge stands, nothing is released")
                if len(batch[-1]) == 0:
                    empty += 1
                    if plan.private:
                        _noise_only_step(optimizer, parameters, config.dp.grad_sample_mode)
                else:
                    if plan.private and config.dp.grad_sample_mode == "loop":
                        losses.append(_loop_batch_step(model, batch, optimizer, criterion, parameters, config, device))
                    else:
                        losses.append(_batch_step(model, batch, optimizer, criterion, step_criterion, config,
                                                  plan.private, device))
                    seen += len(batch[-1])
                optimizer.zero_grad(set_to_none=True)
                _proximal_step(parameters, anchors, config)
                step += 1
                if on_step:
                    on_step(step, losses[-1] if losses else float("nan"))
    finally:
        if hooks is not None:
            hooks.cleanup()
        clear_opacus_state(model)
        for parameter in parameters:
            parameter.grad = None
    if engine is not None:
        accounted = engine.accountant.history
        expected = [(plan.noise_multiplier, plan.sample_rate, steps)]
        if [tuple(e) for e in accounted] != expected:  # the ledger must charge what ran
            raise RuntimeError(f"Opacus accounted {accounted}, the ledger charged {expected}")
    return losses, seen, empty
