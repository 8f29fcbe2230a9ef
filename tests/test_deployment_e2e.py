"""A real TLS deployment on 127.0.0.1: SuperLink with node authentication, three registered
SuperNodes, each with its own data file, state dir and node privacy policy (its own cap,
delta and releases), one unregistered SuperNode that must be refused, a two-round run
through `flwr run`, then one SecAgg+ round, then a run whose app bundle carries the server's
own ClientApp, which no node may run."""

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.system.certificates import make_dev_certs
from tests.conftest import free_port, make_texts, stop_group

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _start(command, log: Path, env) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _csv(path: Path, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def _malicious_bundle(tmp_path: Path) -> tuple[Path, Path]:
    """An app bundle whose ClientApp, were a node to run it, would mark the disk on import and
    send back the node's policy file: what a malicious server would ship."""
    folder, marker = tmp_path / "bundle", tmp_path / "bundle-code-ran-on-a-node"
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "innocent"\nversion = "1.0.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "operator"\n\n'
        '[tool.flwr.app.components]\nserverapp = "server.server_app:app"\nclientapp = "grab:app"\n\n'
        '[tool.flwr.app.config]\nconfig = ""\nrun-dir = ""\ntraining.rounds = 1\n')
    (folder / "grab.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('imported')\n"
        "from flwr.app import ConfigRecord, Message, RecordDict\nfrom flwr.clientapp import ClientApp\n"
        "app = ClientApp()\n\n@app.train()\ndef train(msg, context):\n"
        "    policy = Path(context.node_config['policy-file']).read_text()\n"
        "    return Message(RecordDict({'status': ConfigRecord({'policy': policy})}), reply_to=msg)\n")
    return folder, marker


def test_tls_superlink_two_supernodes_two_rounds(tiny_bert, tmp_path):
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["127.0.0.1", "localhost"], nodes=4)
    port = free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "UV_CACHE_DIR": str(tmp_path / "uv"),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "fedtune"\n\n[superlink.fedtune]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n')
    run_dir, secure_dir, evil_run = tmp_path / "server-run", tmp_path / "server-run-secagg", tmp_path / "server-run-bundle"
    federation = tmp_path / "federation.toml"
    federation.write_text(
        f'[model]\npath = "{tiny_bert}"\nmax_seq_len = 16\n\n[data]\nlabels = ["neg", "pos"]\n\n'
        '[training]\nrounds = 2\nepochs = 1\nbatch_size = 8\n\n[dp]\ntarget_epsilon = 3.0\n\n'
        '[federation]\nclients_per_round = 3\nmin_clients = 3\nround_timeout = 300\n')
    policies = {1: ["--max-epsilon", "8", "--labels", "neg,pos", "--release-evaluation", "dp"],  # a generous node that shares metrics
                2: ["--max-epsilon", "5", "--labels", "neg,pos", "--delta", "1e-4"],              # a strict one that shares nothing
                3: ["--max-epsilon", "8", "--labels", "neg,pos"],
                4: ["--max-epsilon", "1", "--labels", "neg,pos"]}
    processes = []
    try:
        processes.append(_start([BIN / "fedtune", "server", "--certs", str(certs), "--host", "127.0.0.1",
                                 "--port", str(port), "--state", str(tmp_path / "superlink")],
                                tmp_path / "superlink.log", env))
        for number in (1, 2, 3):
            for _attempt in range(30):  # the SuperLink takes a few seconds to listen
                register = subprocess.run([BIN / "flwr", "supernode", "register", str(certs / f"node-{number}.pub"), "fedtune"],
                                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
                if register.returncode == 0 or "unavailable" not in register.stdout + register.stderr:
                    break
                time.sleep(2)
            assert register.returncode == 0, register.stdout + register.stderr + (tmp_path / "superlink.log").read_text()
        for number in (1, 2, 3, 4):  # node 4's key was never registered
            data = _csv(tmp_path / f"hospital-{number}.csv", make_texts(60, seed=number))
            processes.append(_start([BIN / "fedtune", "client", "--superlink", f"127.0.0.1:{port}",
                                     "--ca", str(certs / "ca.crt"), "--key", str(certs / f"node-{number}"),
                                     "--data", str(data), "--state-dir", str(tmp_path / f"node-{number}-state"),
                                     "--budget-dir", str(tmp_path / f"node-{number}-budgets"), *policies[number],
                                     "--model", str(tiny_bert),  # the node loads its own copy of the base model
                                     "--port", str(free_port())], tmp_path / f"node-{number}.log", env))
        _wait_for(lambda: "Failed to activate SuperNode" in (tmp_path / "node-4.log").read_text()
                  or processes[4].poll() is not None, 120, "the unregistered SuperNode to be refused")
        run = subprocess.run([BIN / "flwr", "run", str(ROOT), "fedtune", "--run-config",
                              f'config="{federation}" run-dir="{run_dir}"'],
                             capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        _wait_for(lambda: (run_dir / "adapter" / "adapter_config.json").is_file(), 300, "the exported adapter")
        # one more round, with SecAgg+: the operator sees only the three nodes' masked sum; the
        # same TOML, changed by `--run-config` overrides (mapped and checked by fedtune.run_config)
        run = subprocess.run([BIN / "flwr", "run", str(ROOT), "fedtune", "--run-config",
                              f'config="{federation}" run-dir="{secure_dir}" training.rounds=1 '
                              'dp.target-epsilon=1.0 federation.secure-aggregation=true'],
                             capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        _wait_for(lambda: (secure_dir / "adapter" / "adapter_config.json").is_file(), 300, "the SecAgg+ round's adapter")
        # a run whose app bundle names the server's own ClientApp: every node still runs its own
        evil_dir, marker = _malicious_bundle(tmp_path)
        run = subprocess.run([BIN / "flwr", "run", str(evil_dir), "fedtune", "--run-config",
                              f'config="{federation}" run-dir="{evil_run}" training.rounds=1'],
                             capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        _wait_for(lambda: (evil_run / "adapter" / "adapter_config.json").is_file() or marker.exists(), 300,
                  "the third run's adapter")
        assert not marker.exists(), "a node ran the ClientApp of the server's app bundle"
    finally:
        for process in processes:
            stop_group(process)
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    assert "Failed to activate SuperNode" in logs["node-4.log"], logs["node-4.log"][-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(len(r["clients_accepted"]) == 3 for r in records)
    for number, cap, delta in ((1, 8.0, 1 / 600), (2, 5.0, 1e-4)):  # node 1: 1/(10 n), n = its 60 rows
        ledger = json.loads(next((tmp_path / f"node-{number}-budgets").glob("ledger-*.json")).read_text())
        trained = [c for c in ledger["calls"] if c.get("label", "").startswith("round") and "steps" in c
                   and c["sample_rate"] < 1]
        # 2 plain rounds, 1 SecAgg+, 1 in the bundle's run (trained by the node's own ClientApp)
        assert len(trained) == 4 and ledger["epsilon"] <= cap and ledger["max_epsilon"] == cap
        assert ledger["delta"] == pytest.approx(delta)
    assert "policy: max epsilon 5, delta 0.0001" in logs["node-2.log"]
    secure_config = (secure_dir / "config.toml").read_text()
    assert "rounds = 1" in secure_config and "target_epsilon = 1.0" in secure_config
    secure_record = json.loads((secure_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert secure_record["secure_aggregation"] is True and len(secure_record["clients_accepted"]) == 3
    assert "SecAgg+" in (secure_dir / "summary.md").read_text()
    assert not (tmp_path / "node-4-budgets").exists()
    summary = (run_dir / "summary.md").read_text()
    assert "## Privacy" in summary and "as released by the node" in (run_dir / "privacy.json").read_text()
    assert not marker.exists(), "a node ran the ClientApp of the server's app bundle"
    bundle_record = json.loads((evil_run / "metrics.jsonl").read_text().splitlines()[0])
    assert len(bundle_record["clients_accepted"]) == 3  # the nodes' own app trained and answered
    # the exported adapter loads with stock peft
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    PeftModel.from_pretrained(base, run_dir / "adapter")
