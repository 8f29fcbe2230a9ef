"""Fixed-size cohorts accounted as what they are: m of N registered nodes drawn without
replacement is sampling without replacement under the replace-one relation (one node
replaced moves the noised sum by up to twice the clip), checked against dp-accounting;
a cohort of every registered node stays full participation (q = 1, add/remove)."""

import json
from collections import OrderedDict

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp

from fedtune.federation.cohort import Cohort
from fedtune.config import build_config
from fedtune.errors import BudgetExhaustedError, ConfigError
from fedtune.privacy import PrivacyLedger
from fedtune.reporting.privacy_summary import user_entry
from fedtune.federation.strategy import ClientReply, Strategy, charge_user_level

# (registered N, cohort m, noise multiplier z, rounds, epsilon with q = 1 (the old charge),
#  a lower bound on the true epsilon) at the user-level delta 1 / (10 N)
CONFIGS = [(10, 5, 1.0, 20, 21.91, 29.97), (20, 15, 1.5, 10, 7.95, 14.47)]


def _without_replacement(n, m, z, rounds, delta):
    """dp-accounting's own figure: noise z x clip, one replaced node moves the sum by 2 x clip,
    so the Gaussian's noise multiplier under replace-one is z / 2."""
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z / 2)),
                       rounds)
    return accountant.get_epsilon(delta)


def _full_participation(z, rounds, delta):
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def _lower_bound(n, m, z, rounds, delta):
    """One pair of neighbouring federations: every other node sends -clip, the replaced one
    +clip or -clip. Sampled, it moves the sum by 2 x clip; not sampled, nothing. That is the
    Poisson-subsampled Gaussian at rate m / N with sensitivity 2 x clip (PLD: tight), so
    the true epsilon is at least this."""
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(m / n, dp_accounting.GaussianDpEvent(z / 2)), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("n, m, z, rounds, old, floor", CONFIGS)
def test_a_fixed_cohort_is_charged_as_sampling_without_replacement(n, m, z, rounds, old, floor):
    """Prepare: two ledgers at delta 1 / (10 N). Execute: charge each round as q = 1 (the old
    rule) and as m of N without replacement. Assert: the old figure is below what one pair of
    neighbours already forces; the new one is dp-accounting's and above it."""
    delta = 1 / (10 * n)
    before = PrivacyLedger("rdp", delta, None)
    before.charge(z, 1.0, rounds)
    after = PrivacyLedger("rdp", delta, None)
    for _ in range(rounds):
        after.charge_without_replacement(z, n, m)

    assert before.epsilon() == pytest.approx(old, abs=0.01)
    assert _lower_bound(n, m, z, rounds, delta) == pytest.approx(floor, abs=0.01)
    assert before.epsilon() < floor
    assert after.without_replacement == [(z, n, m, rounds)] and after.history == []
    assert after.epsilon() == pytest.approx(_without_replacement(n, m, z, rounds, delta), rel=1e-9)
    assert after.epsilon() >= floor


def test_the_calibration_halves_the_noise_multiplier_because_replacing_moves_the_sum_twice():
    """Passing z itself to dp-accounting would claim sensitivity 1 x clip under replace-one
    and land below the lower bound: the factor 2 is what makes the figure sound."""
    n, m, z, rounds, _, floor = CONFIGS[0]
    uncalibrated = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    uncalibrated.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, m, dp_accounting.GaussianDpEvent(z)), rounds)
    assert uncalibrated.get_epsilon(1 / (10 * n)) < floor


@pytest.mark.parametrize("n, z, rounds", [(10, 1.0, 20), (20, 1.5, 10)])
def test_a_cohort_of_every_registered_node_stays_full_participation(n, z, rounds):
    cohort = Cohort(n, tuple(range(n)), "fixed", 1.0, float(n))
    ledger = PrivacyLedger("rdp", 1 / (10 * n), None)
    charge_user_level(ledger, z, cohort, rounds)
    assert not cohort.without_replacement and cohort.accounted_as == "full participation"
    assert ledger.history == [(z, 1.0, rounds)] and ledger.without_replacement == []
    assert ledger.epsilon() == pytest.approx(_full_participation(z, rounds, 1 / (10 * n)), rel=0.02)


def _state(seed):
    rng = np.random.default_rng(seed)
    return OrderedDict([("a.lora_A.weight", rng.normal(size=(2, 3)).astype(np.float32)),
                        ("a.lora_B.weight", rng.normal(size=(3, 2)).astype(np.float32))])


def _strategy(**federation):
    fed = {"clients_per_round": 5, "min_clients": 2, "user_dp_clip": 1.0, "user_dp_noise": 1.0,
           "cohort_sampling": "fixed", "population": 100, **federation}
    return Strategy(build_config({"federation": fed, "dp": {"noise_seed": 7}}))


def test_the_strategy_charges_5_of_10_registered_as_sampling_without_replacement():
    """Prepare: a fixed-cohort strategy, 5 a round, population declared 100 (delta only).
    Execute: round 1 draws from 10 registered nodes, round 2 from 8, round 3 from 5, each
    aggregated from the drawn nodes' (tiny) replies. Assert: N is the registered count of each
    round, never the population; the last round is full participation; epsilon is
    dp-accounting's composition of exactly those events."""
    strategy = _strategy()
    reference = _state(0)
    for server_round, registered in ((1, 10), (2, 8), (3, 5)):
        cohort = strategy.cohort(list(range(100, 100 + registered)), server_round)
        assert cohort.registered == registered and len(cohort.sampled) == 5
        replies = [ClientReply(node, "ok", _state(node), 10, 1.0) for node in cohort.sampled]
        accepted = strategy.screen(replies, reference).accepted
        reference = strategy.aggregate(server_round, reference, accepted, cohort)

    ledger = strategy.user_ledger
    assert ledger.without_replacement == [(1.0, 10, 5, 1), (1.0, 8, 5, 1)]
    assert ledger.history == [(1.0, 1.0, 1)] and ledger.delta == 1 / 1000
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.GaussianDpEvent(0.5), 1)  # full participation: 2 x clip under replace-one
    for n in (10, 8):
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, 5, dp_accounting.GaussianDpEvent(0.5)), 1)
    assert ledger.epsilon() == pytest.approx(accountant.get_epsilon(1 / 1000), rel=1e-9)


def test_a_secure_round_of_a_fixed_cohort_is_charged_the_same_way():
    strategy = _strategy(secure_aggregation=True, min_clients=1)
    cohort = strategy.cohort(list(range(10)), 1)
    mean = OrderedDict((k, np.full(v.shape, 0.01)) for k, v in _state(0).items())
    strategy.aggregate_secure(1, _state(0), mean, 5, cohort)
    assert strategy.user_ledger.without_replacement == [(1.0, 10, 5, 1)] and strategy.user_ledger.history == []


def test_the_new_entries_survive_save_load_and_a_checkpoint(tmp_path):
    ledger = PrivacyLedger("rdp", 1e-3, None)
    ledger.charge(1.0, 1.0, 2)
    ledger.charge_without_replacement(1.0, 10, 5, 3, label="rounds 3-5")
    ledger.charge_without_replacement(1.0, 12, 5, label="round 6")
    ledger.save(tmp_path / "user.json")
    written = json.loads((tmp_path / "user.json").read_text())
    assert written["format"] == 3 and written["without_replacement"] == [[1.0, 10, 5, 3], [1.0, 12, 5, 1]]
    loaded = PrivacyLedger.load(tmp_path / "user.json")
    assert loaded.without_replacement == ledger.without_replacement and loaded.history == ledger.history
    assert loaded.epsilon() == ledger.epsilon() == written["epsilon"]

    strategy = _strategy()
    strategy.user_ledger = ledger
    restored = _strategy()
    restored.load_state(strategy.state_arrays(), strategy.state_meta(), source="checkpoint")
    assert restored.user_ledger.without_replacement == ledger.without_replacement


def test_an_old_format_ledger_still_loads_and_a_plain_one_is_still_written_as_before(tmp_path):
    old = {"format": 2, "data_fingerprint": "", "accountant": "rdp", "delta": 0.01, "max_epsilon": None,
           "history": [[1.0, 1.0, 20]], "non_private_steps": 0, "epsilon": 21.91, "calls": []}
    loaded = PrivacyLedger.from_dict(old)
    assert loaded.without_replacement == [] and loaded.epsilon() == pytest.approx(21.91, abs=0.01)
    first = {**old, "format": 1, "target_epsilon": 30.0}
    del first["max_epsilon"]
    assert PrivacyLedger.from_dict(first).max_epsilon == 30.0
    written = loaded.to_dict()
    assert written["format"] == 2 and "without_replacement" not in written


def test_the_report_recomputes_the_fixed_cohort_figure_from_the_logged_parameters():
    ledger = PrivacyLedger("rdp", 0.01, None)
    ledger.charge_without_replacement(1.0, 10, 5, 20)
    entry = user_entry(ledger.to_dict(), {"cohort_sampling": "fixed", "user_dp_clip": 1.0, "user_dp_noise": 1.0})
    expected = _without_replacement(10, 5, 1.0, 20, 0.01)
    assert entry["without_replacement"] == [[1.0, 10, 5, 20]] and entry["neighboring_relation"] == "replace-one"
    assert entry["epsilon_opacus"] == pytest.approx(expected, abs=1e-5)
    assert entry["epsilon_dp_accounting"] == pytest.approx(expected, abs=1e-5)


def test_a_cohort_that_is_not_sampling_without_replacement_is_refused_by_the_ledger():
    ledger = PrivacyLedger("rdp", 0.01, None)
    with pytest.raises(ConfigError, match="full participation"):
        ledger.charge_without_replacement(1.0, 5, 5)
    with pytest.raises(ConfigError, match="accounted by dp-accounting's RDP"):
        PrivacyLedger("prv", 0.01, None).charge_without_replacement(1.0, 10, 5)
    capped = PrivacyLedger("rdp", 0.01, 30.0)
    with pytest.raises(BudgetExhaustedError):
        capped.charge_without_replacement(1.0, 10, 5, 20)
    assert capped.without_replacement == [] and capped.calls == []


@pytest.mark.parametrize("accountant", ["prv", "pld"])
def test_a_fixed_cohort_federation_refuses_a_user_level_accountant_other_than_rdp(accountant):
    """Only dp-accounting's RDP accounts m of N drawn without replacement: the config says
    so in one line before any round runs, naming the field; Poisson cohorts take it."""
    fed = {"clients_per_round": 5, "user_dp_clip": 1.0, "user_dp_noise": 1.0, "population": 100,
           "user_dp_accountant": accountant}
    with pytest.raises(ConfigError) as refused:
        build_config({"federation": {**fed, "cohort_sampling": "fixed"}})
    message = str(refused.value)
    assert message.startswith(f"federation.user_dp_accountant = {accountant!r}") and "'rdp'" in message
    assert "\n" not in message
    poisson = Strategy(build_config({"federation": {**fed, "cohort_sampling": "poisson"}}))
    assert poisson.user_ledger.accountant == accountant
    with pytest.raises(ConfigError, match="federation.user_dp_accountant = 'moments'"):
        build_config({"federation": {**fed, "cohort_sampling": "poisson", "user_dp_accountant": "moments"}})


def test_the_cached_curves_compose_to_dp_accountings_own_figure_exactly():
    """The ledger composes each event's RDP curve, computed once, times its count; it must
    equal dp-accounting composing the events itself, mixed histories included."""
    from fedtune.privacy.accountants import _replace_one_accountant, without_replacement_epsilon

    history = ((1.1, 1.0, 3), (0.9, 1.0, 0))
    entries = ((0.8, 1000, 10, 7), (1.3, 50, 10, 2), (0.8, 1000, 10, 4))
    for delta in (1e-3, 1e-6):
        assert without_replacement_epsilon(history, entries, delta) == \
            _replace_one_accountant(history, entries).get_epsilon(delta)
