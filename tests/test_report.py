"""Run-directory outputs (CSV, ledger table, summary, plots) and central evaluation."""


import pytest

from fedtune.system.atomic import append_jsonl
from fedtune.errors import FedtuneError
from fedtune.privacy import PrivacyLedger, compute_epsilon
from fedtune.reporting.run_report import epsilon_by_round, write_report
from tests.conftest import tiny_config


def _fake_run(run_dir, rounds=3, clients=2):
    for r in range(1, rounds + 1):
        append_jsonl(run_dir / "metrics.jsonl", {
            "round": r, "evaluation": "central", "accuracy": 0.5 + 0.1 * r, "loss": 1.0 / r, "majority_accuracy": 0.5,
            "epsilon_max": 2.0 * r, "clients_accepted": [1, 2], "clients_rejected": [], "clients_refused": [],
            "bytes_sent": 10, "bytes_received": 10, "seconds": 1.5})
    for c in range(clients):
        ledger = PrivacyLedger("rdp", delta=1e-4, max_epsilon=8.0)
        for r in range(1, rounds + 1):
            ledger.charge(1.1, 0.05, 20, label=f"round {r}")
        ledger.save(run_dir / "clients" / f"client-{c:05d}" / "ledger.json")


def test_report_writes_every_output_from_the_raw_records(tmp_path):
    _fake_run(tmp_path)
    written = {p.name for p in write_report(tmp_path)}
    assert written == {"metrics.csv", "clients.csv", "summary.md", "accuracy.png", "loss.png", "epsilon.png",
                       "privacy.json"}
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("round,evaluation,accuracy") and len(rows) == 4
    first_round = dict(zip(rows[0].split(","), rows[1].split(",")))
    assert first_round["accuracy"] == "0.6" and first_round["clients_accepted"] == "2"  # lists become counts
    clients = (tmp_path / "clients.csv").read_text().splitlines()
    header = clients[0].split(",")
    first = dict(zip(header, clients[1].split(",")))
    assert first["rounds_trained"] == "3" and first["steps"] == "60"
    assert float(first["epsilon"]) == pytest.approx(compute_epsilon(1.1, 0.05, 60, 1e-4), rel=1e-5)
    summary = (tmp_path / "summary.md").read_text()
    assert "Final accuracy **0.8000** (majority class: 0.5000)" in summary
    for png in ("accuracy.png", "loss.png", "epsilon.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_privacy_report_shows_both_levels_each_reproduced_by_two_accountants(tmp_path):
    """A deployment's run dir: node histories as the nodes released them, and the server's
    user-level ledger; every epsilon recomputed by Opacus and by dp-accounting."""
    import json
    import time
    from collections import OrderedDict

    import numpy as np

    from fedtune.federation.cohort import Cohort
    from fedtune.config import build_config
    from fedtune.federation.server import ClientReply, FederationServer

    config = build_config({"federation": {"clients_per_round": 2, "min_clients": 2, "user_dp_clip": 1.0,
                                          "user_dp_noise": 1.5, "cohort_sampling": "poisson", "population": 20}})
    state = OrderedDict([("w", np.zeros(3, np.float32))])
    server = FederationServer(config, tmp_path, state, ["w"])
    released = {"accountant": "rdp", "delta": 1e-5, "history": [[0.9, 0.02, 500], [5.0, 1.0, 2]], "non_private_steps": 0}
    replies = [ClientReply(n, "ok", OrderedDict([("w", np.full(3, 0.1 * n, np.float32))]), 10, 3.0, privacy=released)
               for n in (1, 2)]
    server.finish_round(1, replies, time.perf_counter(), 0, cohort=Cohort(20, (1, 2), "poisson", 0.1, 2.0))
    (tmp_path / "config.toml").write_text(config.to_toml())
    write_report(tmp_path)
    entries = json.loads((tmp_path / "privacy.json").read_text())["entries"]
    assert [e["level"] for e in entries] == ["record", "record", "user"]
    for entry in entries:
        assert entry["epsilon_dp_accounting"] == pytest.approx(entry["epsilon_opacus"], rel=0.02)
    assert entries[0]["history"] == released["history"] and entries[0]["source"] == "as released by the node"
    assert entries[2]["history"] == [[1.5, 0.1, 1]] and entries[2]["delta"] == 1 / 200
    summary = (tmp_path / "summary.md").read_text()
    assert "## Privacy" in summary and "| user | server | rdp |" in summary and "Poisson-sampled" in summary


def test_epsilon_by_round_follows_the_ledger(tmp_path):
    _fake_run(tmp_path, rounds=3, clients=1)
    ledger = PrivacyLedger.load(tmp_path / "clients" / "client-00000" / "ledger.json")
    points = epsilon_by_round(ledger)
    assert [r for r, _ in points] == [1, 2, 3]
    assert points[-1][1] == pytest.approx(compute_epsilon(1.1, 0.05, 60, 1e-4))
    assert points[0][1] < points[1][1] < points[2][1]


def test_report_of_a_folder_without_rounds_is_a_clear_error(tmp_path):
    with pytest.raises(FedtuneError, match="no metrics.jsonl"):
        write_report(tmp_path)


def test_central_evaluator_scores_the_adapter_and_reports_the_majority(tiny_bert, sentiment_csv):
    from fedtune.models.adapter_io import adapter_state
    from fedtune.federation.central_eval import CentralEvaluator
    from fedtune.data.tables import read_table
    from fedtune.training.local import build_model, prepare_data
    from fedtune.models.base import load_tokenizer

    config = tiny_config(tiny_bert, sentiment_csv, data={"labels": ["neg", "pos"]})
    tokenizer = load_tokenizer(tiny_bert)
    model = build_model(config, tokenizer, 2)
    table = read_table(sentiment_csv, "text", "label")
    scores = CentralEvaluator(config, model, tokenizer, table)(adapter_state(model))
    assert scores["examples"] == 120 and scores["majority_accuracy"] == 0.5 and 0 <= scores["accuracy"] <= 1
    # with central evaluation, a node keeps no validation split and trains on every row
    assert len(prepare_data(config, tokenizer, validation=False).train) == 120
    assert prepare_data(config, tokenizer, validation=False).val is None


def test_a_run_in_progress_is_not_called_final(tmp_path):
    from fedtune.config import build_config

    _fake_run(tmp_path, rounds=3)
    (tmp_path / "config.toml").write_text(build_config({"training": {"rounds": 5}}).to_toml())
    write_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert "Accuracy after round 3 of 5 (run in progress or stopped) **0.8000**" in summary and "Final" not in summary
