"""Step counts that match: the planned steps are exactly what Opacus runs and what the
ledger charges, for the sizes where floating point makes Opacus run int(1/q) = ceil(n/B) - 1
steps; and an empty Poisson batch is a DP step (noise only), not a crash."""

import math

import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from fedtune.training.dp_train import _noise_only_step, train_call
from fedtune.privacy.planning import new_ledger, poisson_schedule
from fedtune.training.local import prepare_node
from fedtune.privacy.randomness import Randomness
from tests.conftest import make_texts, tiny_config, write_csv


@pytest.mark.parametrize("batches", [93, 99, 105])
def test_planned_steps_run_and_the_ledger_matches(batches, tiny_bert, tmp_path):
    """ceil(n/B) = 93, 99, 105: Opacus's own loader would run int(1/q) = ceil(n/B) - 1 steps
    and account q = 1/(ceil(n/B) - 1); fedtune's plan runs and charges ceil(n/B) at q = 1/ceil(n/B)."""
    assert int(1 / (1 / batches)) == batches - 1  # the floating-point trap
    rows = 2 * batches - 1  # batch size 2: ceil(rows / 2) = batches
    data = write_csv(tmp_path / "rows.csv", make_texts(rows, seed=1))
    eval_data = write_csv(tmp_path / "eval.csv", make_texts(4, seed=2))
    node = prepare_node(tiny_config(tiny_bert, data, data={"eval_path": str(eval_data)},
                                    training={"batch_size": 2, "epochs": 1}, model={"max_seq_len": 8}))
    assert math.ceil(len(node.data.train) / 2) == batches
    assert (node.plan.sample_rate, node.plan.steps_per_epoch) == poisson_schedule(rows, 2) == (1 / batches, batches)
    ledger = new_ledger(node.config, node.plan)
    steps = []
    result = train_call(node.model, node.data.train, node.config, node.plan, ledger,
                        on_step=lambda step, loss: steps.append(step))  # raises if Opacus accounted anything else
    assert result.steps == len(steps) == batches
    assert ledger.history == [(node.plan.noise_multiplier, 1 / batches, batches)]


def test_empty_poisson_batches_are_noise_only_steps(tiny_bert, tmp_path):
    """Batch size 1 on 93 rows: about a third of the Poisson batches are empty."""
    data = write_csv(tmp_path / "rows.csv", make_texts(93, seed=5))
    eval_data = write_csv(tmp_path / "eval.csv", make_texts(4, seed=2))
    config = tiny_config(tiny_bert, data, data={"eval_path": str(eval_data)}, training={"batch_size": 1, "epochs": 1},
                         model={"max_seq_len": 8}, dp={"noise_seed": 11})
    node = prepare_node(config)
    losses = []
    ledger = new_ledger(config, node.plan)
    result = train_call(node.model, node.data.train, config, node.plan, ledger,
                        on_step=lambda step, loss: losses.append(loss))
    assert result.steps == node.plan.steps_per_epoch == 93 and len(losses) == 93
    assert result.empty_batches > 10  # ~34 expected (e^-1 of 93): each one a noise-only step, none a crash


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_noise_only_step_adds_exactly_the_gaussian_noise(mode):
    """On an empty batch the clipped sum is zero: SGD moves the weights by -lr * N(0, (sigma C)^2) / B."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(torch.zeros(10, 3), torch.zeros(10, dtype=torch.long)), batch_size=5)
    criterion = torch.nn.CrossEntropyLoss()
    engine = PrivacyEngine(accountant="rdp")
    noise = Randomness(4).torch_generator("noise")
    reference = Randomness(4).torch_generator("noise")
    prepared = engine.make_private(module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                                   noise_multiplier=2.0, max_grad_norm=0.5, poisson_sampling=True,
                                   noise_generator=noise, grad_sample_mode=mode, wrap_model=False)
    dp_optimizer = prepared[1]
    before = [p.detach().clone() for p in model.parameters()]
    _noise_only_step(dp_optimizer, list(model.parameters()), mode)
    for old, new in zip(before, model.parameters()):
        expected = torch.normal(0.0, 2.0 * 0.5, size=old.shape, generator=reference) / 5
        assert torch.allclose(old - new.detach(), expected, atol=1e-6)
    assert engine.accountant.history == [(2.0, 0.5, 1)]
    prepared[0].cleanup()


def test_large_poisson_batches_in_physical_chunks_give_the_same_classifier_update(tiny_bert, sentiment_csv):
    """The recipe's large batches on a small machine: a Poisson batch of ~48 rows run in
    physical chunks of 7 (as Opacus's BatchMemoryManager) takes the same clipped and noised
    step as the whole batch at once, with the same reproducible noise, and the ledger
    charges the same steps."""
    import numpy as np

    from fedtune.models.adapter_io import trainable_state

    results = []
    for chunk in (0, 7):
        config = tiny_config(tiny_bert, sentiment_csv, dp={"noise_seed": 11},
                             training={"batch_size": 48, "epochs": 2, "physical_batch_size": chunk})
        node = prepare_node(config)
        for module in node.model.modules():  # BERT's dropout draws from the global RNG: not the thing under test
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        ledger = new_ledger(config, node.plan)
        train_call(node.model, node.data.train, config, node.plan, ledger)
        results.append((trainable_state(node.model), ledger.history))
    (whole, charged_whole), (chunked, charged_chunked) = results
    assert charged_whole == charged_chunked
    assert any(not np.allclose(whole[k], 0) for k in whole if "lora_B" in k)  # it trained
    for key in whole:
        np.testing.assert_allclose(chunked[key], whole[key], rtol=1e-4, atol=1e-6)
