"""Adapter I/O: the one boundary through which model state leaves a node.

`adapter_state` is everything needed to rebuild the adapter (LoRA A and B, the head copy);
`trainable_state` is the part training changes (in FFA-LoRA mode, without the frozen A):
what a client sends each round. Both are ordered name -> numpy mappings keyed exactly
like peft's own `get_peft_model_state_dict`, so a PEFT adapter directory written here
loads with stock `PeftModel.from_pretrained(base, dir)`.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from fedtune.errors import ModelError

def _state_key(parameter_name: str, adapter_name: str = "default") -> str:
    """peft state-dict key of a parameter: the adapter name drops out of the path (LoRA's
    `lora_A.default.weight`, IA3's `ia3_l.default`); a prompt-learning method (prefix
    tuning) saves its prompt encoder's table as one tensor, `prompt_embeddings`."""
    if parameter_name.startswith(f"prompt_encoder.{adapter_name}."):
        return "prompt_embeddings"
    name = parameter_name.replace(f".modules_to_save.{adapter_name}.", ".")
    return re.sub(rf"\.{re.escape(adapter_name)}(?=\.|$)", "", name)


@dataclass(frozen=True)
class _Views:
    """peft's state of one model, kept between calls: the tensors `get_peft_model_state_dict`
    returns (for LoRA, views of the parameters themselves), the keys that train, and whether
    writing into those views writes the model (`direct`)."""

    fingerprint: tuple
    state: "OrderedDict[str, torch.Tensor]"
    trainable: tuple[str, ...]
    direct: bool


# peft's state dict walks the whole base model's state (~3.5 ms for MiniLM), and every
# virtual client call read it three times and wrote it once: ~25 ms a call, a few percent
# of a cross-device round. Cached per model, checked against the parameters' identity,
# storage and trainability at every use, so a model changed since is read again.
_VIEWS: "weakref.WeakKeyDictionary[PeftModel, _Views]" = weakref.WeakKeyDictionary()


def _fingerprint(model: PeftModel) -> tuple:
    return tuple((id(p), p.data_ptr(), p.requires_grad) for p in model.parameters())


def _views(model: PeftModel) -> _Views:
    fingerprint = _fingerprint(model)
    cached = _VIEWS.get(model)
    if cached is not None and cached.fingerprint == fingerprint:
        return cached
    state = get_peft_model_state_dict(model)
    trainable = {_state_key(n) for n, p in model.named_parameters() if p.requires_grad}
    keys = tuple(k for k in state if k in trainable)
    if len(keys) != len(trainable):  # a trainable parameter outside the adapter: a bug
        raise RuntimeError(f"trainable parameters outside the peft state: {sorted(trainable - set(keys))}")
    storage = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    # only LoRA's state is the parameters as they are (peft renames nothing else on load);
    # a prompt-learning method's table, say, is computed, and loads through peft
    lora = all(str(getattr(c, "peft_type", "")).endswith("LORA") for c in getattr(model, "peft_config", {}).values())
    direct = lora and all(t.data_ptr() in storage for t in state.values())
    views = _Views(fingerprint, state, keys, direct)
    _VIEWS[model] = views
    return views


def _current_state(model: PeftModel) -> "OrderedDict[str, torch.Tensor]":
    views = _views(model)
    return views.state if views.direct else get_peft_model_state_dict(model)


def adapter_state(model: PeftModel) -> "OrderedDict[str, np.ndarray]":
    """All adapter tensors (LoRA A, B and the head copy) as name -> numpy, in peft order."""
    return OrderedDict(
        (name, tensor.detach().cpu().numpy().copy()) for name, tensor in _current_state(model).items()
    )


def trainable_keys(model: PeftModel) -> list[str]:
    """peft state keys of the parameters that train (what a node releases each round)."""
    return list(_views(model).trainable)


def trainable_state(model: PeftModel) -> "OrderedDict[str, np.ndarray]":
    current = _current_state(model)
    return OrderedDict((k, current[k].detach().cpu().numpy().copy()) for k in trainable_keys(model))


def state_nbytes(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(array.nbytes for array in state.values()))


def state_num_parameters(state: Mapping[str, np.ndarray]) -> int:
    return int(sum(array.size for array in state.values()))


def load_state(model: PeftModel, state: Mapping[str, np.ndarray], partial: bool = False,
               frozen_may_be_missing: bool = False) -> None:
    """Write `state` into the model's adapter.

    `state` must hold exactly the adapter's tensors; with `partial`, any subset; with
    `frozen_may_be_missing`, it may leave out only frozen tensors (those a method fixes at
    their seeded init, e.g. FFA-LoRA's A), never one that trains: a cached model shared by
    virtual clients must not keep another client's trained values. Names, shapes and
    dtypes must match; nothing is written when any of them does not.
    """
    views = _views(model)
    current = views.state if views.direct else get_peft_model_state_dict(model)
    unknown = [k for k in state if k not in current]
    missing = [k for k in current if k not in state]
    if frozen_may_be_missing:
        trainable = set(trainable_keys(model))
        missing_trainable = [k for k in missing if k in trainable]
        partial = not missing_trainable
        missing = missing_trainable or missing
    if unknown or (missing and not partial):
        raise ModelError(f"adapter state does not match the model: unknown {unknown[:3]}, missing {missing[:3]}")
    for key, array in state.items():
        if tuple(array.shape) != tuple(current[key].shape):
            raise ModelError(f"adapter tensor {key}: shape {tuple(array.shape)}, model has {tuple(current[key].shape)}")
    tensors = {
        k: torch.as_tensor(np.asarray(v), dtype=current[k].dtype).to(current[k].device) for k, v in state.items()
    }
    if views.direct:  # the views are the parameters: write them in place, as peft's load would
        with torch.no_grad():
            for key, tensor in tensors.items():
                current[key].copy_(tensor)
        return
    if partial:
        tensors = {**{k: v for k, v in current.items() if k not in tensors}, **tensors}
    result = set_peft_model_state_dict(model, tensors)
    # a prompt-learning method's table is loaded into its encoder by peft directly, and then
    # reported as "unexpected" by the model-wide load that follows: not a refusal
    refused = [k for k in getattr(result, "unexpected_keys", None) or () if k != "prompt_embeddings"]
    if refused:
        raise ModelError(f"peft refused adapter tensors: {refused[:3]}")


def save_adapter_dir(model: PeftModel, directory: str | Path, extra_files: Mapping[str, str] = {},
                     base_reference: str | None = None) -> Path:
    """Save a stock PEFT adapter directory (plus `extra_files`, e.g. the label map or the
    model card README.md, which replaces peft's empty template). `base_reference` replaces
    the absolute base-model path peft records with a portable name.

    Written to a temporary sibling and renamed into place, so a crash leaves either the
    old directory or the new one.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        if base_reference:
            adapter_config = json.loads((staging / "adapter_config.json").read_text(encoding="utf-8"))
            adapter_config["base_model_name_or_path"] = base_reference
            (staging / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
        for name, text in extra_files.items():
            (staging / name).write_text(text, encoding="utf-8")
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_adapter_dir(base_model, directory: str | Path) -> PeftModel:
    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise ModelError(f"{directory}: not a PEFT adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(base_model, directory)


def save_merged(model: PeftModel, directory: str | Path, tokenizer=None) -> Path:
    """Merge LoRA into the base weights and save a plain transformers model.

    Merging rewrites the wrapped base weights, so call it on a model you are done with.
    """
    directory = Path(directory)
    merged = model.merge_and_unload()
    merged.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory
