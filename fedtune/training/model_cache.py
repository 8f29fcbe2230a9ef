"""Per-process reuse of the expensive parts of a node: the model and the tokenizer.

Flower creates a ClientApp afresh for every message; reloading the base model each time
is what makes naive LLM simulations slow and memory-hungry (flower#1963, #5855). Here a
worker process keeps one base model + LoRA adapter per model spec, and a (virtual) client
only swaps in the adapter tensors it receives. Tokenized data is cached by `TokenCache`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fedtune.config import Config
from fedtune.data.tables import TokenCache
from fedtune.training.local import build_model
from fedtune.models.base import load_tokenizer, resolve_model_path


@dataclass
class _Entry:
    key: tuple
    model: object
    tokenizer: object


class ModelCache:
    """Holds the model of the most recent spec (one per process is what fits in memory)."""

    def __init__(self, reuse: bool | None = None) -> None:
        # FEDTUNE_RELOAD_MODEL_EVERY_CALL=1 reproduces the naive FlowerTune pattern (a fresh
        # base model per ClientApp call) for benchmarks/simulation_efficiency.py.
        self.reuse = reuse if reuse is not None else os.environ.get("FEDTUNE_RELOAD_MODEL_EVERY_CALL") != "1"
        self._entry: _Entry | None = None
        self.tokens = TokenCache()
        self.loads = 0  # how many times a base model was loaded (tests, benchmarks)

    @staticmethod
    def key(config: Config, num_labels: int | None) -> tuple:
        return (config.model, config.adapter, config.lora, config.training.seed, num_labels)

    def get(self, config: Config, num_labels: int | None):
        key = self.key(config, num_labels)
        if self._entry is None or self._entry.key != key or not self.reuse:
            self._entry = None  # drop the old model before loading the new one
            tokenizer = load_tokenizer(resolve_model_path(config.model))
            self._entry = _Entry(key, build_model(config, tokenizer, num_labels), tokenizer)
            self.loads += 1
        return self._entry.model, self._entry.tokenizer


MODELS = ModelCache()
