"""The tight accountant ("pld": dp-accounting's privacy loss distribution) is an upper
bound: never below a finer PLD of the same mechanism, never above RDP, and a ledger that
uses it trains and is checked by Opacus's PRV."""

import random

import pytest

from conftest import tiny_config
from fedtune.privacy.accountants import compute_epsilon, independent_epsilon, noise_for_budget, pld_epsilon


@pytest.mark.parametrize("seed", range(6))
def test_pld_is_never_below_a_finer_pld_nor_above_rdp(seed):
    rng = random.Random(seed)
    sigma, q, steps = rng.uniform(0.6, 3.0), rng.uniform(0.01, 0.5), rng.randint(1, 300)
    delta = 10 ** rng.uniform(-7, -4)
    ours = compute_epsilon(sigma, q, steps, delta, "pld")
    finer = pld_epsilon([(sigma, q, steps)], delta, interval=1e-5)
    assert ours >= finer - 1e-9  # pessimistic discretization: a coarser grid only over-counts
    assert ours <= compute_epsilon(sigma, q, steps, delta, "rdp") + 1e-9


def test_pld_needs_less_noise_for_the_same_budget():
    sigma_rdp = noise_for_budget(8.0, 1e-5, 0.1, 30, "rdp")
    sigma_pld = noise_for_budget(8.0, 1e-5, 0.1, 30, "pld")
    assert sigma_pld < sigma_rdp
    assert compute_epsilon(sigma_pld, 0.1, 30, 1e-5, "pld") <= 8.0


def test_a_pld_ledger_trains_and_is_checked_by_opacus_prv(tiny_bert, sentiment_csv):
    from fedtune.training.dp_train import train_call
    from fedtune.training.local import prepare_node
    from fedtune.privacy.planning import new_ledger

    config = tiny_config(tiny_bert, sentiment_csv, dp={"accountant": "pld", "noise_seed": 0})
    node = prepare_node(config)
    ledger = new_ledger(config, node.plan)
    result = train_call(node.model, node.data.train, config, node.plan, ledger)
    assert result.epsilon == pytest.approx(pld_epsilon(ledger.history, ledger.delta)) and result.epsilon <= 8.0
    assert independent_epsilon("pld", ledger.history, ledger.delta) == pytest.approx(result.epsilon, rel=0.02)
