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


def test_recommend_picks_the_least_noisy_batch_that_still_takes_steps():
    from fedtune.privacy.advise import BATCH_CANDIDATES, MIN_STEPS_PER_EPOCH, recommend

    best = recommend(1000, 10, 3, 1, 8.0, 73_728)
    fitting = [b for b in BATCH_CANDIDATES if b * MIN_STEPS_PER_EPOCH <= 1000]
    ratios = {b: advise(1000, 10, 3, 1, b, 8.0, 73_728).nsr_run for b in fitting}
    assert best.batch_size == min(ratios, key=ratios.get) == 128  # 256 would leave 3 steps per epoch
    assert ratios[128] < ratios[64] < ratios[16]
    assert recommend(40, 10, 3, 1, 8.0, 73_728) is None  # no candidate batch fits 40 rows 4 times


def test_the_command_recommends_a_batch(capsys):
    from fedtune.cli import main

    assert main(["privacy", "advise", "--rows-per-client", "1000", "--clients", "10", "--rounds", "3",
                 "--batch-size", "32", "--epsilon", "8"]) == 0
    assert "recommended: batch size 128 for the same rounds and epochs" in capsys.readouterr().out
