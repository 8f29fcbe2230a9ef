"""Base model + LoRA adapter through peft.

The base model comes from a local directory (or the bundled all-MiniLM-L6-v2); nothing
is fetched from a hub. Base weights are frozen: only LoRA tensors (and the task head when
configured) are trainable, and only those ever leave the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fedtune.errors import ModelError
from fedtune.system.quiet import verbose

if TYPE_CHECKING:  # annotations only: config validation reads the adapter registry, which builds on this module
    from fedtune.config import LoraSettings, ModelConfig


# Module names of the classification head per architecture family, for modules_to_save.
HEAD_MODULES = ("classifier", "score")



def _quiet_transformers() -> None:
    """Missing-head and weight-loading chatter is expected here (a fresh head on an
    encoder); silence it when we load, not at import. Hub access is already impossible:
    every load passes local_files_only=True."""
    if verbose():
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def bundled_model_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2, found without importing its package."""
    from fedtune.models.named import builtin_model_path

    return builtin_model_path("minilm")


def resolve_model_path(config: ModelConfig) -> Path:
    """The local folder of the base model: `model.path`, a bundled model's name
    (`fedtune.models.named`), or the task's default bundled model when empty."""
    from fedtune.models.named import builtin_model_path, bundled_name

    name = bundled_name(config.path, config.task)
    if name:
        return builtin_model_path(name)
    path = Path(config.path)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.path = {str(path)!r}: not a transformers model folder (no config.json)")
    return path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device = {name!r}: CUDA is not available on this machine")
    return torch.device(name)


def load_tokenizer(path: Path):
    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path = {str(path)!r}: no usable tokenizer ({exc})") from None
    if tokenizer.pad_token is None:  # GPT-2 / Llama style: pad with EOS, masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: Path, task: str, num_labels: int | None, pad_token_id: int | None):
    """The frozen base model for `task`, loaded from a local folder."""
    _quiet_transformers()
    try:
        model_config = AutoConfig.from_pretrained(path, local_files_only=True)
        if task == "classification":
            model_config.num_labels = num_labels
            model_config.id2label = {i: str(i) for i in range(num_labels)}
            model_config.label2id = {str(i): i for i in range(num_labels)}
            cls = AutoModelForSequenceClassification
        else:
            cls = AutoModelForCausalLM
        if pad_token_id is not None:
            model_config.pad_token_id = pad_token_id
        model = cls.from_pretrained(path, config=model_config, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path = {str(path)!r}: cannot load a {task} model ({exc})") from None
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def default_target_modules(model) -> list[str]:
    model_type = getattr(model.config, "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ModelError(
            f"no default LoRA target modules for model type {model_type!r}: set lora.target_modules"
        )
    return list(targets)


def attach_lora(base, lora: LoraSettings, task: str, seed: int) -> PeftModel:
    """Wrap `base` with a seeded LoRA adapter; FFA-LoRA freezes every A at its init.

    The seed fixes A's random init, so every federated node built with the same seed
    holds the same A (what makes FFA-LoRA's averaging exact).
    """
    targets = list(lora.target_modules) or default_target_modules(base)
    module_names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [t for t in targets if t not in module_names]
    if missing:
        raise ModelError(f"lora.target_modules: {missing} not found in the model")
    heads = [h for h in HEAD_MODULES if h in module_names] if task == "classification" else []
    config = LoraConfig(
        layers_to_transform=top_layer_indices(base, lora.top_layers),
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=heads or None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(base, config)
        if task == "classification":  # seed the fresh head too: same head on every node
            seed_head_copies(model, seed)
    if lora.ffa:
        for name, parameter in model.named_parameters():
            if ".lora_A." in name:
                parameter.requires_grad_(False)
    if not lora.train_head:
        for name, parameter in model.named_parameters():
            if ".modules_to_save." in name:
                parameter.requires_grad_(False)
    return model


def top_layer_indices(model, top_layers: int) -> list[int] | None:
    """The indices of the last `top_layers` transformer blocks (None = every block)."""
    if top_layers == 0:
        return None
    blocks = getattr(model.config, "num_hidden_layers", None)
    if not blocks:
        raise ModelError(f"lora.top_layers = {top_layers}: the model's config names no num_hidden_layers; use 0")
    if top_layers > blocks:
        raise ModelError(f"lora.top_layers = {top_layers}: the model has {blocks} transformer blocks; expected 0..{blocks}")
    return list(range(blocks - top_layers, blocks))


def ia3_targets(model) -> tuple[list[str], list[str]]:
    """peft's default IA3 target and feed-forward modules for the architecture."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)

    model_type = getattr(model.config, "model_type", None)
    targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ModelError(f"no default IA3 target modules for model type {model_type!r}: use adapter.method = 'lora'")
    return list(targets), list(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, []))


def seed_head_copies(model, seed: int) -> None:
    """Seed the fresh classification head copy: the same head on every node."""
    for module in _head_copies(model):
        _reset_linear(module, seed)


def _head_copies(model):
    for name, module in model.named_modules():
        if ".modules_to_save." in name + "." and isinstance(module, torch.nn.Linear):
            yield module


def _reset_linear(module: torch.nn.Linear, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        bound = 1.0 / max(1, module.in_features) ** 0.5
        module.weight.uniform_(-bound, bound, generator=generator)
        if module.bias is not None:
            module.bias.zero_()


def trainable_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def base_named_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters of the frozen base model (not LoRA, not the trainable head copy)."""
    return [
        (n, p)
        for n, p in model.named_parameters()
        if "lora_" not in n and ".modules_to_save." not in n
    ]
