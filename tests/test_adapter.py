"""Adapter I/O: stock peft loads what fedtune saves, to identical logits."""

import numpy as np
import pytest
import torch
from peft import PeftModel

from fedtune.models.adapter_io import load_state, save_adapter_dir, save_merged, state_nbytes, trainable_state
from fedtune.training.dp_train import train_call
from fedtune.privacy.planning import new_ledger
from fedtune.errors import ModelError
from fedtune.training.local import prepare_node
from fedtune.models.base import load_base_model
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tiny_bert, sentiment_csv):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv))
    train_call(node.model, node.data.train, node.config, node.plan, new_ledger(node.config, node.plan))
    node.model.eval()
    return node


def _logits(model, node):
    input_ids, mask, _ = node.data.val.tensors
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits


def test_peft_dir_round_trip_gives_identical_logits(trained, tiny_bert, tmp_path):
    directory = save_adapter_dir(trained.model, tmp_path / "adapter", {"label_map.json": "{}"})
    base = load_base_model(tiny_bert, "classification", 2, trained.tokenizer.pad_token_id)
    reloaded = PeftModel.from_pretrained(base, directory).eval()
    assert torch.equal(_logits(reloaded, trained), _logits(trained.model, trained))
    assert (directory / "label_map.json").is_file()


def test_state_round_trip_and_size(trained, tiny_bert):
    state = trainable_state(trained.model)
    assert state_nbytes(state) == sum(a.size * 4 for a in state.values())
    fresh = prepare_node(trained.config)
    load_state(fresh.model, state)
    fresh.model.eval()
    assert torch.equal(_logits(fresh.model, trained), _logits(trained.model, trained))


def test_load_state_rejects_mismatches(trained):
    state = trainable_state(trained.model)
    key = next(iter(state))
    wrong_shape = {**state, key: np.zeros((3, 3), np.float32)}
    with pytest.raises(ModelError, match="shape"):
        load_state(trained.model, wrong_shape)
    missing = dict(list(state.items())[1:])
    with pytest.raises(ModelError, match="missing"):
        load_state(trained.model, missing)
    with pytest.raises(ModelError, match="unknown"):
        load_state(trained.model, {**state, "nope.weight": np.zeros(1, np.float32)})


def test_merged_model_matches_adapter(trained, tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    expected = _logits(trained.model, trained)
    fresh = prepare_node(trained.config)
    load_state(fresh.model, trainable_state(trained.model))
    merged_dir = save_merged(fresh.model, tmp_path / "merged", trained.tokenizer)
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert torch.allclose(_logits(merged, trained), expected, atol=1e-5)


def test_only_frozen_tensors_may_be_left_out_of_a_payload(tiny_bert, sentiment_csv):
    """FFA-LoRA sends B only after round 1 (A is frozen at its seeded init); a payload that
    leaves out a tensor that trains is refused, so a model shared by virtual clients never
    keeps another client's trained values."""
    import pytest

    from fedtune.models.adapter_io import adapter_state, load_state, trainable_keys
    from fedtune.errors import ModelError

    node = prepare_node(tiny_config(tiny_bert, sentiment_csv, lora={"ffa": True}))
    full = adapter_state(node.model)
    travelling = {k: full[k] for k in trainable_keys(node.model)}
    assert len(travelling) < len(full)
    load_state(node.model, travelling, frozen_may_be_missing=True)
    without_b = {k: v for k, v in full.items() if ".lora_B." not in k}
    with pytest.raises(ModelError, match="missing"):
        load_state(node.model, without_b, frozen_may_be_missing=True)


def test_top_layers_adapts_only_the_last_blocks_and_trains_under_dp(tiny_bert, sentiment_csv):
    """lora.top_layers = 1 on a 2-block model: LoRA only in block 1 (plus the head), so
    fewer coordinates are noised, and DP-SGD trains exactly those."""
    every = prepare_node(tiny_config(tiny_bert, sentiment_csv))
    top = prepare_node(tiny_config(tiny_bert, sentiment_csv, lora={"top_layers": 1}, dp={"noise_seed": 0}))
    lora_every = [k for k in trainable_state(every.model) if "lora_" in k]
    lora_top = [k for k in trainable_state(top.model) if "lora_" in k]
    assert lora_top and all(".layer.1." in k for k in lora_top)
    assert len(lora_top) * 2 == len(lora_every)
    before = trainable_state(top.model)
    train_call(top.model, top.data.train, top.config, top.plan, new_ledger(top.config, top.plan))
    after = trainable_state(top.model)
    assert any(not np.array_equal(before[k], after[k]) for k in lora_top if "lora_B" in k)


def test_top_layers_beyond_the_model_is_a_one_line_error(tiny_bert, sentiment_csv):
    with pytest.raises(ModelError, match=r"lora.top_layers = 3: the model has 2 transformer blocks"):
        prepare_node(tiny_config(tiny_bert, sentiment_csv, lora={"top_layers": 3}))


def test_loading_through_the_kept_views_equals_peft_own_load_and_follows_changes(tiny_bert, sentiment_csv):
    """The state views kept between calls write what peft's `set_peft_model_state_dict`
    writes (same logits), are read again once the parameters change (a frozen tensor leaves
    the trainable keys), and a refused state still writes nothing."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from fedtune.models.adapter_io import _views, adapter_state, trainable_keys

    ours, theirs = (prepare_node(tiny_config(tiny_bert, sentiment_csv)) for _ in range(2))
    assert _views(ours.model).direct
    rng = np.random.default_rng(0)
    state = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in adapter_state(ours.model).items()}
    load_state(ours.model, state)
    set_peft_model_state_dict(theirs.model, {k: torch.as_tensor(v) for k, v in state.items()})
    ours.model.eval(), theirs.model.eval()
    assert torch.equal(_logits(ours.model, ours), _logits(theirs.model, ours))
    assert all(np.array_equal(adapter_state(ours.model)[k], state[k]) for k in state)
    assert all(np.array_equal(get_peft_model_state_dict(ours.model)[k].numpy(), state[k]) for k in state)

    frozen = next(k for k in trainable_keys(ours.model) if "lora_A" in k)
    for name, parameter in ours.model.named_parameters():
        if "lora_A" in name and name.replace(".default", "") == frozen:
            parameter.requires_grad_(False)
    assert frozen not in trainable_keys(ours.model) and frozen not in trainable_state(ours.model)

    before = adapter_state(ours.model)
    bad = {**{k: v + 1 for k, v in state.items()}, frozen: np.zeros((1, 1), np.float32)}
    with pytest.raises(ModelError, match="shape"):
        load_state(ours.model, bad)
    assert all(np.array_equal(adapter_state(ours.model)[k], before[k]) for k in before)
