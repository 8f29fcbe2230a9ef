"""PEFT methods beyond LoRA (IA3, prefix tuning) under DP-SGD on a tiny random-init
Llama: per-example gradients are exact, each method trains, changes, averages and
round-trips through a stock PEFT directory; a Poisson batch cut into physical chunks is
the same DP-SGD step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from peft import PeftModel
from torch.utils.data import DataLoader

from conftest import tiny_config
from fedtune.models.adapter_io import load_state, save_adapter_dir, trainable_state
from fedtune.federation.aggregate import weighted_mean
from fedtune.training.dp_train import _forward_loss, train_call
from fedtune.training.local import prepare_node
from fedtune.training.losses import PerExampleLoss
from fedtune.models.base import load_base_model, trainable_named_parameters
from fedtune.privacy.planning import new_ledger

METHODS = {"lora": {}, "ia3": {"grad_sample_mode": "loop"}, "prefix": {}}


def _config(model_dir, data, method: str, **sections):
    dp = {"noise_seed": 0, **METHODS[method], **sections.pop("dp", {})}
    return tiny_config(model_dir, data, model={"task": "instruct", "max_seq_len": 32}, adapter={"method": method},
                       dp=dp, **sections)


def _loop_gradients(model, batch, criterion):
    """Per-example gradients, one example at a time: the definition."""
    parameters = [p for _, p in trainable_named_parameters(model)]
    rows = []
    for row in range(len(batch[-1])):
        logits, labels = _forward_loss(model, [part[row:row + 1] for part in batch], criterion, "instruct", torch.device("cpu"))
        rows.append([g.detach() for g in torch.autograd.grad(criterion(logits, labels), parameters)])
    return [torch.stack(column) for column in zip(*rows)]


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_opacus_per_example_gradients_equal_a_per_example_loop(method, tiny_chat_llama, instruct_csv):
    """One instruct example (prompt + response) is the unit Opacus clips: its per-sample
    gradients must be that example's own gradient, padding and batch mates aside."""
    node = prepare_node(_config(tiny_chat_llama, instruct_csv, method))
    model, criterion = node.model, PerExampleLoss("instruct")
    model.train()
    batch = next(iter(DataLoader(node.data.train, batch_size=6)))
    expected = _loop_gradients(model, batch, criterion)
    parameters = [p for _, p in trainable_named_parameters(model)]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    hooks, _, _ = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=DataLoader(node.data.train),
                                               noise_multiplier=1.0, max_grad_norm=1.0, wrap_model=False,
                                               poisson_sampling=False)
    try:
        logits, labels = _forward_loss(model, batch, criterion, "instruct", torch.device("cpu"))
        criterion(logits, labels).backward()
        for parameter, reference in zip(parameters, expected):
            assert parameter.grad_sample.shape == reference.shape
            assert torch.allclose(parameter.grad_sample, reference, atol=1e-5, rtol=1e-4)
    finally:
        hooks.cleanup()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_under_dp_changes_averages_and_round_trips(method, tiny_chat_llama, instruct_csv, tmp_path):
    configs = [_config(tiny_chat_llama, instruct_csv, method, dp={"noise_seed": seed}) for seed in (1, 2)]
    nodes = [prepare_node(config) for config in configs]
    initial = trainable_state(nodes[0].model)
    for node in nodes:  # train_call itself refuses an adapter that did not change (opacus#820)
        result = train_call(node.model, node.data.train, node.config, node.plan, new_ledger(node.config, node.plan))
        assert result.private and result.epsilon <= 8
    states = [trainable_state(node.model) for node in nodes]
    for state in states:  # under DP every tensor receives noise: all of them moved
        assert all(not np.array_equal(state[k], initial[k]) for k in state)
    mean = weighted_mean(states, [1.0, 1.0])
    model = nodes[0].model
    load_state(model, mean, frozen_may_be_missing=True)
    for key, value in trainable_state(model).items():
        np.testing.assert_allclose(value, (states[0][key] + states[1][key]) / 2, rtol=1e-6, atol=1e-7)
    directory = save_adapter_dir(model, tmp_path / "adapter")
    base = load_base_model(tiny_chat_llama, "instruct", None, nodes[0].tokenizer.pad_token_id)
    reloaded = PeftModel.from_pretrained(base, directory).eval()
    model.eval()
    input_ids, mask, _ = nodes[0].data.val.tensors
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=input_ids, attention_mask=mask).logits,
                           model(input_ids=input_ids, attention_mask=mask).logits)


def _merged_weight(model, name: str) -> torch.Tensor:
    return dict(model.merge_and_unload().named_parameters())[name].detach().clone()


@pytest.mark.parametrize("method, exact", [("ia3", True), ("ffa-lora", True), ("lora", False)])
def test_which_methods_average_exactly(method, exact, tiny_chat_llama, instruct_csv):
    """FedAvg of the adapters equals the average of the merged weight updates for IA3 and
    FFA-LoRA (linear in what trains), not for LoRA (B A is a product)."""
    lora = {"ffa": method == "ffa-lora"}
    name = "ia3" if method == "ia3" else "lora"
    config = _config(tiny_chat_llama, instruct_csv, name, lora=lora, dp={"enabled": False})
    nodes = [prepare_node(config) for _ in range(3)]
    for seed, node in enumerate(nodes[:2]):  # two different adapters, made directly
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, parameter in trainable_named_parameters(node.model):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    mean = weighted_mean([trainable_state(n.model) for n in nodes[:2]], [1.0, 1.0])
    load_state(nodes[2].model, mean, frozen_may_be_missing=True)
    weight = "model.layers.0.self_attn.v_proj.weight"
    merged = [_merged_weight(n.model, weight) for n in nodes]
    assert torch.allclose((merged[0] + merged[1]) / 2, merged[2], atol=1e-6) == exact


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_physical_chunks_give_the_same_dp_step(mode, tiny_chat_llama, instruct_csv):
    """BatchMemoryManager-style chunks: each Poisson batch runs in chunks of 3 rows and
    takes one DP-SGD step; with the same (reproducible) noise the adapter ends where one
    pass over each whole batch takes it, and Opacus accounts the same steps."""
    results = []
    for chunk in (0, 3):
        config = _config(tiny_chat_llama, instruct_csv, "lora", dp={"grad_sample_mode": mode, "noise_seed": 5},
                         training={"physical_batch_size": chunk, "batch_size": 16})
        node = prepare_node(config)
        ledger = new_ledger(config, node.plan)
        train_call(node.model, node.data.train, config, node.plan, ledger)
        results.append((trainable_state(node.model), ledger.history))
    (whole, history_whole), (chunked, history_chunked) = results
    assert history_whole == history_chunked
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-4, atol=1e-6)


def test_ia3_under_hooks_is_refused_not_silently_unprotected(tiny_chat_llama, instruct_csv):
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="Opacus has no per-sample rule for peft's IA3"):
        _config(tiny_chat_llama, instruct_csv, "ia3", dp={"grad_sample_mode": "hooks"})


def test_ia3_trains_a_classifier_under_dp_with_its_head(tiny_bert, sentiment_csv):
    """IA3 is not only for causal LMs: on an encoder classifier the scaling vectors and the
    fresh head train together under DP-SGD, with exact per-example gradients."""
    config = tiny_config(tiny_bert, sentiment_csv, adapter={"method": "ia3"},
                         dp={"grad_sample_mode": "loop", "noise_seed": 3})
    node = prepare_node(config)
    names = [name for name, _ in trainable_named_parameters(node.model)]
    assert any("ia3_l" in name for name in names) and any("modules_to_save" in name for name in names)
    before = trainable_state(node.model)
    result = train_call(node.model, node.data.train, config, node.plan, new_ledger(config, node.plan))
    after = trainable_state(node.model)
    assert result.private and all(not np.array_equal(before[k], after[k]) for k in before)
