"""Does fedtune's DP-SGD divide the noisy sum by a constant, or by the batch it drew?

The sampled-Gaussian accounting fedtune charges assumes each step releases
(clipped sum + N(0, (sigma C)^2)) / K with K a constant (Opacus's expected batch size). An
implementation that divides by the *drawn* batch's size instead releases how many rows the
Poisson draw took, and a record's presence changes that count: a 2026 analysis (arXiv
2605.15648) shows such normalisation can leak beyond the accounted curve. The test an
auditor runs: rows that are all the same, so every per-example gradient is one vector g
(clipped alike, whatever C; noise negligible), and two trainings whose Poisson
draws took different numbers of rows. With a constant K the update is lr x (rows drawn) x
g / K, so update / rows is the same in both; with the drawn size it would be lr x (steps) x
g, the same update whatever was drawn. Checked on every path a step takes: Opacus's hooks,
ghost clipping, physical chunks of 2 rows, and the per-example loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedtune.models.base import trainable_named_parameters
from fedtune.privacy.planning import new_ledger
from fedtune.privacy.randomness import Randomness
from fedtune.training.dp_train import train_call
from fedtune.training.local import prepare_node
from tests.conftest import tiny_config, write_csv

LEARNING_RATE = 1e-3  # small: the gradient barely moves over a call's steps


def _update_per_row(model, data, seed: int, physical: int, dp: dict) -> tuple[int, dict[str, np.ndarray]]:
    config = tiny_config(model, data, training={"batch_size": 8, "epochs": 1, "rounds": 1, "optimizer": "sgd",
                                                     "learning_rate": LEARNING_RATE, "weight_decay": 0.0,
                                                     "physical_batch_size": physical},
                         dp={"noise_seed": seed, "max_grad_norm": 1.0, **dp}, lora={"dropout": 0.0},
                         data={"labels": ["neg", "pos"]})  # every row "pos": declared, the other class exists
    node = prepare_node(config)
    # noise 1e-5 x C on the sum: far below the signal, yet it moves every tensor (as fedtune checks)
    plan = dataclasses.replace(node.plan, noise_multiplier=1e-5)
    ledger = new_ledger(config, plan, node.data.fingerprint)
    ledger.max_epsilon = None
    before = {n: p.detach().clone() for n, p in trainable_named_parameters(node.model)}
    result = train_call(node.model, node.data.train, config, plan, ledger, randomness=Randomness(seed))
    after = dict(trainable_named_parameters(node.model))
    return result.examples_seen, {n: ((before[n] - after[n].detach()) / result.examples_seen).numpy() for n in before}


@pytest.mark.parametrize("dp", [{}, {"grad_sample_mode": "ghost"}, {"grad_sample_mode": "loop"}],
                         ids=["hooks", "ghost", "loop"])
@pytest.mark.parametrize("physical", [0, 2], ids=["whole-batch", "chunks-of-2"])
def test_the_noisy_sum_is_divided_by_a_constant_not_by_the_rows_drawn(tiny_bert_without_dropout, tmp_path, dp,
                                                                       physical):
    if physical and dp.get("grad_sample_mode") == "loop":
        pytest.skip("the per-example loop has no physical chunks")
    data = write_csv(tmp_path / "same.csv", [("the same review, word for word", "pos")] * 40)
    runs = {}
    for seed in range(1, 40):  # two Poisson draws of different sizes
        seen, per_row = _update_per_row(tiny_bert_without_dropout, data, seed, physical, dp)  # no dropout: one g
        runs.setdefault(seen, per_row)
        if len(runs) == 2:
            break
    (small, first), (large, second) = sorted(runs.items())
    assert small < large
    moved = [name for name in first if np.abs(first[name]).max() > 1e-7]  # above the noise (LoRA A: noise only)
    assert moved  # the head and LoRA's B learn from the first step
    assert small / large < 0.95  # a drawn-size K would show: per row it would shrink by small/large
    for name in moved:  # constant K: the same update per row drawn, tensor by tensor
        ratio = np.linalg.norm(first[name]) / np.linalg.norm(second[name])
        assert abs(ratio - 1.0) < 0.02, (name, ratio, small / large)
        cosine = float((first[name] * second[name]).sum() / np.linalg.norm(first[name]) / np.linalg.norm(second[name]))
        assert cosine > 0.99, (name, cosine)
