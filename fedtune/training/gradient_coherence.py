"""The gradient-coherence probe: how much of the clipping norm a task's mean gradient fills.

`fedtune privacy advise` bounds the signal of a DP-SGD step by the clipping norm C: the
clipped mean gradient has norm at most C, reached only when every example's gradient
points the same way. A real task's per-example gradients disagree, so the signal the
noise competes with is ||E[clip_C(g)]||, a fraction `coherence` of C. This probe measures
that fraction on a small sample of the node's own rows with the model every node starts
from (the seeded LoRA adapter and classification head; base weights frozen):

    coherence = ||E[clip_C(g_i)]|| / C,   in [0, 1]

A sample's mean overstates it: E||mean of n||^2 = ||E g||^2 + Var/n, so 128 incoherent rows
would still read about 1/sqrt(128) = 0.09. The estimate here removes that bias: it is the
mean inner product <g_i, g_j> over pairs i != j (an unbiased estimate of ||E g||^2), square
rooted (0 when the pairs disagree more than they agree). `raw` is the plain sample mean's
norm, for comparison.

It is a probe at the start of training, not a forecast: the gradients' agreement changes as
the model learns, and the run ratio that divides by it still assumes every step and client
points the same way. Whether it sharpens advise's verdict is measured, not assumed
(`simulations/advise_calibration.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

from fedtune.config import Config
from fedtune.errors import DataError

PROBE_ROWS = 128


@dataclass(frozen=True)
class Coherence:
    coherence: float  # ||E clip(g)|| / C, debiased
    raw: float  # ||mean of the sample's clipped gradients|| / C (biased up by about 1/sqrt(rows))
    clipped_share: float  # rows whose gradient norm exceeded C
    median_norm: float  # median per-example gradient norm before clipping, in units of C
    rows: int
    parameters: int  # trainable parameters the gradients cover
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def gradient_coherence(config: Config, table=None, rows: int = PROBE_ROWS, seed: int = 0) -> Coherence:
    """The probe on `rows` rows (seeded sample) of `table`, else of the configured data
    (`data.path` or `data.dataset`), with the model, adapter, head, sequence length and
    clipping norm of `config`. Classification only. Costs one forward and backward pass
    per row, through the adapted blocks only."""
    import torch

    if config.model.task != "classification":
        raise DataError(f"model.task = {config.model.task!r}: the gradient-coherence probe covers classification only")
    if rows < 2:
        raise DataError(f"probe rows = {rows}: expected at least 2 (the estimate compares pairs of rows)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one row at a time: more threads only contend (46 s, not 3, beside a busy CPU)
    try:
        return _probe(config, table, rows, seed)
    finally:
        torch.set_num_threads(threads)


def _probe(config: Config, table, rows: int, seed: int) -> Coherence:
    import torch

    from fedtune.models.adapter_methods import attach_adapter
    from fedtune.data.tables import LabelMap, load_table, subsample
    from fedtune.training.losses import trim_batch
    from fedtune.models.base import load_base_model, load_tokenizer, resolve_model_path, trainable_named_parameters

    started = time.perf_counter()
    table = table if table is not None else load_table(config.data, "classification")
    labels = (LabelMap.from_config(config.data.labels) if config.data.labels
              else LabelMap.from_labels(table.labels, source=table.source))
    sample = subsample(table, rows, seed)
    if len(sample) < 2:
        raise DataError(f"{table.source}: {len(sample)} row(s); the probe needs at least 2")
    path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(path)
    encoded = tokenizer(list(sample.texts), truncation=True, max_length=config.model.max_seq_len, padding="max_length",
                        return_tensors="pt")
    targets = torch.as_tensor(labels.encode(sample.labels, source=table.source), dtype=torch.long)
    model = attach_adapter(load_base_model(path, "classification", len(labels), tokenizer.pad_token_id), config)
    model.eval()  # the expected gradient: dropout's noise is not signal
    parameters = [p for _, p in trainable_named_parameters(model)]
    clip = config.dp.max_grad_norm
    total = sum(p.numel() for p in parameters)
    summed = torch.zeros(total, dtype=torch.float64)
    squares, norms = 0.0, []
    criterion = torch.nn.CrossEntropyLoss()
    for i in range(len(sample)):
        ids, mask, label = trim_batch(encoded["input_ids"][i:i + 1], encoded["attention_mask"][i:i + 1],
                                      targets[i:i + 1], "classification")
        loss = criterion(model(input_ids=ids, attention_mask=mask).logits.float(), label)
        grads = torch.autograd.grad(loss, parameters, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                          for g, p in zip(grads, parameters)])
        norm = float(flat.norm())
        norms.append(norm / clip)
        flat = flat * min(1.0, clip / max(norm, 1e-12))
        summed += flat
        squares += float(flat.dot(flat))
    n = len(sample)
    pairs = (float(summed.dot(summed)) - squares) / (n * (n - 1))  # mean <g_i, g_j>, i != j
    norms.sort()
    return Coherence(math.sqrt(max(pairs, 0.0)) / clip, float(summed.norm()) / n / clip,
                     sum(v > 1.0 for v in norms) / n, norms[n // 2], n, total,
                     round(time.perf_counter() - started, 1))
