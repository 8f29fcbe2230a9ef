"""DP training on tiny real models: what changes, what must not, and the ledger order."""

import math

import pytest
import torch

from fedtune.models.adapter_io import adapter_state, state_num_parameters, trainable_state
from fedtune.training.dp_train import save_to, train_call
from fedtune.privacy.planning import new_ledger
from fedtune.errors import AdapterNotUpdatedError, BudgetExhaustedError
from fedtune.training.local import prepare_node
from fedtune.models.base import base_named_parameters
from fedtune.privacy import PrivacyLedger
from tests.conftest import tiny_config


def _train(node, ledger=None, ledger_path=None):
    ledger = ledger or new_ledger(node.config, node.plan)
    persist = save_to(ledger_path) if ledger_path else None
    return train_call(node.model, node.data.train, node.config, node.plan, ledger, persist), ledger


def test_base_weights_unchanged_and_adapter_changed(tiny_bert, sentiment_csv):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv))
    base_before = {n: p.detach().clone() for n, p in base_named_parameters(node.model)}
    adapter_before = trainable_state(node.model)
    result, ledger = _train(node)
    assert result.steps == node.plan.steps_per_call and result.private
    for name, parameter in base_named_parameters(node.model):
        assert torch.equal(parameter, base_before[name]), name
    after = trainable_state(node.model)
    assert all((after[k] != adapter_before[k]).any() for k in after)
    assert ledger.epsilon() == pytest.approx(result.epsilon)


def test_extracted_state_is_only_adapter_and_head(tiny_bert, sentiment_csv):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv))
    state = trainable_state(node.model)
    assert all(".lora_A." in k or ".lora_B." in k or ".classifier." in k for k in state)
    assert any(".classifier." in k for k in state)
    trainable, total = node.model.get_nb_trainable_parameters()
    assert state_num_parameters(state) == trainable < total
    assert list(state) == list(adapter_state(node.model))  # nothing frozen outside FFA


def test_ffa_lora_leaves_every_a_unchanged(tiny_bert, sentiment_csv):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv, lora={"ffa": True}))
    before = adapter_state(node.model)
    _train(node)
    after = adapter_state(node.model)
    a_keys = [k for k in before if ".lora_A." in k]
    assert a_keys and all((before[k] == after[k]).all() for k in a_keys)
    assert all((before[k] != after[k]).any() for k in after if ".lora_B." in k)
    assert not any(".lora_A." in k for k in trainable_state(node.model))


def test_same_seed_gives_same_ffa_a_on_every_node(tiny_bert, sentiment_csv):
    first = adapter_state(prepare_node(tiny_config(tiny_bert, sentiment_csv, lora={"ffa": True})).model)
    second = adapter_state(prepare_node(tiny_config(tiny_bert, sentiment_csv, lora={"ffa": True})).model)
    assert all((first[k] == second[k]).all() for k in first)


def test_ghost_clipping_matches_hooks(tiny_bert, sentiment_csv):
    """Same (explicitly reproducible) batches and noise: the two per-sample-gradient modes agree."""
    results = {}
    for mode in ("hooks", "ghost"):
        node = prepare_node(tiny_config(tiny_bert, sentiment_csv, dp={"grad_sample_mode": mode, "noise_seed": 0}))
        _train(node)
        results[mode] = trainable_state(node.model)
    for key in results["hooks"]:
        assert results["hooks"][key] == pytest.approx(results["ghost"][key], abs=1e-5), key


def test_hooks_and_per_sample_state_removed_after_call(tiny_bert, sentiment_csv):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv, training={"rounds": 2}))
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in node.model.modules())
    ledger = new_ledger(node.config, node.plan)
    for _ in range(2):
        train_call(node.model, node.data.train, node.config, node.plan, ledger)
        hooks_after = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in node.model.modules())
        assert hooks_after == hooks_before
        assert not any(hasattr(p, "grad_sample") for p in node.model.parameters())
    assert ledger.history[0][2] == 2 * node.plan.steps_per_call


def test_ledger_is_written_before_training(tiny_bert, sentiment_csv, tmp_path):
    """A crash mid-training must cost budget: the charge is on disk before step one."""
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv))
    broken = torch.utils.data.TensorDataset(*[t[:0] for t in node.data.train.tensors])  # fails in the loader
    path = tmp_path / "ledger.json"
    ledger = new_ledger(node.config, node.plan)
    with pytest.raises(Exception):
        train_call(node.model, broken, node.config, node.plan, ledger, save_to(path))
    assert PrivacyLedger.load(path).steps == node.plan.steps_per_call


def test_budget_exhausted_refuses_before_touching_the_model(tiny_bert, sentiment_csv, tmp_path):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv))  # planned for 1 round
    ledger = new_ledger(node.config, node.plan)
    _train(node, ledger)
    before = trainable_state(node.model)
    with pytest.raises(BudgetExhaustedError):
        _train(node, ledger, tmp_path / "ledger.json")
    assert all((before[k] == v).all() for k, v in trainable_state(node.model).items())
    assert not (tmp_path / "ledger.json").exists()


def test_adapter_that_does_not_move_is_detected(tiny_bert, sentiment_csv):
    """The opacus#820 symptom (epsilon spent, adapter frozen) raises instead of passing."""
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv, training={"learning_rate": 1e-30, "optimizer": "sgd"}))
    with pytest.raises(AdapterNotUpdatedError, match="did not change"):
        _train(node)


def test_non_private_training_is_labelled_infinite(tiny_bert, sentiment_csv):
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv, dp={"enabled": False}))
    result, ledger = _train(node)
    assert not result.private and math.isinf(result.epsilon) and math.isinf(ledger.epsilon())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_causal_lm_trains_under_dp(fixture, request, sentiment_csv):
    from fedtune.training.evaluate import evaluate

    model_dir = request.getfixturevalue(fixture)
    node = prepare_node(tiny_config(model_dir, sentiment_csv, model={"task": "causal-lm"}, training={"epochs": 2}))
    before = evaluate(node.model, node.data.val, "causal-lm")
    base_before = {n: p.detach().clone() for n, p in base_named_parameters(node.model)}
    result, _ = _train(node)
    after = evaluate(node.model, node.data.val, "causal-lm")
    assert math.isfinite(result.mean_loss) and after["perplexity"] == pytest.approx(math.exp(after["loss"]))
    assert after["loss"] != before["loss"]
    assert all(torch.equal(p, base_before[n]) for n, p in base_named_parameters(node.model))
    assert all(".lora_" in k for k in trainable_state(node.model))


def test_a_call_starts_clean_of_opacus_leftovers_on_a_shared_model(tiny_bert, sentiment_csv):
    """A cached model serves many clients: a partial per-sample gradient or captured
    activation left by an interrupted call must not leak into the next client's batches."""
    node = prepare_node(tiny_config(tiny_bert, sentiment_csv))
    lora_b = next(p for n, p in node.model.named_parameters() if ".lora_B." in n)
    lora_b._current_grad_sample = torch.zeros((3,) + tuple(lora_b.shape))  # as a broken step leaves it
    linear = next(m for n, m in node.model.named_modules() if n.endswith("lora_B.default"))
    linear.activations = [[torch.zeros(3, 5, 8)]]
    _train(node)
    assert not any("_current_grad_sample" in vars(p) or "grad_sample" in vars(p) for p in node.model.parameters())
    assert not any("activations" in vars(m) for m in node.model.modules())
