"""Real Flower simulations (Ray backend) of virtual clients on a tiny model."""

import csv
import json

import pytest

from fedtune.config import build_config
from fedtune.privacy import PrivacyLedger, compute_epsilon
from tests.conftest import make_texts

pytestmark = pytest.mark.slow


def _data(tmp_path, n=150):
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(make_texts(n))
    return data


def _config(tiny_bert, data, rounds=2, **federation):
    return build_config({
        "model": {"path": str(tiny_bert), "max_seq_len": 16},
        "data": {"path": str(data)},
        "training": {"epochs": 1, "rounds": rounds, "batch_size": 8},
        "federation": {"num_clients": 3, "clients_per_round": 3, "min_clients": 2, **federation},
    })


def test_three_clients_two_rounds_write_every_output(tiny_bert, tmp_path):
    from simulations.run import simulate

    run = simulate(_config(tiny_bert, _data(tmp_path)), tmp_path / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(len(r["clients_accepted"]) == 3 and not r["clients_rejected"] for r in records)
    assert all(r["evaluation"] == "federated" and 0 <= r["accuracy"] <= 1 for r in records)
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "checkpoint.safetensors").is_file()
    assert len(json.loads((run / "partitions.json").read_text())) == 3
    for name in ("config.toml", "metrics.csv", "clients.csv", "summary.md", "accuracy.png", "loss.png", "epsilon.png"):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert len((run / "clients.csv").read_text().splitlines()) == 4
    # state really persists between ephemeral ClientApps: two rounds composed in each ledger
    ledgers = sorted((run / "clients").glob("client-*/ledger.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        ledger = PrivacyLedger.load(path)
        (sigma, q, steps), = ledger.history
        assert len(ledger.calls) == 2 and steps == 2 * ledger.calls[0]["steps"]
        assert ledger.epsilon() == compute_epsilon(sigma, q, steps, ledger.delta) <= 8.0
    assert records[-1]["epsilon_max"] == max(PrivacyLedger.load(p).epsilon() for p in ledgers)


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
    written = sweep(base, cells, out)
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
    attaches to it through `federation.ray_address` instead of starting its own Ray."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from simulations.run import simulate

    ray = str(Path(sys.executable).parent / "ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    started = subprocess.run([ray, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                              "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
                              "--temp-dir", str(temp)], capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        config = _config(tiny_bert, _data(tmp_path), rounds=1, ray_address=f"127.0.0.1:{port}")
        run = simulate(config, tmp_path / "run")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(records) == 1 and len(records[0]["clients_accepted"]) == 3
        # the work ran on the cluster we started: its session holds the worker logs
        assert list(temp.glob("session_*/logs/worker-*")), "no Ray worker ran in the started cluster"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
