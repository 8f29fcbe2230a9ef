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
    fed = {"num_clients": 10, "clients_per_round": 5, "min_clients": 2, "user_dp_clip": 1.0, "user_dp_noise": 1.0,
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
