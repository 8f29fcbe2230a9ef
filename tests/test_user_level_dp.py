"""Sound user-level DP: cohorts drawn the way they are accounted, from secret randomness,
with delta from the declared population; epsilon checked against dp-accounting."""

import time
from collections import OrderedDict

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedtune.federation.cohort import Cohort, draw_cohort
from fedtune.config import build_config
from fedtune.errors import ConfigError
from fedtune.federation.server import ClientReply, FederationServer, RoundFailedError
from fedtune.privacy.randomness import Randomness


def _state(seed, shape=(2, 3)):
    rng = np.random.default_rng(seed)
    return OrderedDict([("a.lora_A.weight", rng.normal(size=shape).astype(np.float32)),
                        ("a.lora_B.weight", rng.normal(size=shape[::-1]).astype(np.float32))])


def _config(sampling="poisson", noise_seed=-1, **federation):
    fed = {"clients_per_round": 5, "min_clients": 2, "user_dp_clip": 1.0, "user_dp_noise": 1.0,
           "cohort_sampling": sampling, "population": 10, **federation}
    return build_config({"federation": fed, "dp": {"noise_seed": noise_seed}})


def _dp_accounting_epsilon(noise, rate, rounds, delta):
    event = dp_accounting.GaussianDpEvent(noise)
    if rate < 1:
        event = dp_accounting.PoissonSampledDpEvent(rate, event)
    accountant = rdp.RdpAccountant()
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def _run(config, tmp_path, rounds, cohort):
    server = FederationServer(config, tmp_path, _state(0), list(_state(0)))
    for server_round in range(1, rounds + 1):
        replies = [ClientReply(n, "ok", _state(n), 10, 1.0) for n in cohort.sampled]
        record = server.finish_round(server_round, replies, time.perf_counter(), 0, cohort=cohort)
    return server, record


def test_poisson_cohorts_are_accounted_with_amplification_at_the_drawn_rate(tmp_path):
    cohort = Cohort(registered=10, sampled=(1, 2, 3, 4), method="poisson", rate=0.5, expected_size=5.0)
    server, record = _run(_config("poisson"), tmp_path, 20, cohort)
    expected = _dp_accounting_epsilon(1.0, 0.5, 20, delta=1 / 100)
    assert record["user_epsilon"] == pytest.approx(expected, rel=0.02)  # the libraries' orders differ slightly
    assert server.user_ledger.history == [(1.0, 0.5, 20)] and server.user_ledger.delta == 1 / 100
    assert record["cohort"]["accounted_rate"] == 0.5


def test_fixed_cohorts_are_accounted_as_sampling_without_replacement(tmp_path):
    """10 nodes, 5 per round, 20 rounds, z = 1: 70.1 (replace-one), neither the 10.3 that
    Poisson bounds would claim nor the 21.9 of full participation (q = 1)."""
    cohort = Cohort(registered=10, sampled=(1, 2, 3, 4, 5), method="fixed", rate=0.5, expected_size=5.0)
    server, record = _run(_config("fixed"), tmp_path, 20, cohort)
    assert server.user_ledger.history == [] and server.user_ledger.without_replacement == [(1.0, 10, 5, 20)]
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 5, dp_accounting.GaussianDpEvent(0.5)), 20)
    assert record["user_epsilon"] == pytest.approx(accountant.get_epsilon(1 / 100), rel=1e-9)
    assert record["user_epsilon"] == pytest.approx(70.08, abs=0.01)
    assert record["cohort"]["accounted_as"] == "without replacement" and record["cohort"]["accounted_rate"] == 0.5


def test_user_level_delta_comes_from_the_declared_population(tmp_path):
    with pytest.raises(ConfigError, match="federation.population"):
        FederationServer(_config(population=0), tmp_path, _state(0), list(_state(0)))
    explicit = FederationServer(_config(population=0, user_dp_delta=1e-7), tmp_path, _state(0), list(_state(0)))
    assert explicit.user_ledger.delta == 1e-7
    too_many = Cohort(registered=12, sampled=(1, 2), method="poisson", rate=5 / 12, expected_size=5.0)
    with pytest.raises(RoundFailedError, match="more than federation.population = 10"):
        _run(_config(), tmp_path / "b", 1, too_many)


def test_cohorts_are_drawn_secretly_unless_a_seed_is_asked_for():
    nodes = list(range(2**63, 2**63 + 200))  # Flower node ids exceed int64
    secret = Randomness()
    draws = {draw_cohort(nodes, 50, "poisson", secret.numpy_generator()).sampled for _ in range(3)}
    assert len(draws) == 3  # fresh OS entropy every time (equal draws: probability ~2^-200)
    seeded = [draw_cohort(nodes, 50, "poisson", Randomness(1).numpy_generator("cohort", 4)).sampled for _ in range(2)]
    assert seeded[0] == seeded[1]
    fixed = draw_cohort(nodes, 50, "fixed", secret.numpy_generator())
    assert len(fixed.sampled) == 50 and set(fixed.sampled) <= set(nodes)
    assert fixed.without_replacement and fixed.accounted_rate == 0.25
    poisson = draw_cohort(nodes, 50, "poisson", secret.numpy_generator())
    assert poisson.rate == 0.25 and poisson.expected_size == 50 and 20 < len(poisson.sampled) < 80


def test_user_level_noise_is_secret_unless_a_simulation_seeds_it(tmp_path):
    cohort = Cohort(registered=10, sampled=(1, 2, 3), method="poisson", rate=0.5, expected_size=5.0)
    secret = [_run(_config(), tmp_path / f"s{i}", 1, cohort)[0].adapter for i in range(2)]
    assert not np.array_equal(secret[0]["a.lora_A.weight"], secret[1]["a.lora_A.weight"])
    seeded = [_run(_config(noise_seed=3), tmp_path / f"r{i}", 1, cohort) for i in range(2)]
    assert np.array_equal(seeded[0][0].adapter["a.lora_A.weight"], seeded[1][0].adapter["a.lora_A.weight"])
    assert seeded[0][1]["noise"] == "reproducible noise: not for production"


def test_a_small_poisson_cohort_still_releases_and_is_charged(tmp_path):
    """Retrying a thin draw would no longer be the sampling that was accounted."""
    cohort = Cohort(registered=10, sampled=(7,), method="poisson", rate=0.5, expected_size=5.0)
    server, record = _run(_config(min_clients=3), tmp_path, 1, cohort)
    assert record["clients_accepted"] == [7] and server.user_ledger.history == [(1.0, 0.5, 1)]


def test_the_charge_is_checkpointed_before_the_new_adapter_is_evaluated(tmp_path):
    from fedtune.federation.checkpoint import load_checkpoint

    config = _config()
    server = FederationServer(config, tmp_path, _state(0), list(_state(0)))
    seen = {}

    def evaluate(adapter):
        checkpoint = load_checkpoint(tmp_path / "checkpoint.safetensors")
        seen["round"] = checkpoint.round
        seen["charged"] = checkpoint.meta["user_ledger"]["history"]
        seen["same"] = all(np.array_equal(checkpoint.adapter[k], adapter[k]) for k in adapter)
        return {}

    cohort = Cohort(10, (1, 2), "poisson", 0.5, 5.0)
    server.finish_round(1, [ClientReply(n, "ok", _state(n), 10, 1.0) for n in (1, 2)], time.perf_counter(), 0,
                        evaluate=evaluate, cohort=cohort)
    assert seen == {"round": 1, "charged": [[1.0, 0.5, 1]], "same": True}


def _within_clip(seed, clip=1.0):
    """A reply whose update (reply - _state(0)) has norm below `clip`: clipping leaves it as it is."""
    reference, rng = _state(0), np.random.default_rng(seed)
    update = OrderedDict((k, rng.normal(size=v.shape)) for k, v in reference.items())
    size = np.sqrt(sum(np.sum(u ** 2) for u in update.values()))
    return OrderedDict((k, (reference[k] + update[k] * (0.8 * clip / size)).astype(np.float32)) for k in reference)


@pytest.mark.parametrize("sampling, cohort", [
    ("poisson", Cohort(registered=10, sampled=(1, 2, 3), method="poisson", rate=0.5, expected_size=5.0)),
    ("fixed", Cohort(registered=10, sampled=(1, 2, 3), method="fixed", rate=0.3, expected_size=3.0)),
])
def test_the_plain_and_the_secure_path_release_the_same_noisy_step_and_charge_the_same(sampling, cohort):
    """One user-level step serves both paths: the plain path clips and sums the updates,
    the secure path gets their mean (each clipped by its node); with the same seeded noise
    the new adapter and the ledger are the same."""
    from fedtune.federation.aggregate import deltas, sum_updates
    from fedtune.federation.strategy import Strategy

    config = _config(sampling, noise_seed=4, clients_per_round=3)
    reference = _state(0)
    replies = [ClientReply(n, "ok", _within_clip(n), 10, 1.0) for n in cohort.sampled]
    plain, secure = Strategy(config), Strategy(config)
    by_plain = plain.aggregate(3, reference, replies, cohort)
    total = sum_updates(deltas([r.arrays for r in replies], reference), reference)
    mean = OrderedDict((k, v / len(replies)) for k, v in total.items())
    by_secure = secure.aggregate_secure(3, reference, mean, len(replies), cohort)
    assert all(np.allclose(by_plain[k], by_secure[k], rtol=0, atol=1e-6) for k in reference)
    assert not all(np.allclose(by_plain[k], reference[k] + total[k] / cohort.expected_size, atol=1e-3)
                   for k in reference)  # the noise is on
    charged = [(s.user_ledger.history, s.user_ledger.without_replacement, s.user_ledger.epsilon())
               for s in (plain, secure)]
    assert charged[0] == charged[1] and (charged[0][0] or charged[0][1])


def test_the_user_level_step_releases_the_same_for_either_path_given_the_same_sum():
    """The step itself, bit for bit: the same clipped sum and seed give the same release."""
    from fedtune.federation.aggregate import constrain_sensitivity, deltas, sum_updates
    from fedtune.federation.strategy import Strategy

    config = _config(noise_seed=8)
    reference = _state(0)
    updates = deltas([_state(n) for n in (1, 2, 3)], reference)  # norms above the clip: clipping matters
    cohort = Cohort(registered=10, sampled=(1, 2, 3), method="poisson", rate=0.5, expected_size=5.0)
    first, second = Strategy(config).user_level, Strategy(config).user_level
    by_method = first.step(1, reference, first.clipped_sum(updates, reference), cohort)
    by_hand = second.step(1, reference, sum_updates(constrain_sensitivity(updates, 1.0), reference), cohort)
    assert all(np.array_equal(by_method[k], by_hand[k]) for k in reference)
    assert first.ledger.history == second.ledger.history == [(1.0, 0.5, 1)]


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_a_poisson_federation_keeps_the_user_level_accountant_it_asked_for(accountant, tmp_path):
    from fedtune.privacy import PrivacyLedger

    cohort = Cohort(registered=10, sampled=(1, 2, 3), method="poisson", rate=0.5, expected_size=5.0)
    server, record = _run(_config(user_dp_accountant=accountant), tmp_path, 2, cohort)
    assert server.user_ledger.accountant == accountant and server.user_ledger.history == [(1.0, 0.5, 2)]
    expected = PrivacyLedger(accountant, 1 / 100, None)
    expected.charge(1.0, 0.5, 2)
    assert record["user_epsilon"] == pytest.approx(expected.epsilon(), rel=1e-12)
    resumed = FederationServer.start_or_resume(_config(user_dp_accountant=accountant), tmp_path, _state(0),
                                               list(_state(0)))
    assert resumed.user_ledger.accountant == accountant


def test_the_audit_harness_injects_its_step_and_its_noise_off_control_is_charged_as_non_private():
    """The federated audit's canaries and noise-off control live in the harness's step,
    handed to the Strategy; the released sum is the nodes' clipped sum plus the canaries
    that joined, and the ledger says no noise ran."""
    from fedtune.federation.aggregate import constrain_sensitivity, deltas, sum_updates
    from fedtune.federation.strategy import Strategy
    from fedtune.privacy.canaries import UpdateCanaries
    from simulations.federated_audit import AuditedUserLevelDP

    config, reference, randomness = _config(noise_seed=2), _state(0), Randomness(2)
    canaries = UpdateCanaries(reference, 6, randomness)
    step = AuditedUserLevelDP.from_config(config, randomness, canaries=canaries, leak="noise-off")
    strategy = Strategy(config, user_level=step)
    assert strategy.user_level is step and not hasattr(strategy, "canaries") and not hasattr(strategy, "noise_off")
    cohort = Cohort(registered=10, sampled=(1, 2), method="poisson", rate=1.0, expected_size=2.0)
    replies = [ClientReply(n, "ok", _state(n), 10, 1.0) for n in (1, 2)]
    new = strategy.aggregate(1, reference, replies, cohort)
    nodes = sum_updates(constrain_sensitivity(deltas([r.arrays for r in replies], reference), 1.0), reference)
    released = {k: (new[k].astype(np.float64) - reference[k]) * 2.0 for k in reference}
    canary_part = np.concatenate([(released[k] - nodes[k]).ravel() for k in reference])  # rate 1: all included join
    assert np.allclose(np.sort(canary_part)[-6:], np.sort(canaries.included * 1.0), atol=1e-5)
    assert np.allclose(np.sort(canary_part)[:-6], 0.0, atol=1e-5) and canaries.included.any()
    assert np.allclose(canaries.scores, canaries.included * 1.0, atol=1e-12) and canaries.rounds == 1
    assert strategy.user_ledger.non_private_steps == 1 and strategy.user_ledger.history == []
    with pytest.raises(ConfigError, match="user_dp_noise = 0"):
        Strategy(_config(user_dp_noise=0.0, user_dp_clip=0.0), user_level=step)
