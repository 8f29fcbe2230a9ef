"""`fedtune budget`: a privacy officer reads a node's budgets without knowing a fingerprint.

The budgets here are real: opened with the one ritual every charging path uses
(`fedtune.privacy.spending.spend`) and charged the way `train_call` charges them (the
ledger's `charge`, then `persist`), and one by a node's real training round. The listing
must agree with each ledger's own `epsilon()` and cap, show its history, and change
nothing in the folder it reads."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.config import build_config
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.budget import RecordSet
from fedtune.privacy.budget_listing import budget_folders, list_budgets
from fedtune.privacy.spending import spend
from tests.conftest import make_texts, write_csv


def _charged_budget(budget_dir: Path, data: dict, texts: list[str], cap: float, labels: list[str],
                    delta: float = 1e-4) -> PrivacyLedger:
    """Open the budget of `texts` as a node would and charge one DP-SGD call per label."""
    config = build_config({"data": data, "dp": {"target_epsilon": cap}, "node": {"budget_dir": str(budget_dir)}})
    with spend(config, RecordSet.of(texts), delta, "open") as spending:
        for label in labels:
            spending.ledger.charge(1.0, 0.05, 40, label=label)
            spending.persist()
        return spending.ledger


@pytest.fixture
def budgets(tmp_path):
    """Two budgets in one folder: a ward's file (two rounds charged) and a named dataset."""
    folder = tmp_path / "budgets"
    ward = [text for text, _ in make_texts(30, seed=1)]
    news = [text for text, _ in make_texts(20, seed=2)]
    ward_file = write_csv(tmp_path / "ward-a.csv", [(text, "pos") for text in ward])
    first = _charged_budget(folder, {"path": str(ward_file)}, ward, 8.0, ["round 1", "round 2"])
    second = _charged_budget(folder, {"dataset": "bbc-news"}, news, 3.0, ["train-local"], delta=1e-5)
    return {"folder": folder, "ledgers": {first.data_fingerprint: first, second.data_fingerprint: second},
            "rows": {first.data_fingerprint: len(set(ward)), second.data_fingerprint: len(set(news))},
            "sources": {first.data_fingerprint: f"file {ward_file.resolve()}",
                        second.data_fingerprint: "dataset bbc-news"}}


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _on_disk(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted([folder, *folder.rglob("*")])}


def test_the_listing_agrees_with_each_ledger(budgets, capsys):
    code, out, _ = _run(capsys, "budget", "--dir", str(budgets["folder"]), "--json")
    assert code == 0
    rows = {row["ledger"]: row for row in json.loads(out)["budgets"]}
    assert set(rows) == set(budgets["ledgers"])
    for ledger_id, row in rows.items():
        ledger = PrivacyLedger.load(budgets["folder"] / f"ledger-{ledger_id}.json")
        assert row["spent"] == pytest.approx(ledger.epsilon()) and row["cap"] == ledger.max_epsilon
        assert row["remaining"] == pytest.approx(ledger.max_epsilon - ledger.epsilon())
        assert row["source"] == budgets["sources"][ledger_id] and row["rows"] == budgets["rows"][ledger_id]
        assert row["last_charge"]["label"] == ledger.calls[-1]["label"]
        assert row["last_charge"]["time"] == ledger.calls[-1]["time"]
        assert (row["accountant"], row["delta"], row["problem"]) == (ledger.accountant, ledger.delta, "")

    code, out, _ = _run(capsys, "budget", "--dir", str(budgets["folder"]))
    assert code == 0 and out.splitlines()[0].startswith(f"2 budgets in {budgets['folder']}")
    for ledger_id, ledger in budgets["ledgers"].items():
        [line] = [line for line in out.splitlines() if line.startswith(ledger_id[:12])]
        spent, cap = f"{ledger.epsilon():.3f}", f"{ledger.max_epsilon:g}"
        remaining = f"{ledger.max_epsilon - ledger.epsilon():.3f}"
        assert line.split()[2:5] == [spent, cap, remaining], line
        assert budgets["sources"][ledger_id] in line and ledger.calls[-1]["label"] in line


def test_show_prints_the_whole_history(budgets, capsys):
    ledger_id, ledger = next((k, v) for k, v in budgets["ledgers"].items() if len(v.calls) == 2)
    code, out, _ = _run(capsys, "budget", "show", ledger_id[:6], "--dir", str(budgets["folder"]))
    assert code == 0 and f"ledger {ledger_id}" in out and budgets["sources"][ledger_id] in out
    history = out.split("\n\n", 1)[1].splitlines()
    assert history[0].split() == ["time", "label", "charged", "epsilon", "after"]
    for line, call in zip(history[1:], ledger.calls, strict=True):
        assert call["label"] in line and "40 DP-SGD steps, sigma 1, q 0.05" in line
        assert line.endswith(f"{call['epsilon_after']:.3f}")
        assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(call["time"])) in line

    # a ledger file by its path, e.g. a train-local run's copy: no journal, no record index beside it
    copy = shutil.copy(budgets["folder"] / f"ledger-{ledger_id}.json", budgets["folder"].parent / "ledger.json")
    code, out, _ = _run(capsys, "budget", "show", str(copy), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["source"] == "" and shown["rows"] is None
    assert [c["epsilon_after"] for c in shown["calls"]] == [c["epsilon_after"] for c in ledger.calls]


def test_reading_changes_nothing_in_the_folder(budgets, capsys):
    before = _on_disk(budgets["folder"])
    some_id = next(iter(budgets["ledgers"]))
    for argv in (["budget", "--dir", str(budgets["folder"])], ["budget", "--dir", str(budgets["folder"]), "--json"],
                 ["budget", "show", some_id[:8], "--dir", str(budgets["folder"])]):
        assert _run(capsys, *argv)[0] == 0
    assert _on_disk(budgets["folder"]) == before


def test_a_missing_folder_has_no_budgets_and_stays_missing(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, out, err = _run(capsys, "budget", "--dir", str(missing))
    assert (code, out.splitlines(), err) == (0, [f"no budgets: {missing} does not exist"], "")
    assert not missing.exists()
    code, out, _ = _run(capsys, "budget")  # the default folder, under this test's own $FEDTUNE_HOME
    assert code == 0 and len(out.splitlines()) == 1 and out.startswith("no budgets")
    assert not any(Path(os.environ["FEDTUNE_HOME"]).iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(capsys, "budget", "--dir", str(empty))[1] == f"no budgets in {empty}\n"


def test_an_unknown_ledger_is_one_line_and_exit_2(budgets, capsys):
    code, out, err = _run(capsys, "budget", "show", "not-a-ledger", "--dir", str(budgets["folder"]))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("fedtune: error: no ledger 'not-a-ledger' in ")
    code, _, err = _run(capsys, "budget", "--dir", str(budgets["folder"] / "records.sqlite"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "a file, not a folder" in err


def test_a_run_directory_lists_each_virtual_clients_budget(tmp_path, capsys):
    """A simulation keeps each virtual client's budget in RUN_DIR/clients/client-NNNNN."""
    run = tmp_path / "run"
    for client in range(2):
        texts = [text for text, _ in make_texts(10, seed=10 + client)]
        _charged_budget(run / "clients" / f"client-{client:05d}", {"dataset": "bbc-news"}, texts, 8.0, ["round 1"])
    code, out, _ = _run(capsys, "budget", "--dir", str(run))
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"2 budgets in 2 folders under {run}")
    assert [line.split()[-3] for line in lines[2:]] == ["clients/client-00000", "clients/client-00001"]


def test_a_lost_ledger_is_shown_not_hidden(budgets, capsys):
    lost = next(iter(budgets["ledgers"]))
    (budgets["folder"] / f"ledger-{lost}.json").unlink()
    code, out, _ = _run(capsys, "budget", "--dir", str(budgets["folder"]))
    assert code == 0 and f"ledger {lost}: ledger file missing" in out
    assert f"protects {budgets['rows'][lost]} rows" in out


def test_hundreds_of_ledgers_list_in_well_under_a_second(budgets):
    """A simulation of 300 virtual clients: 300 budget folders, read without recomputing epsilon."""
    run = budgets["folder"].parent / "run"
    for client in range(300):
        shutil.copytree(budgets["folder"], run / "clients" / f"client-{client:05d}")
    started = time.perf_counter()
    folders, _ = budget_folders([run])
    summaries = list_budgets(folders)
    elapsed = time.perf_counter() - started
    assert len(summaries) == 600 and not any(s.problem for s in summaries)
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def test_a_nodes_round_records_its_data_file_as_the_source(tiny_bert, tmp_path, capsys):
    """The source is written where a node first opens its budget, from the file it was given."""
    from clients.node import NodeSetup, train_round
    from fedtune.models.adapter_io import adapter_state
    from fedtune.privacy.policy import NodePolicy, server_request
    from fedtune.training.model_cache import MODELS
    from tests.conftest import tiny_config

    data = write_csv(tmp_path / "clinic.csv", make_texts(40, seed=5))
    config = tiny_config(tiny_bert, data, data={"labels": ["neg", "pos"]}, training={"batch_size": 8, "rounds": 4})
    config = config.replace(node=dataclasses.replace(config.node, budget_dir=str(tmp_path / "budgets")))
    reply = train_round(NodeSetup(NodePolicy.from_config(config), tmp_path / "state"), server_request(config),
                        adapter_state(MODELS.get(config, 2)[0]), 1)
    assert reply.status == "ok", reply.message
    code, out, _ = _run(capsys, "budget", "--dir", str(tmp_path / "budgets"), "--json")
    [row] = json.loads(out)["budgets"]
    assert code == 0 and row["source"] == f"file {data.resolve()}" and row["rows"] == 40
    assert row["spent"] == pytest.approx(reply.epsilon) and row["last_charge"]["label"]


def test_with_no_dir_every_budget_this_machines_fedtune_made_is_listed(tmp_path, capsys, monkeypatch):
    """A train-local budget in the default folder, a simulation run's virtual nodes below its
    run directory and a node's own --budget-dir: each run notes its folder once in
    $FEDTUNE_HOME/budget-folders.txt, and `fedtune budget` lists them all; a deleted run is
    no budget."""
    from fedtune.privacy.budget import KNOWN_FOLDERS_FILE, default_budget_dir, remember_budget_folder

    monkeypatch.setenv("FEDTUNE_HOME", str(tmp_path / "home"))
    texts = [[text for text, _ in make_texts(10, seed=seed)] for seed in range(4)]
    _charged_budget(default_budget_dir(), {"dataset": "bbc-news"}, texts[0], 3.0, ["call 1"])
    run, node, gone = tmp_path / "runs" / "simulate-1", tmp_path / "node-budgets", tmp_path / "runs" / "deleted"
    _charged_budget(run / "clients" / "client-00000", {"dataset": "bbc-news"}, texts[1], 8.0, ["round 1"])
    _charged_budget(node, {"dataset": "bbc-news"}, texts[2], 5.0, ["round 1"])
    _charged_budget(gone / "clients" / "client-00000", {"dataset": "bbc-news"}, texts[3], 8.0, ["round 1"])
    for folder in (run, node, run, gone, default_budget_dir()):
        remember_budget_folder(folder)
    assert (tmp_path / "home" / KNOWN_FOLDERS_FILE).read_text().splitlines() == [str(run), str(node), str(gone)]
    shutil.rmtree(gone)
    code, out, _ = _run(capsys, "budget")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("3 budgets in 3 folders under ")
    assert sorted(line.split()[3] for line in lines[2:]) == ["3", "5", "8"]  # each cap once
