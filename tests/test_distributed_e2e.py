"""Distributed DP end to end: a tiny model trained through the real ClientApp and ServerApp,
every round a SecAgg+ round carrying integer vectors, the server stepping on the decoded
noisy sum, every node's ledger charged with the distributed mechanism it ran."""

from __future__ import annotations

import json
import os

import pytest

from fedtune.errors import ConfigError
from fedtune.privacy import PrivacyLedger
from fedtune.privacy import ddgauss_accounting as acc
from simulations.settings import simulation_settings
from tests.conftest import make_texts, tiny_config, write_csv


def _config(tiny_bert, tmp_path, rounds=3, **sections):
    data = write_csv(tmp_path / "rows.csv", make_texts(150, seed=4))
    raw = {"training": {"rounds": rounds, "epochs": 1, "batch_size": 8},
           "dp": {"mode": "distributed", "target_epsilon": 8.0},
           "federation": {"clients_per_round": 4, "min_clients": 3, "secure_aggregation": True,
                          "secagg_threshold": 0.75, "server_optimizer": "fedadam", "server_learning_rate": 0.05},
           "simulation": {"num_clients": 4, "central_holdout": 0.2},
           "node": {"distributed_min_contributors": 3}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return tiny_config(tiny_bert, data, **raw)


def test_distributed_rounds_train_through_flower_with_secagg_and_charge_every_node(tiny_bert, tmp_path):
    from simulations.run import simulate

    run = simulate(_config(tiny_bert, tmp_path), tmp_path / "run", num_cpus_per_client=os.cpu_count() or 1,
                   engine="in-process", log=lambda line: None)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["dp_mode"] == "distributed" and r["secure_aggregation"] for r in records)
    assert all(len(r["clients_accepted"]) == 4 for r in records)
    assert all(r["wrapped_share"] == 0.0 for r in records)
    ledgers = [PrivacyLedger.load(p) for p in sorted((run / "clients").glob("client-*/ledger-*.json"))]
    assert len(ledgers) == 4
    for ledger in ledgers:
        (z, tau, dim, rate, steps), = ledger.distributed
        assert steps == 3 and not ledger.history  # one distributed step per round, nothing else
        # the independent recomputation of the same entry
        assert ledger.epsilon() == pytest.approx(acc.epsilon([(z, tau, dim, rate, steps)], ledger.delta))
        assert ledger.epsilon() <= 8.0
        assert all(c["contributors"] == 3 for c in ledger.calls if c.get("mechanism"))
    assert records[-1]["epsilon_max"] == pytest.approx(max(ledger.epsilon() for ledger in ledgers))
    from fedtune.federation.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoint.safetensors").round == 3
    # the privacy report: the mechanism, t, and the epsilon if c of the t contributors collude
    privacy = json.loads((run / "privacy.json").read_text())
    entries = [e for e in privacy["entries"] if e["level"] == "record"] if isinstance(privacy, dict) else privacy
    assert entries and all(e["contributors"] == 3 and e.get("distributed") for e in entries)
    for e in entries:
        colluding = {int(c): v for c, v in e["epsilon_if_colluding"].items()}
        assert sorted(colluding) == [0, 1] and colluding[0] < colluding[1]
        assert colluding[0] == pytest.approx(e["epsilon_opacus"], rel=1e-9)
    summary = (run / "summary.md").read_text()
    assert "distributed DP" in summary and "c = 1" in summary


def test_a_distributed_federation_without_secure_aggregation_is_refused_before_anything_runs(tiny_bert, tmp_path):
    from simulations.run import simulate

    config = _config(tiny_bert, tmp_path, federation={"secure_aggregation": False})
    with pytest.raises(ConfigError, match="secure_aggregation"):
        simulate(config, tmp_path / "run", engine="in-process", log=lambda line: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("holdout", [0.2, 0.0])
def test_the_simulations_noise_keeps_the_smallest_node_within_its_epsilon(tiny_bert, tmp_path, holdout):
    """The noise multiplier `fedtune simulate` sets is the one the nodes' own accountant
    accepts for every planned round: at the rate of the rows the smallest node trains on
    (all of them under central evaluation, all but its validation split otherwise)."""
    from simulations.partition import client_table
    from simulations.run import prepare_simulation

    config = prepare_simulation(_config(tiny_bert, tmp_path, rounds=4, simulation={"central_holdout": holdout}))
    z = config.dp.noise_multiplier
    assert z > 0 and config.node.distributed
    smallest = min(len(client_table(config, pid)) for pid in range(simulation_settings(config).num_clients))
    trained = smallest if holdout else smallest - max(1, round(smallest * config.data.val_fraction))
    rate = config.training.batch_size / trained
    delta = config.dp.resolved_delta(smallest)
    assert acc.epsilon([(z, 0.0, 1024, rate, 4)], delta) <= 8.0
    assert acc.epsilon([(z * 0.98, 0.0, 1024, rate, 4)], delta) > 8.0  # and no more noise than that
