"""A real Flower simulation (Ray backend) of virtual clients on a tiny model."""

import csv
import json

import pytest

from fedtune.config import build_config
from fedtune.privacy import PrivacyLedger, compute_epsilon
from tests.conftest import make_texts

pytestmark = pytest.mark.slow


def test_three_clients_two_rounds_write_every_output(tiny_bert, tmp_path):
    from simulations.run import simulate

    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(make_texts(150))
    config = build_config({
        "model": {"path": str(tiny_bert), "max_seq_len": 16},
        "data": {"path": str(data)},
        "training": {"epochs": 1, "rounds": 2, "batch_size": 8},
        "federation": {"num_clients": 3, "clients_per_round": 3, "min_clients": 2},
    })
    run = simulate(config, tmp_path / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(len(r["clients_accepted"]) == 3 and not r["clients_rejected"] for r in records)
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "checkpoint.safetensors").is_file()
    assert len(json.loads((run / "partitions.json").read_text())) == 3
    # state really persists between ephemeral ClientApps: two rounds composed in each ledger
    ledgers = sorted((run / "clients").glob("client-*/ledger.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        ledger = PrivacyLedger.load(path)
        (sigma, q, steps), = ledger.history
        assert len(ledger.calls) == 2 and steps == 2 * ledger.calls[0]["steps"]
        assert ledger.epsilon() == compute_epsilon(sigma, q, steps, ledger.delta) <= 8.0
    assert records[-1]["epsilon_max"] == max(PrivacyLedger.load(p).epsilon() for p in ledgers)
