"""Per-process reuse of the expensive parts of a node: the model and the tokenizer.

Flower creates a ClientApp afresh for every message; reloading the base model each time
is what makes naive LLM simulations slow and memory-hungry (flower#1963, #5855). Here a
worker process keeps one base model + LoRA adapter per model spec, and a (virtual) client
only swaps in the adapter tensors it receives. Tokenized data is cached by `TokenCache`.

Several virtual clients may train at once in one process (`simulations.in_process` on a
GPU: one CUDA stream each). Each runs in a *slot*, and each slot holds its own model and
tokenizer: two clients never write adapter tensors into one model, and a fast tokenizer is
never called from two threads (its Rust core refuses that). The slot is the calling
thread's (`model_slot`); a process that runs one client at a time uses slot 0 throughout.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from fedtune.config import Config
from fedtune.data.tables import TokenCache
from fedtune.training.local import build_model
from fedtune.models.base import load_tokenizer, resolve_model_path


@dataclass
class _Entry:
    key: tuple
    model: object
    tokenizer: object


_SLOT = threading.local()


@contextmanager
def model_slot(slot: int) -> Iterator[None]:
    """Within this block, this thread's `MODELS.get` uses slot `slot`'s model."""
    previous = getattr(_SLOT, "slot", 0)
    _SLOT.slot = slot
    try:
        yield
    finally:
        _SLOT.slot = previous


class ModelCache:
    """Holds the model of the most recent spec, per slot (one per process unless several
    clients train at once: what fits in memory)."""

    def __init__(self, reuse: bool | None = None) -> None:
        # FEDTUNE_RELOAD_MODEL_EVERY_CALL=1 reproduces the naive FlowerTune pattern (a fresh
        # base model per ClientApp call) for benchmarks/simulation_efficiency.py.
        self.reuse = reuse if reuse is not None else os.environ.get("FEDTUNE_RELOAD_MODEL_EVERY_CALL") != "1"
        self._entries: dict[int, _Entry] = {}
        self.tokens = TokenCache()
        self.loads = 0  # how many times a base model was loaded (tests, benchmarks)

    @staticmethod
    def key(config: Config, num_labels: int | None) -> tuple:
        return (config.model, config.adapter, config.lora, config.training.seed, num_labels)

    def clear(self) -> None:
        """Forget every slot's model (what a process restart does)."""
        self._entries.clear()

    def get(self, config: Config, num_labels: int | None):
        key, slot = self.key(config, num_labels), getattr(_SLOT, "slot", 0)
        entry = self._entries.get(slot)
        if entry is None or entry.key != key or not self.reuse:
            self._entries.pop(slot, None)  # drop the old model before loading the new one
            tokenizer = load_tokenizer(resolve_model_path(config.model))
            entry = self._entries[slot] = _Entry(key, build_model(config, tokenizer, num_labels), tokenizer)
            self.loads += 1
        return entry.model, entry.tokenizer


MODELS = ModelCache()
