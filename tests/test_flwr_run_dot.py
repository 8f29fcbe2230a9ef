"""`flwr run .` with no extra file: the repository's pyproject.toml holds the default
federation's values, and Flower's local simulation runtime runs the deployment apps, its
virtual nodes playing demonstration sites (clients.virtual_node). A SuperLink in simulation
mode of the test's own, on a free loopback port, stopped by its PID."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, stop_group

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _runs(env) -> list[dict]:
    listed = subprocess.run([BIN / "flwr", "ls", "--format", "json"], capture_output=True, text=True, env=env,
                            timeout=60)
    return json.loads(listed.stdout).get("runs", []) if listed.returncode == 0 else []


def test_flwr_run_dot_runs_the_default_apps_on_the_local_simulation_runtime(tmp_path):
    port = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    ray_tmp = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "FLWR_HOME": str(home), "RAY_TMPDIR": ray_tmp, "TQDM_DISABLE": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    superlink = subprocess.Popen([BIN / "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
                                  "--port", str(port)], cwd=tmp_path, env=env, start_new_session=True,
                                 stdout=(tmp_path / "superlink.log").open("w"), stderr=subprocess.STDOUT)
    try:
        for _attempt in range(30):
            run = subprocess.run([BIN / "flwr", "run", ".", "--federation-config", "num-supernodes=2",
                                  "--run-config", "training.rounds=1 model.max-seq-len=16 "
                                  "federation.clients-per-round=2 federation.min-clients=2"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            if run.returncode == 0 or "unavailable" not in (run.stdout + run.stderr).lower():
                break
            time.sleep(2)
        assert run.returncode == 0, run.stdout + run.stderr
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not any(r["status"].startswith("finished") for r in _runs(env)):
            time.sleep(5)
        statuses = [(r["status"], r.get("status-details", "")) for r in _runs(env)]
        log = subprocess.run([BIN / "flwr", "log", statuses[0] and _runs(env)[0]["run-id"], "--show"],
                             capture_output=True, text=True, env=env, timeout=60).stdout if statuses else ""
    finally:
        stop_group(superlink, timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    (tmp_path / "run.log").write_text(log)
    assert statuses and statuses[0][0] == "finished:completed", (statuses, f"log: {tmp_path / 'run.log'}")
    run_dir = tmp_path / "runs" / "federation"  # pyproject.toml's run-dir, under the SuperLink's folder
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert len(record["clients_accepted"]) == 2 and record["epsilon_max"] <= 8.0
    config = (run_dir / "config.toml").read_text()
    assert "rounds = 1" in config and "max_seq_len = 16" in config and "learning_rate = 0.01" in config
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    ledgers = list((home / "fedtune-virtual-nodes").glob("run-*/node-*/ledger-*.json"))
    assert len(ledgers) == 2  # each demonstration site charged its own budget
