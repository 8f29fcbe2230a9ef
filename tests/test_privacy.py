"""The planner and the ledger agree with Opacus's own accountants, compose across calls
and restarts, and refuse to overspend."""

import math

import pytest
import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from fedtune.errors import BudgetExhaustedError, ConfigError, FedtuneError
from fedtune.privacy import ACCOUNTANTS, PrivacyLedger, compute_epsilon, noise_for_budget


@pytest.mark.parametrize("name, cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_compute_epsilon_equals_opacus_accountant(name, cls):
    accountant = cls()
    accountant.history = [(1.1, 0.01, 500)]
    assert compute_epsilon(1.1, 0.01, 500, 1e-5, accountant=name) == accountant.get_epsilon(delta=1e-5)


def test_epsilon_equals_a_real_opacus_training_run():
    """Prepare: a real PrivacyEngine trains a linear model for 7 steps.
    Assert: compute_epsilon from the logged (sigma, q, steps) gives its epsilon exactly."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    model = torch.nn.Linear(4, 2)
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=0.9, max_grad_norm=1.0,
    )
    steps = 0
    for x, y in loader:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        steps += 1
    assert compute_epsilon(0.9, 1 / 8, steps, 1e-5) == pytest.approx(engine.get_epsilon(1e-5), rel=0, abs=0)


def test_noise_for_budget_is_tight_and_within_target():
    sigma = noise_for_budget(3.0, 1e-5, 0.02, 1000)
    assert compute_epsilon(sigma, 0.02, 1000, 1e-5) <= 3.0
    assert compute_epsilon(sigma * 0.97, 0.02, 1000, 1e-5) > 3.0


def test_ledger_save_load_continue_equals_uninterrupted(tmp_path):
    for accountant in ("rdp", "prv"):
        kept = PrivacyLedger(accountant=accountant, delta=1e-5, max_epsilon=50)
        restarted = PrivacyLedger(accountant=accountant, delta=1e-5, max_epsilon=50)
        for call in range(3):
            kept.charge(1.0, 0.05, 40)
            restarted.charge(1.0, 0.05, 40)
            restarted.save(tmp_path / f"{accountant}.json")
            restarted = PrivacyLedger.load(tmp_path / f"{accountant}.json")
        restarted.charge(1.3, 0.05, 10)
        kept.charge(1.3, 0.05, 10)
        assert restarted.epsilon() == kept.epsilon()
        assert restarted.history == kept.history == [(1.0, 0.05, 120), (1.3, 0.05, 10)]
        assert restarted.epsilon() == kept.to_opacus().get_epsilon(delta=1e-5)


def test_budget_refusal_leaves_ledger_unchanged():
    sigma = noise_for_budget(2.0, 1e-5, 0.1, 100)
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, max_epsilon=2.0)
    ledger.charge(sigma, 0.1, 50)
    ledger.charge(sigma, 0.1, 50)
    before = (list(ledger.history), ledger.epsilon())
    with pytest.raises(BudgetExhaustedError, match="exhausted"):
        ledger.charge(sigma, 0.1, 1)
    assert (ledger.history, ledger.epsilon()) == before
    assert ledger.epsilon() <= 2.0


def test_non_private_ledger_is_infinite_forever():
    ledger = PrivacyLedger(accountant="rdp", delta=1e-5, max_epsilon=None)
    ledger.charge_non_private(10)
    assert math.isinf(ledger.epsilon()) and not ledger.is_private
    assert ledger.to_dict()["epsilon"] == "inf"


def test_bad_inputs_are_rejected_with_the_value():
    with pytest.raises(ConfigError, match="delta = 1.5"):
        compute_epsilon(1.0, 0.1, 10, 1.5)
    with pytest.raises(ConfigError, match="sample_rate = 0"):
        compute_epsilon(1.0, 0, 10, 1e-5)
    with pytest.raises(ConfigError, match="target_epsilon = -1"):
        noise_for_budget(-1, 1e-5, 0.1, 10)
    with pytest.raises(ConfigError, match="accountant = 'gdp2'"):
        compute_epsilon(1.0, 0.1, 10, 1e-5, accountant="gdp2")


def test_corrupt_ledger_file_is_a_clear_error(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(FedtuneError, match="not valid JSON"):
        PrivacyLedger.load(path)
    path.write_text('{"format": 1}')
    with pytest.raises(FedtuneError, match="not a fedtune privacy ledger"):
        PrivacyLedger.load(path)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_every_ledger_epsilon_is_reproduced_by_an_independent_accountant(accountant, tmp_path, capsys):
    """DP-SGD steps, a change of sample rate and Gaussian metric releases (q = 1) in one ledger:
    the other library (dp-accounting's RDP, or its PLD for PRV ledgers; Opacus's PRV for PLD
    ledgers) agrees with the epsilon fedtune prints, and the command names both."""
    from fedtune.cli import main
    from fedtune.privacy import independent_epsilon

    ledger = PrivacyLedger(accountant, delta=1e-5, max_epsilon=20.0)
    ledger.charge(0.9, 0.02, 400)
    ledger.charge(5.0, 1.0, 2)
    ledger.charge(0.9, 0.025, 100)
    assert independent_epsilon(accountant, ledger.history, ledger.delta) == pytest.approx(ledger.epsilon(), rel=0.02)
    ledger.save(tmp_path / "ledger.json")
    assert main(["privacy", "ledger", str(tmp_path / "ledger.json")]) == 0
    out = capsys.readouterr().out
    assert f"epsilon = {ledger.epsilon():.6f}" in out
    if accountant == "pld":
        assert "(dp-accounting, pld)" in out and "PRV)" in out
    else:
        assert f"({ACCOUNTANTS[accountant].check_library})" in out and "dp-accounting" in out


def test_a_cap_change_and_a_stricter_delta_are_recorded_and_never_undercount():
    ledger = PrivacyLedger("rdp", delta=1e-4, max_epsilon=3.0)
    ledger.charge(1.5, 0.05, 200)
    before = ledger.epsilon()
    ledger.lower_delta(1e-6)
    ledger.lower_delta(1e-3)  # a larger delta is never taken
    assert ledger.delta == 1e-6 and ledger.epsilon() > before
    ledger.set_cap(8.0)
    assert [c.get("event") for c in ledger.calls[-2:]] == ["delta lowered", "cap set"]
    restored = PrivacyLedger.from_dict(ledger.to_dict())
    assert restored.max_epsilon == 8.0 and restored.delta == 1e-6 and restored.epsilon() == ledger.epsilon()


def test_a_new_accountant_is_one_registry_entry(monkeypatch, capsys):
    """An accountant added to `ACCOUNTANTS` alone is accepted by config validation, counted by
    the ledger and offered by the command line: no other file names accountants."""
    from fedtune.cli import main
    from fedtune.config import build_config

    monkeypatch.setitem(ACCOUNTANTS, "rdp-again", ACCOUNTANTS["rdp"])
    assert build_config({"dp": {"accountant": "rdp-again"}}).dp.accountant == "rdp-again"
    ledger = PrivacyLedger("rdp-again", delta=1e-5, max_epsilon=50.0)
    ledger.charge(1.0, 0.01, 100)
    assert ledger.epsilon() == pytest.approx(compute_epsilon(1.0, 0.01, 100, 1e-5, "rdp"))
    assert main(["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "100",
                 "--delta", "1e-5", "--accountant", "rdp-again"]) == 0
    assert f"epsilon = {ledger.epsilon():.6f}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="dp.accountant = 'gdp'"):
        build_config({"dp": {"accountant": "gdp"}})
