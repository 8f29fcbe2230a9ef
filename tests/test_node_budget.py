"""A ledger that cannot be lost, forked or reset by accident, tried as an operator's
mistakes and a crash would try it: a second process on the same state dir or budget, a
kill -9 in the middle of training, a deleted, emptied or older ledger, the same data under
a new state dir, another data set under an old one, `train-local` with a new --out.
(What happens when the rows themselves change: tests/test_record_budget.py.)"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from clients.node import NodeSetup, train_round
from fedtune.models.adapter_io import adapter_state
from fedtune.cli import main
from fedtune.privacy.policy import NodePolicy, server_request
from fedtune.privacy import PrivacyLedger
from fedtune.training.model_cache import MODELS
from tests.conftest import make_texts, tiny_config, write_csv

ROOT = Path(__file__).resolve().parents[1]


def _config(tiny_bert, data, budget_dir, **training):
    config = tiny_config(tiny_bert, data, data={"labels": ["neg", "pos"]},
                         training={"epochs": 1, "batch_size": 8, "rounds": 4, **training})
    return config.replace(node=dataclasses.replace(config.node, budget_dir=str(budget_dir)))


@pytest.fixture
def node(tiny_bert, tmp_path):
    data = write_csv(tmp_path / "rows.csv", make_texts(60, seed=4))
    config = _config(tiny_bert, data, tmp_path / "budgets")
    return {"config": config, "data": data, "arrays": adapter_state(MODELS.get(config, 2)[0]),
            "budgets": tmp_path / "budgets", "tmp": tmp_path}


def _round(node, state: str, server_round: int, config=None):
    config = config or node["config"]
    setup = NodeSetup(NodePolicy.from_config(config), node["tmp"] / state)
    return train_round(setup, server_request(config), node["arrays"], server_round)


def _ledger(node) -> PrivacyLedger:
    return PrivacyLedger.load(next(node["budgets"].glob("ledger-*.json")))


def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process that holds `path`'s lock until it is killed."""
    code = ("import sys, time; from fedtune.privacy.budget import exclusive_lock; "
            "lock = exclusive_lock(sys.argv[1], 'x'); lock.__enter__(); print('locked', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_process_on_the_state_dir_is_refused_until_it_dies(node, capsys):
    assert _round(node, "state", 1).status == "ok"
    before = _ledger(node).to_dict()
    holder = _hold_lock(node["tmp"] / "state" / "node.lock")
    try:
        refused = _round(node, "state", 2)
        assert refused.status == "node-error" and "in use by another process" in refused.message
        assert f"(pid {holder.pid})" in capsys.readouterr().err  # the detail stays in the node's log
        assert _ledger(node).to_dict() == before
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: the kernel drops the lock with the process
        holder.wait()
    assert _round(node, "state", 2).status == "ok"


def test_a_second_state_dir_on_the_same_data_cannot_spend_the_budget_at_the_same_time(node, capsys):
    assert _round(node, "state-a", 1).status == "ok"
    lock = next(node["budgets"].glob("ledger-*.lock"))
    holder = _hold_lock(lock)
    try:
        refused = _round(node, "state-b", 1)
        assert refused.status == "node-error" and "privacy budget" in capsys.readouterr().err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()


def test_the_same_data_under_a_new_state_dir_continues_the_budget(node):
    first = _round(node, "state-a", 1)
    second = _round(node, "state-b", 1)  # a re-installed node, a new state dir: the same rows
    assert first.status == second.status == "ok"
    ledger = _ledger(node)
    assert len(list(node["budgets"].glob("ledger-*.json"))) == 1 and ledger.steps == 2 * int(first.metrics["steps"])
    assert first.epsilon < second.epsilon == pytest.approx(ledger.epsilon())


def test_other_data_under_the_same_state_dir_gets_its_own_budget_and_keeps_the_first(node, tiny_bert):
    """A node whose operator points it at other rows needs no new state dir: the new rows
    start their own ledger, and the first rows' ledger stays as it was."""
    first = _round(node, "state", 1)
    assert first.status == "ok"
    other = write_csv(node["tmp"] / "other.csv", make_texts(60, seed=99))
    second = _round(node, "state", 2, config=_config(tiny_bert, other, node["budgets"]))
    assert second.status == "ok" and second.epsilon == pytest.approx(first.epsilon)
    ledgers = [PrivacyLedger.load(p) for p in node["budgets"].glob("ledger-*.json")]
    assert sorted(ledger.steps for ledger in ledgers) == [int(first.metrics["steps"])] * 2


@pytest.mark.parametrize("damage", ["delete", "empty", "older copy"])
def test_a_lost_or_shortened_ledger_stops_the_node(node, damage, capsys):
    assert _round(node, "state", 1).status == "ok"
    path = next(node["budgets"].glob("ledger-*.json"))
    older = path.read_bytes()
    assert _round(node, "state", 2).status == "ok"
    if damage == "delete":
        path.unlink()
    elif damage == "empty":
        path.write_text("")
    else:
        path.write_bytes(older)  # a restored backup from before round 2
    refused = _round(node, "state", 3)
    assert refused.status == "node-error" and refused.arrays is None
    log = capsys.readouterr().err
    assert "restore the ledger from a backup" in log or "not valid JSON" in log, log
    if damage == "delete":
        assert not path.exists()  # nothing started a new budget


def test_the_journal_alone_catches_a_deleted_ledger(node, capsys):
    """Even with the state dir gone too, the budget folder's journal remembers."""
    assert _round(node, "state", 1).status == "ok"
    next(node["budgets"].glob("ledger-*.json")).unlink()
    refused = _round(node, "fresh-state", 1)
    assert refused.status == "node-error" and "ledger needs its operator" in refused.message
    assert "journal.jsonl records" in capsys.readouterr().err


def test_kill_minus_9_mid_training_overcounts_and_never_refunds(node, tmp_path):
    """The charge is on disk before the first step: a node killed while training has spent
    the round, and its next round continues from there (no lock left behind)."""
    script = tmp_path / "node_process.py"
    script.write_text(textwrap.dedent(f"""
        import dataclasses, sys
        sys.path.insert(0, {str(ROOT)!r})
        from clients.node import NodeSetup, train_round
        from fedtune.models.adapter_io import adapter_state
        from fedtune.privacy.policy import NodePolicy, server_request
        from fedtune.training.model_cache import MODELS
        from tests.conftest import tiny_config
        config = tiny_config({str(node['config'].model.path)!r}, {str(node['data'])!r}, data={{"labels": ["neg", "pos"]}},
                             training={{"epochs": 400, "batch_size": 8, "rounds": 4}})
        config = config.replace(node=dataclasses.replace(config.node, budget_dir={str(node['budgets'])!r}))
        arrays = adapter_state(MODELS.get(config, 2)[0])
        train_round(NodeSetup(NodePolicy.from_config(config), {str(tmp_path / 'state')!r}), server_request(config), arrays, 1)
        print("finished", flush=True)
    """))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    journal = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and journal is None:
        journal = next(node["budgets"].glob("ledger-*.journal.jsonl"), None)
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the 400 epochs
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert journal is not None and "finished" not in process.stdout.read()
    charged = _ledger(node)
    recorded = json.loads((tmp_path / "state" / "node.json").read_text())["ledgers"]
    assert charged.steps == 400 * 7 and recorded == {charged.data_fingerprint: 400 * 7}
    assert charged.epsilon() > 0
    # the next round may not fit (the killed round spent 400 epochs' worth), but it runs its
    # check against the full charge, is not locked out, and nothing is refunded
    after = _round(node, "state", 2, config=node["config"])
    assert after.status in ("ok", "budget-exhausted"), after.message
    assert _ledger(node).steps >= charged.steps


def test_train_local_with_a_new_out_continues_the_budget_of_the_same_data(tiny_bert, sentiment_csv, tmp_path, capsys):
    base = ["train-local", "--model", str(tiny_bert), "--data", str(sentiment_csv), "--max-seq-len", "16",
            "--epochs", "1", "--batch-size", "16", "--epsilon", "3", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "run-1")]) == 0
    first = json.loads((tmp_path / "run-1" / "ledger.json").read_text())
    capsys.readouterr()
    assert main(base + ["--out", str(tmp_path / "run-2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "belongs to the data" in err and not (tmp_path / "run-2").exists()
    assert main(base + ["--out", str(tmp_path / "run-3"), "--max-epsilon", "8"]) == 0  # a deliberate, recorded raise
    third = json.loads((tmp_path / "run-3" / "ledger.json").read_text())
    assert third["data_fingerprint"] == first["data_fingerprint"]
    assert third["history"][0][2] == 2 * first["history"][0][2] and third["epsilon"] > first["epsilon"]
    assert any(call.get("event") == "cap set" for call in third["calls"])


def test_a_restarted_node_continues_its_ledger_and_refuses_past_its_budget(node):
    """A node restarted between rounds (a new process: a cleared model cache) reports an
    epsilon that continues its ledger; once the planned rounds are spent it refuses."""
    config = node["config"].replace(training=dataclasses.replace(node["config"].training, rounds=2))
    epsilons = []
    for server_round in (1, 2):
        MODELS.clear()  # what a process restart does to the cache
        outcome = _round(node, "state", server_round, config=config)
        assert outcome.status == "ok"
        epsilons.append(outcome.epsilon)
    ledger = _ledger(node)
    assert epsilons[0] < epsilons[1] == ledger.epsilon() <= config.dp.target_epsilon
    MODELS.clear()
    refused = _round(node, "state", 3, config=config)
    assert refused.status == "budget-exhausted" and refused.arrays is None and "exhausted" in refused.message
    assert _ledger(node).epsilon() == epsilons[1]  # never reset, never grown


def test_a_round_whose_deadline_passed_before_training_charges_nothing(node):
    """(A deadline that passes during training keeps the charge: tests/test_budget_burning.py.)"""
    setup = NodeSetup(NodePolicy.from_config(node["config"]), node["tmp"] / "state")
    late = train_round(setup, server_request(node["config"]), node["arrays"], 1, deadline=time.time() - 1)
    assert late.status == "node-error" and "deadline" in late.message and late.arrays is None
    assert _ledger(node).steps == 0
    assert _round(node, "state", 2).status == "ok" and _ledger(node).steps > 0


def test_a_slow_node_past_the_deadline_leaves_the_round_to_the_others(tmp_path):
    """The server stops waiting at round_timeout: the replies in hand are aggregated, the
    late node is recorded, and the round completes."""
    from collections import OrderedDict

    import numpy as np

    from fedtune.config import build_config
    from fedtune.federation.server import ClientReply, FederationServer

    config = build_config({"federation": {"clients_per_round": 3, "min_clients": 2}})
    reference = OrderedDict([("w", np.zeros(4, np.float32))])
    server = FederationServer(config, tmp_path, reference, ["w"])
    replies = [ClientReply(n, "ok", OrderedDict([("w", np.full(4, 0.1 * n, np.float32))]), 10, 1.0) for n in (1, 2)]
    replies.append(ClientReply(3, "error", message="no reply before round_timeout"))
    record = server.finish_round(1, replies, time.perf_counter(), 0)
    assert record["clients_accepted"] == [1, 2] and record["clients_rejected"][0]["node"] == 3
    assert np.allclose(server.adapter["w"], 0.15)
