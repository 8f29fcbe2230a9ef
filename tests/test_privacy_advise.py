"""`fedtune privacy advise` on known configurations: the mechanism is the training
planner's, and the verdict matches what was measured for each calibration run."""

import pytest

from fedtune.privacy.accountants import compute_epsilon
from fedtune.privacy.advise import CALIBRATION, advise
from fedtune.privacy.planning import poisson_schedule


@pytest.mark.parametrize("shape, measured", sorted(CALIBRATION.items()))
def test_the_verdict_matches_each_measured_run(shape, measured):
    rows, clients, rounds, epochs, batch, params = shape
    advice = advise(rows, clients, rounds, epochs, batch, 8.0, params)
    assert advice.verdict.startswith("can learn") == measured.startswith("learned")


def test_the_mechanism_is_the_planners_and_spends_the_budget():
    advice = advise(378, 5, 5, 1, 32, 8.0, 73_728)
    q, per_epoch = poisson_schedule(378, 32)
    assert (advice.sample_rate, advice.steps_per_round, advice.steps) == (q, per_epoch, per_epoch * 5)
    assert advice.delta == pytest.approx(1 / 3780)
    assert compute_epsilon(advice.noise_multiplier, q, advice.steps, advice.delta) <= 8.0
    assert advice.nsr_run == pytest.approx(advice.nsr_step / (advice.steps * 5) ** 0.5)


def test_the_command_prints_mechanism_ratio_and_verdict(capsys):
    from fedtune.cli import main

    assert main(["privacy", "advise", "--rows-per-client", "102", "--clients", "10", "--rounds", "3",
                 "--batch-size", "16", "--epsilon", "8"]) == 0
    out = capsys.readouterr().out
    assert "sample rate 0.1429, 7 steps per round, 21 in all" in out and "verdict: marginal" in out
    assert main(["privacy", "advise", "--rows-per-client", "0", "--clients", "10", "--rounds", "3",
                 "--batch-size", "16", "--epsilon", "8"]) == 2
    assert "--rows-per-client = 0" in capsys.readouterr().err
