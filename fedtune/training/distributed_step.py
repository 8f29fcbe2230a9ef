"""One distributed DP-SGD step at a node: its Poisson batch's clipped per-example gradients,
encoded with its noise share for secure aggregation (`fedtune.privacy.ddgauss`).

A round of distributed DP is exactly one DP-SGD step over the union of the contributing
nodes' Poisson batches: each node samples its own rows at q_i = B / n_i, Opacus's
per-sample machinery (its hooks, as in local DP-SGD) gives each example's gradient, and the
node sends (sum of rounded, rotated, clipped gradients + its noise share) mod 2^bits. The
server decodes the sum, divides by the expected total batch and steps. One step per round:
several local steps would release the sum of a trajectory that depends on the node's own
noise-free intermediate models, for which the one-step DP-SGD guarantee does not hold.

The layout of the flat vector is the order of `keys` (peft state keys of the trainable
tensors: what the server also holds), each tensor flattened in C order; the server's
`fedtune.federation.aggregate.unflatten` inverts it.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from opacus.grad_sample.grad_sample_module import GradSampleHooks
from torch.utils.data import Dataset

from fedtune.models.adapter_io import _state_key
from fedtune.config import Config
from fedtune.training.dp_train import _forward_loss, clear_opacus_state, physical_chunks, poisson_loader, train_mode
from fedtune.training.losses import PerExampleLoss
from fedtune.models.base import trainable_named_parameters
from fedtune.privacy import ddgauss
from fedtune.privacy.ddgauss import DDGaussSpec
from fedtune.system.quiet import harmless_warnings_filtered


def trainable_by_key(model) -> "OrderedDict[str, torch.nn.Parameter]":
    """The model's trainable parameters under their peft state keys."""
    return OrderedDict((_state_key(name), parameter) for name, parameter in trainable_named_parameters(model))


def flat_dim(model, keys: list[str]) -> int:
    params = trainable_by_key(model)
    return int(sum(params[k].numel() for k in keys))


def per_example_gradients(model, batch, config: Config, keys: list[str]) -> np.ndarray:
    """[rows, dim] per-example gradients of the loss, Opacus hooks, in chunks of
    `training.physical_batch_size` rows. Not clipped: `ddgauss.encode_examples` clips."""
    params = trainable_by_key(model)
    missing = [k for k in keys if k not in params]
    if missing:
        raise ValueError(f"tensors the server asked for that do not train here: {missing[:3]}")
    device = next(model.parameters()).device
    criterion = PerExampleLoss(config.model.task)
    criterion.reduction = "sum"  # per-example gradients of each example's own loss
    rows: list[np.ndarray] = []
    train_mode(model)  # Opacus captures activations only in training mode
    clear_opacus_state(model)
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        for chunk in physical_chunks(batch, config.training.physical_batch_size):
            logits, labels = _forward_loss(model, chunk, criterion, config.model.task, device,
                                           config.training.precision)
            criterion(logits, labels).backward()
            flat = [params[k].grad_sample.detach().reshape(len(chunk[-1]), -1).double().cpu() for k in keys]
            rows.append(torch.cat(flat, dim=1).numpy())
            for parameter in params.values():
                parameter.grad_sample = None
                parameter.grad = None
    finally:
        hooks.cleanup()
        clear_opacus_state(model)
        for parameter in params.values():
            parameter.grad = None
    return np.concatenate(rows) if rows else np.zeros((0, flat_dim(model, keys)))


def distributed_contribution(model, dataset: Dataset, config: Config, spec: DDGaussSpec, keys: list[str],
                             sample_rate: float, rotation_seed: int, sampling: torch.Generator | None = None,
                             rounding: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
    """This node's message for one distributed round: its Poisson batch (rate `sample_rate`,
    from `sampling`, secret by default) encoded with its noise share, mod 2^bits. Returns
    the vector (length `spec.padded_dim`) and the batch's row count, which stays on the node
    (it depends on the sampling, not on a row, but nothing needs it outside)."""
    if flat_dim(model, keys) != spec.dim:
        raise ValueError(f"the server's distributed round is for {spec.dim} values; the tensors it names hold "
                         f"{flat_dim(model, keys)} here")
    loader = poisson_loader(dataset, sample_rate, 1, sampling)
    batch = next(iter(loader))
    train_mode(model)
    with harmless_warnings_filtered():
        gradients = per_example_gradients(model, batch, config, keys) if len(batch[-1]) else np.zeros((0, spec.dim))
    return ddgauss.contribution(gradients, spec, rotation_seed, rounding), int(len(batch[-1]))
