"""Metrics that leave a node under differential privacy: a Gaussian mechanism on counts.

A training loss or a validation accuracy is a function of the node's private rows; sent
as is, it is a release nobody accounts for. Here a metric leaves only as

    ( #correct + N(0, s^2),  sum_i min(loss_i, L) / L + N(0, s^2) ),   s = sigma * sqrt(d)

over the n rows evaluated (d = 2 coordinates for classification, 1 for causal LM: the
loss). Adding or removing one row moves each coordinate by at most 1, so the vector has
L2 sensitivity sqrt(d), and the mechanism is the Gaussian mechanism with noise
multiplier sigma: Renyi DP alpha / (2 sigma^2), exactly the Opacus history entry
(sigma, q = 1, 1 step). The node charges that entry to its ledger *before* the values are
computed and released; accuracy = noisy #correct / n and loss = L x noisy sum / n are
post-processing (clamped to their ranges). The row count n is released anyway (it is the
node's example count), so it costs nothing more.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset

from fedtune.training.losses import PerExampleLoss, trim_batch


@torch.no_grad()
def exact_counts(model, dataset: Dataset, task: str, loss_clip: float, batch_size: int = 64) -> tuple[float, float, int]:
    """(#correct, sum of per-example losses clipped to [0, loss_clip], rows) on `dataset`.
    #correct is 0 for causal LM. Nothing here leaves the node."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    criterion = PerExampleLoss(task)
    correct, clipped_loss, rows = 0.0, 0.0, 0
    for input_ids, attention_mask, labels in DataLoader(dataset, batch_size=batch_size):
        input_ids, attention_mask, labels = trim_batch(input_ids, attention_mask, labels, task)
        input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        losses = criterion.per_example(logits, labels)
        clipped_loss += float(torch.nan_to_num(losses, nan=loss_clip, posinf=loss_clip).clamp(0, loss_clip).sum())
        if task == "classification":
            correct += float((logits.argmax(dim=-1) == labels).sum())
        rows += len(labels)
    model.train(was_training)
    return correct, clipped_loss, rows


def noisy_metrics(model, dataset: Dataset, task: str, noise_multiplier: float, loss_clip: float,
                  generator: torch.Generator) -> dict[str, float]:
    """The released metrics: accuracy (classification) and loss, each from a noised count.
    The caller must have charged (noise_multiplier, 1.0, 1) to the ledger first."""
    correct, clipped_loss, rows = exact_counts(model, dataset, task, loss_clip)
    coordinates = 2 if task == "classification" else 1
    scale = noise_multiplier * math.sqrt(coordinates)
    noise = torch.normal(0.0, scale, size=(2,), generator=generator).tolist()
    n = max(rows, 1)
    released = {"loss": min(max(loss_clip * (clipped_loss / loss_clip + noise[1]) / n, 0.0), loss_clip)}
    if task == "classification":
        released["accuracy"] = min(max((correct + noise[0]) / n, 0.0), 1.0)
    return released


def exact_metrics(model, dataset: Dataset, task: str, loss_clip: float) -> dict[str, float]:
    """The same metrics without noise, for a node that already trained without DP (its
    epsilon is infinite: noise would protect nothing)."""
    correct, clipped_loss, rows = exact_counts(model, dataset, task, loss_clip)
    n = max(rows, 1)
    released = {"loss": clipped_loss / n}
    if task == "classification":
        released["accuracy"] = correct / n
    return released
