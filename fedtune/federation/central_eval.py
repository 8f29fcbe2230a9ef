"""Central evaluation: the server scores each new global adapter on one held-out set.

Federated evaluation averages the sampled clients' small validation splits, so its
figure moves with the sample as much as with the model. A fixed held-out set (a file the
operator owns, or a share of the dataset kept back before a simulation partitions it)
gives one comparable number per round. It never touches client data.

An instruct run also scores its initial adapter as round 0 (`write_zero_shot`): the
zero-shot baseline the federation has to beat.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

from fedtune.models.adapter_io import load_state
from fedtune.system.atomic import atomic_write_text
from fedtune.config import Config
from fedtune.data.tables import LabelMap, TokenCache, read_for_task, to_dataset
from fedtune.data.named import Table
from fedtune.errors import ConfigError
from fedtune.training.evaluate import evaluate, evaluate_instruct, majority_baseline


def central_table(config: Config) -> Table | None:
    """The operator's held-out file (`federation.central_eval_path`), if configured."""
    path = config.federation.central_eval_path
    if not path:
        return None
    return read_for_task(path, config.data, config.model.task)


class CentralEvaluator:
    """Tokenizes the held-out table once; each call loads an adapter and evaluates it."""

    def __init__(self, config: Config, model, tokenizer, table: Table, cache: TokenCache | None = None):
        if config.task_is_classification and not config.data.labels:
            raise ConfigError("data.labels: central evaluation needs the federation's label set")
        self.config = config
        self.model = model
        self.size = len(table)
        label_ids = None
        self.majority_accuracy = None
        self.samples: list[dict] = []  # instruct: a few generated answers of the latest evaluation
        self.summary: dict | None = None
        self.tokenizer = tokenizer
        if config.model.task == "instruct":
            from fedtune.data.instruct import encode_rows

            held, self.dataset, self.prompts = encode_rows(tokenizer, table, config.model.max_seq_len,
                                                           bool(config.data.messages_column))
            self.summary = held.summary()
            self.size = len(held.kept)
            return
        if config.task_is_classification:
            label_ids = LabelMap.from_config(config.data.labels).encode(table.labels,
                                                                        source=f"{table.source} (central evaluation)")
            self.majority_accuracy = majority_baseline(label_ids)
        encoded = (cache or TokenCache()).tokenize(tokenizer, table.texts, config.model.max_seq_len)
        self.dataset = to_dataset(encoded, label_ids)

    def __call__(self, adapter: "OrderedDict[str, np.ndarray]") -> dict:
        load_state(self.model, adapter)
        if self.config.model.task == "instruct":
            metrics = evaluate_instruct(self.model, self.tokenizer, self.dataset, *self.prompts,
                                        self.config.model.max_new_tokens, precision=self.config.training.precision)
            self.samples = metrics.pop("samples")
        else:
            num_classes = len(self.config.data.labels) or None
            metrics = evaluate(self.model, self.dataset, self.config.model.task, num_classes=num_classes)
        scores = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.majority_accuracy is not None:
            scores["majority_accuracy"] = float(self.majority_accuracy)
        return scores


def central_evaluator(config: Config, model, tokenizer, table: Table | None = None,
                      compute: Callable | None = None) -> "CentralEvaluator | None":
    """The server's evaluator of each global adapter: on `table` (a simulation's holdout)
    or else the operator's `federation.central_eval_path`; None when there is neither, and
    evaluation is federated. `compute(fn)` runs its model work where the caller wants it:
    an in-process simulation runs it on the thread its clients train on
    (`simulations.in_process.ComputeSlots`)."""
    table = table if table is not None else central_table(config)
    if table is None:
        return None
    evaluator = CentralEvaluator(config, model, tokenizer, table)
    return _ComputedElsewhere(evaluator, compute) if compute is not None else evaluator


class _ComputedElsewhere:
    """A central evaluator whose calls run through `compute` (its attributes pass through)."""

    def __init__(self, evaluator: CentralEvaluator, compute: Callable):
        self._evaluator, self._compute = evaluator, compute

    def __call__(self, adapter) -> dict:
        return self._compute(lambda: self._evaluator(adapter))

    def __getattr__(self, name):
        return getattr(self._evaluator, name)


def write_zero_shot(path: str | Path, central, adapter, log) -> None:
    """Round 0 of an instruct run: the initial adapter scored like every later round, written
    to `path`. For LoRA (B = 0) and IA3 (all scales 1) that is exactly the base model: the
    zero-shot baseline the federation has to beat."""
    started = time.perf_counter()
    scores = central(adapter)
    record = {"round": 0, **scores, "seconds": round(time.perf_counter() - started, 1), "samples": central.samples,
              "held_out": central.summary}
    atomic_write_text(Path(path), json.dumps(record, indent=2) + "\n")
    log(f"round 0 (initial adapter, before any training): accuracy {scores['accuracy']:.4f}, "
        f"loss {scores['loss']:.4f}")
