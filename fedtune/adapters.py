"""Adapter methods, one seam: how a base model gets its trainable adapter.

`[adapter] method` names an entry of `ADAPTER_METHODS`. A method attaches its adapter to
a base model (seeded: every node must build the same initial adapter) and says in one
line what it is. Everything else is generic and never asks which method runs:
federation and node code move whatever tensors train (`fedtune.adapter.trainable_state`);
tensors a method freezes at their seeded init (FFA-LoRA's A) travel once, in round 1,
and nodes rebuild them; reports and model cards print `describe`.

A new PEFT method is one entry here (registered at import, or by a test). It must be one
Opacus can take per-sample gradients of: peft's LoRA can; IA3 cannot today (Opacus finds
no activations for the Linear layers IA3 wraps).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from fedtune.config import Config


class AdapterMethod(NamedTuple):
    attach: Callable[[object, Config], object]  # (base model, config) -> peft model with the adapter
    describe: Callable[[Config], str]            # one line for reports and model cards


def _attach_lora(base, config: Config):
    from fedtune.model import attach_lora

    return attach_lora(base, config.lora, config.model.task, config.training.seed)


def _describe_lora(config: Config) -> str:
    lora = config.lora
    return (f"LoRA rank {lora.rank}, alpha {lora.alpha:g}" + (", FFA-LoRA (A frozen)" if lora.ffa else "")
            + ("" if lora.train_head else ", head frozen"))


ADAPTER_METHODS: dict[str, AdapterMethod] = {"lora": AdapterMethod(_attach_lora, _describe_lora)}


def adapter_method(config: Config) -> AdapterMethod:
    return ADAPTER_METHODS[config.adapter.method]


def attach_adapter(base, config: Config):
    return adapter_method(config).attach(base, config)


def describe_adapter(config: Config) -> str:
    return adapter_method(config).describe(config)
