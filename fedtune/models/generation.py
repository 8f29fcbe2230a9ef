"""`fedtune generate`: try an instruct adapter on prompts of your own.

The adapter directory is a stock PEFT one (from `train-local`, `simulate` or `export`);
its base model is the bundled model or folder it names, or `--model`. Prompts are
rendered with the base tokenizer's chat template (or the plain template), exactly as in
training, and answered greedily. Nothing leaves the machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.config import ModelConfig
from fedtune.errors import FedtuneError, ModelError


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line of a text file, or the `prompt` field of each JSONL line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedtuneError(f"--file {path}: not found") from None
    except UnicodeDecodeError:
        raise FedtuneError(f"--file {path}: not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), start=1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FedtuneError(f"--file {path}: line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise FedtuneError(f"--file {path}: line {number} has no text field \"prompt\"")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise FedtuneError(f"--file {path}: no prompts")
    return prompts


def load_for_generation(adapter_dir: str | Path, model: str = "", device: str = "auto"):
    """(peft model, tokenizer) for an instruct / causal-LM adapter directory."""
    from fedtune.models.adapter_io import load_adapter_dir
    from fedtune.models.base import load_base_model, load_tokenizer, resolve_device, resolve_model_path

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelError(f"{adapter_dir}: not a PEFT adapter directory (no adapter_config.json)")
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    if adapter_config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ModelError(f"{adapter_dir}: a {adapter_config.get('task_type')} adapter; generate needs one trained with "
                         "task instruct or causal-lm")
    base = model or adapter_config.get("base_model_name_or_path") or ""
    try:
        path = resolve_model_path(ModelConfig(path=base, task="instruct"))
    except ModelError:
        raise ModelError(f"{adapter_dir}: its base model {base!r} is neither a bundled model nor a folder here; "
                         "pass --model PATH") from None
    tokenizer = load_tokenizer(path)
    network = load_base_model(path, "causal-lm", None, tokenizer.pad_token_id)
    peft_model = load_adapter_dir(network, adapter_dir).to(resolve_device(device))
    return peft_model, tokenizer


def generate_answers(adapter_dir: str | Path, prompts: list[str], max_new_tokens: int = 64, model: str = "",
                     device: str = "auto") -> list[str]:
    from fedtune.data.instruct import generate

    if not 1 <= max_new_tokens <= 4096:
        raise FedtuneError(f"--max-new-tokens = {max_new_tokens}: expected a whole number in [1, 4096]")
    peft_model, tokenizer = load_for_generation(adapter_dir, model, device)
    return generate(peft_model, tokenizer, prompts, max_new_tokens)
