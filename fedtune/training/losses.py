"""Per-example losses, the unit of record-level DP.

One criterion serves both Opacus modes: with `reduction="mean"` it is the ordinary loss
(hooks mode scales per-sample gradients by the batch size to undo the mean); ghost
clipping sets `reduction="none"` and needs one loss per example. For causal LM a
sequence is one record, so its loss is the mean over its own tokens, not over the batch's
tokens (which would let one long sequence weigh on everyone else's gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedtune.data.tables import IGNORE_INDEX


class PerExampleLoss(nn.Module):
    def __init__(self, task: str):
        super().__init__()
        self.task = task
        self.reduction = "mean"

    def per_example(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return F.cross_entropy(logits.float(), labels, reduction="none")
        logits, labels = logits[:, :-1], labels[:, 1:]
        tokens = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
        ).view(labels.shape)
        counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        return tokens.sum(dim=1) / counts

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = self.per_example(logits, labels)
        if self.reduction == "none":
            return losses
        if self.reduction == "sum":
            return losses.sum()
        return losses.mean()


def trim_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, task: str):
    """Drop columns that are padding in every row of the batch (right padding).

    Batches are padded to model.max_seq_len once at tokenization; trimming per batch
    keeps the cost proportional to the real lengths.
    """
    if input_ids.shape[0] == 0:
        return input_ids, attention_mask, labels
    length = int(attention_mask.sum(dim=1).max().item())
    length = max(length, 2)
    input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
    if task != "classification":
        labels = labels[:, :length]
    return input_ids, attention_mask, labels
