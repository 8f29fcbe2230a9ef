"""Real Flower simulations (Ray backend) of virtual clients on a tiny model."""

import csv
import json

import pytest

from fedtune.config import build_config
from fedtune.privacy import PrivacyLedger
from tests.conftest import make_texts

pytestmark = pytest.mark.slow


def _data(tmp_path, n=150):
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(make_texts(n))
    return data


def _config(tiny_bert, data, rounds=2, **simulation):
    return build_config({
        "model": {"path": str(tiny_bert), "max_seq_len": 16},
        "data": {"path": str(data)},
        "training": {"epochs": 1, "rounds": rounds, "batch_size": 8},
        "federation": {"clients_per_round": 3, "min_clients": 2},
        "simulation": {"num_clients": 3, **simulation},
        # federated evaluation needs the virtual nodes to release metrics: noised and charged
        "node": {"release_evaluation": "dp", "release_train_loss": "dp"},
    })


def test_three_clients_two_rounds_write_every_output(tiny_bert, tmp_path):
    """Through the notebook API, with every tracker: the frames and the trackers' files
    hold what metrics.jsonl and the clients' ledgers hold."""
    import fedtune
    from fedtune.reporting.frames import LEDGER_COLUMNS, METRICS_COLUMNS
    from tests.test_tracking import expected, read_mlflow, read_tensorboard, read_wandb

    result = fedtune.simulate(_config(tiny_bert, _data(tmp_path)), out=tmp_path / "run",
                              log_to="tensorboard,mlflow,wandb")
    run = result.run_dir
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert list(result.metrics.columns[:len(METRICS_COLUMNS)]) == list(METRICS_COLUMNS)
    assert result.metrics["accuracy"].tolist() == [r["accuracy"] for r in records]
    assert result.metrics["clients_accepted"].tolist() == [3, 3]
    assert list(result.ledger.columns) == list(LEDGER_COLUMNS) and sorted(set(result.ledger["client"])) == [0, 1, 2]
    charges = result.ledger[result.ledger["event"] == "charge"]
    assert charges.groupby("client")["epsilon_after"].max().max() == pytest.approx(records[-1]["epsilon_max"])
    assert len(result.clients) == 3 and result.config.training.rounds == 2
    want = expected(records)
    assert read_mlflow(run / "mlflow.db") == want and read_wandb(run / "wandb") == want
    assert read_tensorboard(run / "tensorboard").keys() == want.keys()
    assert [r["round"] for r in records] == [1, 2]
    assert all(len(r["clients_accepted"]) == 3 and not r["clients_rejected"] for r in records)
    assert all(r["evaluation"] == "federated" and 0 <= r["accuracy"] <= 1 for r in records)
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "checkpoint.safetensors").is_file()
    assert len(json.loads((run / "partitions.json").read_text())) == 3
    for name in ("config.toml", "metrics.csv", "clients.csv", "summary.md", "accuracy.png", "loss.png", "epsilon.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert len((run / "clients.csv").read_text().splitlines()) == 4
    # state really persists between ephemeral ClientApps: two rounds composed in each ledger
    ledgers = sorted((run / "clients").glob("client-*/ledger-*.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        ledger = PrivacyLedger.load(path)
        sgd = [entry for entry in ledger.history if entry[1] < 1]
        releases = sum(steps for _, rate, steps in ledger.history if rate == 1)
        assert sum(steps for _, _, steps in sgd) == 2 * ledger.calls[0]["steps"]  # two rounds of DP-SGD
        assert releases == 4  # per round: the train loss and one evaluation, each charged
        assert ledger.epsilon() == PrivacyLedger("rdp", ledger.delta, None, ledger.history).epsilon() <= 8.0
    assert records[-1]["epsilon_max"] == pytest.approx(max(PrivacyLedger.load(p).epsilon() for p in ledgers))
    assert all(r["noise"] == "noise seeded from OS entropy per call" for r in records)
    assert "## Privacy" in (run / "summary.md").read_text()


def test_resident_memory_does_not_grow_across_rounds(tiny_bert, tmp_path):
    """Measured, not timed: the whole process tree (server + Ray workers) after round 5
    stays within a generous bound of round 2 (model cache, hook cleanup, token cache)."""
    from simulations.run import simulate

    run = simulate(_config(tiny_bert, _data(tmp_path), rounds=5, central_holdout=0.2), tmp_path / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    memory = [r["resident_mb"] for r in records]
    assert len(memory) == 5 and all(m > 100 for m in memory)
    assert memory[4] <= memory[1] * 1.15 + 64, memory
    assert all(r["evaluation"] == "central" for r in records)


def test_two_cell_sweep_writes_its_table(tiny_bert, tmp_path):
    from simulations.sweep import grid, sweep

    base = _config(tiny_bert, _data(tmp_path), rounds=1, central_holdout=0.2)
    cells = grid("8,inf", "3", "iid", "off", "0")
    out = tmp_path / "sweep"
    written = sweep(base, cells, out, simulate_args=("--cpus-per-client", "64", "--log-to", "tensorboard"))
    for cell in ("eps8_c3_iid_lora_s0", "nodp_c3_iid_lora_s0"):  # each cell in-process, with its tracker
        log = (out / "cells" / cell / "simulate.log").read_text()
        assert "simulation engine: in-process" in log and list((out / "cells" / cell / "tensorboard").iterdir())
    assert {p.name for p in written} == {"results.csv", "results.md", "results.png"}
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["cell"] for r in rows] == ["eps8_c3_iid_lora_s0", "nodp_c3_iid_lora_s0", "centralized-nonprivate-baseline"]
    assert float(rows[0]["epsilon_spent_max"]) <= 8.0 and rows[1]["epsilon_spent_max"] == "inf"
    table = (out / "results.md").read_text()
    assert "centralized, pooled, LoRA (reference)" in table and "| 3 clients, iid, LoRA | 8 | 1 |" in table
    # a re-run skips finished cells
    messages = []
    sweep(base, cells, out, log=messages.append)
    assert sum("skipped" in m for m in messages) == 2


def test_simulation_attaches_to_a_running_ray_cluster(tiny_bert, tmp_path):
    """A Ray head started on 127.0.0.1 (as on a cluster's head node); the simulation
    attaches to it through `simulation.ray_address` instead of starting its own Ray."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    from simulations.run import simulate

    ray = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # --block keeps `ray start` in the foreground as the parent of the cluster it starts, so the
    # test stops exactly that cluster through its process group (never `ray stop`, which stops
    # every Ray on a shared machine)
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                             "--temp-dir", str(temp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(temp.glob("session_*/sockets/raylet*")):
            assert head.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(1)
        config = _config(tiny_bert, _data(tmp_path), rounds=1, ray_address=f"127.0.0.1:{port}")
        run = simulate(config, tmp_path / "run")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 1 and len(records[0]["clients_accepted"]) == 3
        # the work ran on the cluster we started: its session holds the worker logs
        assert list(temp.glob("session_*/logs/worker-*")), "no Ray worker ran in the started cluster"
    finally:
        import ray as ray_module

        ray_module.shutdown()  # this process's driver connection, if simulate left one
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def test_instruct_two_nodes_two_rounds_write_every_output_and_ledgers_compose(tiny_chat_llama, instruct_csv, tmp_path):
    """The federated path on a causal LM: a 2-node, 2-round instruct federation, scored by
    generation on the central held-out rows, with its round-0 baseline and samples."""
    from fedtune.privacy.accountants import independent_epsilon
    from simulations.run import simulate

    config = build_config({
        "model": {"path": str(tiny_chat_llama), "task": "instruct", "max_seq_len": 32},
        "data": {"path": str(instruct_csv)},
        "training": {"epochs": 1, "rounds": 2, "batch_size": 8},
        "federation": {"clients_per_round": 2, "min_clients": 2},
        "simulation": {"num_clients": 2, "central_holdout": 0.2},
    })
    run = simulate(config, tmp_path / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(len(r["clients_accepted"]) == 2 and r["evaluation"] == "central" for r in records)
    assert all(0 <= r["accuracy"] <= 1 and r["perplexity"] > 1 for r in records)
    zero = json.loads((run / "zero_shot.json").read_text())
    assert zero["round"] == 0 and zero["examples"] == 24 and len(zero["samples"]) == 3
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["round"] for s in samples] == [1, 2] and all(s["samples"][0]["expected"] in ("pos", "neg") for s in samples)
    data = json.loads((run / "data_summary.json").read_text())
    assert data["training rows (all clients)"]["kept"] == 96 and data["held-out rows"]["examples"] == 24
    summary = (run / "summary.md").read_text()
    assert "## Scored by generation" in summary and "task instruct" in summary
    for name in ("adapter/adapter_config.json", "checkpoint.safetensors", "clients.csv", "privacy.json", "accuracy.png"):
        assert (run / name).is_file(), name
    ledgers = sorted((run / "clients").glob("client-*/ledger-*.json"))
    assert len(ledgers) == 2
    for path in ledgers:  # both rounds composed in each node's one ledger, checked by a second accountant
        ledger = PrivacyLedger.load(path)
        rounds = [entry for entry in ledger.history if entry[1] < 1]
        assert sum(steps for _, _, steps in rounds) == 2 * ledger.calls[0]["steps"]
        assert ledger.epsilon() <= 8.0
        assert independent_epsilon("rdp", ledger.history, ledger.delta) == pytest.approx(ledger.epsilon(), rel=0.02)
