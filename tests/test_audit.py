"""`fedtune audit`: the one-run bound against the paper, the controls on a real tiny model
under real Opacus, the false-alarm rate of a correct mechanism, and canaries that never
reach a normal run."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from conftest import make_texts, tiny_config, write_csv
from fedtune.audit.node_audit import AuditDesign, run_audit
from fedtune.cli import main
from fedtune.training.dp_train import train_call
from fedtune.errors import ConfigError
from fedtune.training.local import prepare_node
from fedtune.models.base import trainable_named_parameters
from fedtune.audit.bounds import best_possible_bound, epsilon_lower_bound, p_value
from fedtune.privacy.canaries import GradientCanaries, guess
from fedtune.privacy.planning import new_ledger
from fedtune.privacy.randomness import Randomness


# ------------------------------------------------------------------ the bound


def test_the_bound_reproduces_the_papers_printed_examples():
    # arXiv:2305.08846v1, Appendix D: m = 1000 canaries, r = 100 guesses, v = 75 right, delta 1e-4, 95%: 0.673
    assert epsilon_lower_bound(1000, 100, 75, 1e-4) == pytest.approx(0.673, abs=1e-3)
    # Section 7 (Figure 11's white-box example): m = 1e5, r = 1510, v = 1439, delta 1e-5: 2.675 (printed truncated)
    assert 2.675 <= epsilon_lower_bound(100_000, 1510, 1439, 1e-5) < 2.677


def test_the_bound_agrees_with_the_binomial_it_is_built_on():
    # delta = 0: the p-value is the randomized-response tail P[Binomial(r, e^eps/(1+e^eps)) >= v]
    assert p_value(100, 100, 75, math.log(3), 0.0) == pytest.approx(binom.sf(74, 100, 0.75), rel=1e-12)
    # every guess right, delta 0: q^r = beta at the bound, so eps = log(q / (1 - q)) with q = beta^(1/r)
    q = 0.05 ** (1 / 200)
    assert epsilon_lower_bound(200, 200, 200, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    # chance-level guesses prove nothing; more right guesses never prove less; delta only weakens
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(120, 201, 10)]
    assert bounds == sorted(bounds) and bounds[-1] == best_possible_bound(1000, 200, 1e-5)
    assert epsilon_lower_bound(1000, 200, 180, 1e-3) < epsilon_lower_bound(1000, 200, 180, 1e-6)


def test_the_bound_refuses_impossible_counts():
    with pytest.raises(ConfigError, match="correct guesses v"):
        epsilon_lower_bound(100, 10, 11, 1e-5)
    with pytest.raises(ConfigError, match="confidence"):
        epsilon_lower_bound(100, 10, 5, 1e-5, confidence=1.0)


def test_guesses_count_the_top_as_included_and_the_bottom_as_excluded():
    scores = np.array([5.0, -1.0, 3.0, 0.0, -4.0, 2.0])
    included = np.array([True, False, False, True, False, True])
    # top 2 (5.0 in, 3.0 out) and bottom 2 (-4.0 out, -1.0 out): 3 of 4 right
    assert guess(scores, included, 4) == (4, 3)
    with pytest.raises(ConfigError, match="--guesses 7"):
        guess(scores, included, 7)


# ------------------------------------------------------------------ audits of a real tiny training


@pytest.fixture
def audit_data(tmp_path):
    return write_csv(tmp_path / "rows.csv", make_texts(64, seed=3))


def _config(tiny_bert, data, seed, epsilon=1.0, **dp):
    return tiny_config(tiny_bert, data, dp={"noise_seed": seed, "target_epsilon": epsilon, "delta": 1e-5, **dp},
                       training={"rounds": 1, "epochs": 2, "batch_size": 16})


def _audit(config, design, control=""):
    node = prepare_node(config)
    ledger = new_ledger(config, node.plan, node.data.fingerprint)
    ledger.max_epsilon = None
    return run_audit(node, design, ledger, None, control, echo=lambda line: None)


DESIGN = AuditDesign(canaries=1000, guesses=1000)


def test_the_noise_off_control_proves_more_than_the_claim_and_the_real_run_does_not(tiny_bert, audit_data):
    config = _config(tiny_bert, audit_data, seed=11)
    broken = _audit(config, DESIGN, "noise-off")
    assert broken.lower_bound > broken.claimed_epsilon  # the audit catches a mechanism without noise
    assert broken.noise.measured_noise == 0.0 and not broken.noise.as_planned
    assert broken.verdict()[0] and "caught" in broken.verdict()[1]
    assert math.isinf(broken.noise.epsilon_as_measured)  # the mechanism as measured protects nothing
    sound = _audit(config, DESIGN)
    assert sound.lower_bound <= sound.claimed_epsilon and sound.noise.as_planned and sound.verdict()[0]
    # the claim re-derived from the measured noise (its 95% floor) lands near the claim, a little above it
    assert sound.claimed_epsilon * 0.8 < sound.noise.epsilon_as_measured < sound.claimed_epsilon * 2
    # the claim was within the design's reach: the control's pass is not a foregone conclusion
    assert best_possible_bound(1000, 1000, sound.delta) > sound.claimed_epsilon


def test_with_nothing_inserted_the_bound_is_about_zero(tiny_bert, audit_data):
    result = _audit(_config(tiny_bert, audit_data, seed=12), DESIGN, "no-canaries")
    assert result.lower_bound < 0.5 and result.noise.as_planned and result.verdict()[0]


@pytest.mark.slow  # 20 trainings, ~1 min: CI runs it with the slow tests
@pytest.mark.timeout(600)
def test_a_correct_mechanism_does_not_raise_false_alarms_over_seeds(tiny_bert, audit_data):
    """The theorem allows a lower bound above the true epsilon in at most 5% of runs (95%
    confidence). Over 20 independent seeds a correct mechanism alarms 5 or more times with
    probability P[Binomial(20, 0.05) >= 5] = 0.26%: the false-alarm rate of this test.
    The claim (epsilon 1 at delta 1e-5) is within the design's reach (at most ~5.8), so a
    broken mechanism would alarm (the noise-off test shows it does)."""
    assert binom.sf(4, 20, 0.05) < 0.003
    alarms, noise_alarms = 0, 0
    for seed in range(20):
        result = _audit(_config(tiny_bert, audit_data, seed=100 + seed), DESIGN)
        alarms += result.lower_bound > result.claimed_epsilon
        noise_alarms += not result.noise.as_planned  # 99.9% interval: P[>= 2 of 20] = 0.02%
    assert alarms < 5 and noise_alarms < 2


# ------------------------------------------------------------------ canaries never reach a normal run


def _adapter_after(tiny_bert, data, canaries_factory=None):
    config = _config(tiny_bert, data, seed=5, epsilon=8.0)
    node = prepare_node(config)
    ledger = new_ledger(config, node.plan, node.data.fingerprint)
    canaries = canaries_factory(node.model) if canaries_factory else None
    train_call(node.model, node.data.train, config, node.plan, ledger, randomness=Randomness(5), canaries=canaries)
    return {n: p.detach().clone() for n, p in trainable_named_parameters(node.model)}, canaries


def test_canaries_change_only_an_audited_run(tiny_bert, audit_data):
    normal, _ = _adapter_after(tiny_bert, audit_data)
    again, _ = _adapter_after(tiny_bert, audit_data)
    assert all(torch.equal(normal[n], again[n]) for n in normal)  # same seed, same release: the comparison is exact

    def silent(model):  # coins drawn, nothing inserted: the instrumentation alone changes nothing
        return GradientCanaries([p for _, p in trainable_named_parameters(model)], 50, Randomness(9), inject=False)

    instrumented, _ = _adapter_after(tiny_bert, audit_data, silent)
    assert all(torch.equal(normal[n], instrumented[n]) for n in normal)

    def inserted(model):
        return GradientCanaries([p for _, p in trainable_named_parameters(model)], 50, Randomness(9))

    audited, canaries = _adapter_after(tiny_bert, audit_data, inserted)
    assert canaries.included.any() and canaries.steps > 0
    assert any(not torch.equal(normal[n], audited[n]) for n in normal)


def test_a_normal_training_call_has_no_canaries_to_insert(tiny_bert, audit_data):
    """Only `fedtune audit` builds canaries: a call without them leaves Opacus's own noise
    step in place (no wrapper), whatever the config says."""
    config = _config(tiny_bert, audit_data, seed=6, epsilon=8.0)
    node = prepare_node(config)
    seen = []
    from opacus.optimizers import DPOptimizer

    original = DPOptimizer.add_noise

    def spy(self):
        seen.append(type(self).add_noise is spy and "add_noise" not in self.__dict__)
        return original(self)

    DPOptimizer.add_noise = spy
    try:
        train_call(node.model, node.data.train, config, node.plan, new_ledger(config, node.plan), randomness=Randomness(6))
    finally:
        DPOptimizer.add_noise = original
    assert seen and all(seen)


# ------------------------------------------------------------------ the command


def test_audit_command_writes_its_table_and_exits_by_its_verdict(tiny_bert, audit_data, tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(["audit", "--model", str(tiny_bert), "--data", str(audit_data), "--max-seq-len", "16",
                 "--batch-size", "16", "--epochs", "2", "--noise-seed", "4", "--canaries", "300", "--guesses", "100",
                 "--input-canaries", "16", "--input-guesses", "8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "audit sound" in printed and "lower bound" in printed
    saved = json.loads((out / "audit.json").read_text())
    assert saved["design"]["canaries"] == 300 and saved["results"][0]["passed"] is True
    kinds = [f["kind"] for f in saved["results"][0]["findings"]]
    assert kinds == ["gradient (white-box)", "input (black-box)"]
    assert not (out / "adapter").exists()  # an audited adapter is never released
    assert "| audit (gradient (white-box)) |" in (out / "audit.md").read_text()
    # the audit trained on the data under DP: it was charged to the data's budget, so a second one at the
    # same cap (epsilon 8) is refused before training, in one line
    code = main(["audit", "--model", str(tiny_bert), "--data", str(audit_data), "--max-seq-len", "16",
                 "--batch-size", "16", "--epochs", "2", "--out", str(tmp_path / "again")])
    err = capsys.readouterr().err
    assert code == 2 and "charged like any training" in err and len(err.strip().splitlines()) == 1
    # the audit table's records come from exactly this file: a real audit's output renders
    from simulations import audit_table

    (out / "seconds.txt").write_text("12\n")
    records_dir = tmp_path / "records"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(audit_table, "RECORD_DIR", records_dir)
        written = audit_table.write_epsilon_records(8.0, out)
    assert [p.name for p in written] == ["eps8-none.json"]
    text = audit_table.report(audit_table.load_records(records_dir))
    assert "| audit (gradient (white-box)) | " in text and "| audit (input (black-box)) | " in text


@pytest.mark.parametrize("extra, message", [
    (["--guesses", "20000"], "--guesses 20000: expected 1 to --canaries (10000)"),
    (["--controls", "noise-off"], "only on a bundled public dataset"),
    (["--controls", "loud"], "unknown 'loud'"),
    (["--input-canaries", "10"], "needs --input-guesses"),
])
def test_audit_command_bad_input_is_one_line(tiny_bert, audit_data, tmp_path, capsys, extra, message):
    code = main(["audit", "--model", str(tiny_bert), "--data", str(audit_data), "--max-seq-len", "16",
                 "--out", str(tmp_path / "a"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ federated: canary clients, user-level DP


def _federation(tiny_bert, data, seed):
    return tiny_config(tiny_bert, data, dp={"noise_seed": seed, "target_epsilon": 8.0},
                       training={"rounds": 2, "epochs": 1, "batch_size": 16},
                       federation={"clients_per_round": 3, "min_clients": 2, "user_dp_clip": 0.5,
                                   "user_dp_noise": 3.0, "population": 1_000_000}, simulation={"num_clients": 3})


def test_canary_clients_audit_user_level_dp_and_catch_it_without_noise(tiny_bert, audit_data, tmp_path):
    from fedtune.privacy.spending import OverBudgetError
    from simulations.federated_audit import audit_user_level

    def scratch(config, name):  # public test rows: each run's budgets kept apart, as --budget-dir does
        return config.replace(node=dataclasses.replace(config.node, budget_dir=str(tmp_path / name)))

    config = scratch(_federation(tiny_bert, audit_data, seed=21), "audit")
    quiet = dict(canaries=1000, guesses=1000, echo=lambda line: None)
    sound = audit_user_level(config, **quiet)
    assert sound.steps == 2 and sound.claimed_epsilon < best_possible_bound(1000, 1000, sound.delta)
    assert sound.lower_bound <= sound.claimed_epsilon and sound.noise.as_planned and sound.verdict()[0]
    with pytest.raises(OverBudgetError, match="federated audit client"):  # the clients' rows were charged
        audit_user_level(config, **quiet)
    config = scratch(config, "noise-off")
    broken = audit_user_level(config, control="noise-off", **quiet)
    assert broken.lower_bound > broken.claimed_epsilon and broken.noise.measured_noise < 1e-9  # round-off only
    assert broken.verdict()[0] and "caught" in broken.verdict()[1]
    silent = audit_user_level(scratch(config, "no-canaries"), control="no-canaries", **quiet)
    assert silent.lower_bound < 0.5 and silent.verdict()[0]
    finding = sound.findings[0]  # every estimator beside the Steinke bound, each with its ceiling
    assert 0 <= finding.fdp_bound <= finding.fdp_ceiling and 0 <= finding.gdp_epsilon <= finding.gdp_ceiling
    assert broken.findings[0].fdp_bound > broken.findings[0].lower_bound  # the f-DP bound is the tighter proof


def test_a_federation_without_user_level_dp_has_nothing_to_audit(tiny_bert, audit_data):
    from simulations.federated_audit import audit_user_level

    config = tiny_config(tiny_bert, audit_data, federation={"clients_per_round": 3, "min_clients": 2},
                         simulation={"num_clients": 3})
    with pytest.raises(ConfigError, match="user_dp_noise = 0"):
        audit_user_level(config, echo=lambda line: None)


@pytest.mark.parametrize("control", ["noise-halved", "unnoised-step", "public-sample"])
def test_each_leaking_control_is_caught_by_the_bound_itself(tiny_bert, audit_data, control):
    """The claim stays the planned one while the mechanism leaks by a known route: half the
    noise, the last step released without noise, the canaries' Poisson draws known to the
    auditor. The bound alone (not the measured noise) must exceed the claim."""
    base = _config(tiny_bert, audit_data, seed=21)
    config = base.replace(lora=dataclasses.replace(base.lora, rank=64),  # room for 16,000 one-coordinate canaries
                          training=dataclasses.replace(base.training, batch_size=4))  # q = 1/16: sampling matters
    result = _audit(config, AuditDesign(canaries=16000, guesses=1000), control)
    assert result.lower_bound > result.claimed_epsilon, result.verdict()[1]
    assert result.verdict()[0] and "caught" in result.verdict()[1]


def test_the_user_level_audit_catches_halved_noise(tiny_bert, audit_data, tmp_path):
    """The server halves its noise while the claim stays the planned one: the bound must
    exceed the claim (every user in every round, so the curve is Gaussian: mu doubles)."""
    from simulations.federated_audit import audit_user_level

    base = _federation(tiny_bert, audit_data, seed=23)
    config = base.replace(lora=dataclasses.replace(base.lora, rank=32),  # room for 6,000 canary coordinates
                          training=dataclasses.replace(base.training, rounds=4),
                          node=dataclasses.replace(base.node, budget_dir=str(tmp_path / "budgets")))
    halved = audit_user_level(config, canaries=6000, guesses=1000, control="noise-halved", echo=lambda line: None)
    assert halved.lower_bound > halved.claimed_epsilon, halved.verdict()[1]
    assert halved.verdict()[0] and "caught" in halved.verdict()[1]


def test_the_user_level_audit_prepares_only_the_users_it_samples(tiny_bert, tmp_path):
    """A population of 32 users with 2 sampled a round: only the users the rounds drew have
    their rows prepared and a budget folder of their own."""
    from simulations.federated_audit import audit_user_level

    data = write_csv(tmp_path / "rows.csv", make_texts(64, seed=5))
    config = tiny_config(tiny_bert, data, dp={"noise_seed": 23, "target_epsilon": 8.0},
                         training={"rounds": 2, "epochs": 1, "batch_size": 2},
                         federation={"clients_per_round": 2, "min_clients": 1, "user_dp_clip": 0.5,
                                     "user_dp_noise": 1.0, "population": 1000},
                         simulation={"num_clients": 32}, node={"budget_dir": str(tmp_path / "budgets")},
                         data={"labels": ["neg", "pos"]})  # declared: a user's 2 rows may hold one class
    audit_user_level(config, canaries=100, guesses=20, echo=lambda line: None)
    folders = sorted(p.name for p in (tmp_path / "budgets").iterdir() if p.name.startswith("client-"))
    assert 1 <= len(folders) <= 2 * 2  # at most the sampled users, never the population
