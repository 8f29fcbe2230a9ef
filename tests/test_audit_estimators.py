"""The tighter one-run estimators (`fedtune.audit.estimators`): the numbers jax_privacy's
own test suite publishes for its `CanaryScoreAuditor`, soundness on a Gaussian mechanism of
known mu over many seeds, and the white-box likelihood-ratio score against the mixture
density it stands for."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, norm

from fedtune.audit.bounds import epsilon_lower_bound
from fedtune.audit.estimators import (ScoreAudit, fdp_epsilon_lower_bound, gdp_epsilon, gdp_mu_lower_bound)
from fedtune.errors import ConfigError
from fedtune.privacy.canaries import step_log_likelihood_ratio


def _deterministic_normal(mean: float, count: int) -> np.ndarray:
    """Scores at the normal's quantiles (jax_privacy's test fixture, written out here)."""
    return norm.ppf(np.linspace(0, 1, count, endpoint=False) + 1 / (2 * count)) + mean


# jax_privacy/auditing_test.py, test_epsilon_one_run_close: 10,000 canaries in and out,
# scores N(shift, 1) vs N(0, 1), significance 0.05, delta 1e-6
PUBLISHED = [(0, 0.0, 0.0), (1, 1.13346, 2.164749), (2, 2.311945, 4.7218075), (4, 4.395568, 9.133752)]


@pytest.mark.parametrize("shift, steinke, fdp", PUBLISHED)
def test_both_one_run_bounds_reproduce_the_published_numbers(shift, steinke, fdp):
    game = ScoreAudit(_deterministic_normal(shift, 10_000), _deterministic_normal(0, 10_000))
    assert game.steinke(0.95, 1e-6) == pytest.approx(steinke, rel=1e-5, abs=1e-9)
    assert game.fdp(0.95, 1e-6) == pytest.approx(fdp, rel=1e-5, abs=1e-9)


def test_the_gaussian_dp_estimate_recovers_mu_from_below():
    for mu in (0.5, 1.0, 2.0):
        estimate, epsilon = ScoreAudit(_deterministic_normal(mu, 10_000), _deterministic_normal(0, 10_000)).gdp(0.95, 1e-5)
        assert 0.75 * mu < estimate < mu  # below, and close: 10,000 scores a side
        assert epsilon == pytest.approx(gdp_epsilon(estimate, 1e-5))


def test_gdp_epsilon_is_the_gaussian_mechanisms_own():
    """mu-GDP is exactly the Gaussian mechanism with sigma = 1 / mu (dp-accounting's figure)."""
    import dp_accounting

    for sigma, delta in ((0.5, 1e-5), (1.0, 1e-3), (2.0, 1e-6)):
        assert gdp_epsilon(1 / sigma, delta) == pytest.approx(dp_accounting.get_epsilon_gaussian(sigma, delta), rel=1e-4)


@pytest.mark.parametrize("m, r, v", [(1000, 200, 163), (1000, 1000, 700), (10_000, 1000, 990), (500, 100, 50)])
def test_the_fdp_bound_is_at_least_steinkes_on_the_same_guesses(m, r, v):
    delta = 1e-5
    assert fdp_epsilon_lower_bound(m, r, v, delta) >= epsilon_lower_bound(m, r, v, delta) - 1e-6


def test_nothing_right_proves_nothing_and_mistakes_are_one_line_errors():
    assert fdp_epsilon_lower_bound(1000, 100, 0, 1e-5) == 0.0
    assert gdp_mu_lower_bound(1000, 100, 50) == 0.0  # chance-level guessing rules nothing out
    with pytest.raises(ConfigError, match="correct guesses v"):
        fdp_epsilon_lower_bound(10, 5, 6, 1e-5)
    with pytest.raises(ConfigError, match="audit confidence"):
        fdp_epsilon_lower_bound(10, 5, 4, 1e-5, confidence=1.5)
    with pytest.raises(ConfigError, match="both included and excluded"):
        ScoreAudit([], [1.0])


def test_on_a_gaussian_mechanism_the_bounds_exceed_the_truth_no_more_often_than_their_confidence_allows():
    """Soundness where the truth is known: a canary game on the Gaussian mechanism with
    mu = 2 (each canary's score N(mu, 1) if included, N(0, 1) if not, coins fair). At 95%
    confidence a bound may exceed the true epsilon in at most 5% of games; over 60 games,
    10 or more such games happen with probability below 0.3% for a sound bound."""
    mu, delta, games = 2.0, 1e-5, 60
    truth = gdp_epsilon(mu, delta)
    rng = np.random.default_rng(7)
    above = {"steinke": 0, "fdp": 0}
    fdp_values = []
    for _ in range(games):
        included = rng.random(2000) < 0.5
        scores = rng.normal(size=2000) + mu * included
        game = ScoreAudit(scores[included], scores[~included])
        fdp = game.fdp(0.95, delta)
        fdp_values.append(fdp)
        above["fdp"] += fdp > truth
        above["steinke"] += game.steinke(0.95, delta) > truth
    assert binom.sf(9, games, 0.05) < 0.003
    assert above["fdp"] < 10 and above["steinke"] < 10
    assert np.median(fdp_values) > 0.3 * truth  # and it is not vacuous


def test_the_likelihood_ratio_score_is_the_mixture_density_ratio():
    q, sigma = 0.1, 0.7
    x = np.linspace(-3, 4, 29)
    expected = np.log(((1 - q) * norm.pdf(x, 0, sigma) + q * norm.pdf(x, 1, sigma)) / norm.pdf(x, 0, sigma))
    np.testing.assert_allclose(step_log_likelihood_ratio(x, q, sigma), expected, rtol=1e-10, atol=1e-12)
    # without noise an observation is exact: a sampled canary is certain, an unsampled one is not
    assert step_log_likelihood_ratio(np.array([1.0]), q, 0.0)[0] == math.inf
    assert step_log_likelihood_ratio(np.array([0.0]), q, 0.0)[0] == pytest.approx(math.log(1 - q))


# -- the curve test: the planned mechanism's own trade-off curve ----------------------------

def _subsampled_scores(rng, count: int, noise: float, rate: float, steps: int, planned_noise: float) -> tuple:
    """White-box likelihood-ratio scores of `count` canaries of a Poisson-subsampled
    Gaussian mechanism run at `noise`, scored by an auditor who planned `planned_noise`."""
    included = rng.random(count) < 0.5
    scores = np.zeros(count)
    for _ in range(steps):
        observed = (included & (rng.random(count) < rate)) + rng.normal(0.0, noise, count)
        scores += step_log_likelihood_ratio(observed, rate, planned_noise)
    return ScoreAudit(scores[included], scores[~included])


def test_the_trade_off_curve_read_from_the_pld_is_the_gaussian_one_without_sampling():
    from fedtune.audit.estimators import tradeoff_from_pld
    from fedtune.privacy.accountants import subsampled_gaussian_pld

    alpha = np.array([1e-4, 1e-3, 0.01, 0.1, 0.5])
    read = tradeoff_from_pld(subsampled_gaussian_pld(0.8, 1.0, 1))(alpha)
    exact = norm.cdf(norm.isf(alpha) - 1 / 0.8)  # mu-GDP with mu = 1 / sigma
    assert np.all(read <= exact + 1e-9)  # pessimistic: never above the true curve
    np.testing.assert_allclose(read, exact, atol=5e-3)


def test_the_curve_test_passes_the_planned_mechanism_at_its_confidence_and_catches_halved_noise():
    """Soundness: over 20 seeds of the planned mechanism the planned curve is ruled out about
    5% of the time (at most 3 of 20; a 1.6% chance at 5%). Power: with half the noise the
    test's epsilon exceeds the planned mechanism's tight epsilon."""
    from fedtune.audit.node_audit import curve_test, tight_epsilon

    sigma, rate, steps, delta = 1.0, 0.2, 10, 1e-4
    tight = tight_epsilon(sigma, rate, steps, delta)
    false_alarms = 0
    for seed in range(20):
        game = _subsampled_scores(np.random.default_rng(seed), 4000, sigma, rate, steps, sigma)
        ruled_out, noise, epsilon = curve_test(game, (sigma, rate, steps), delta, 0.95)
        false_alarms += ruled_out  # ruled out the planned mechanism itself
        assert (noise <= sigma * 1.001 if ruled_out else epsilon <= tight + 1e-9)
    assert false_alarms <= 3
    game = _subsampled_scores(np.random.default_rng(99), 4000, sigma / 2, rate, steps, sigma)
    ruled_out, noise, epsilon = curve_test(game, (sigma, rate, steps), delta, 0.95)
    assert ruled_out and noise < sigma and epsilon > tight
