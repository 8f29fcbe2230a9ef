"""docs/operations.md, for IT: the systemd units are parsed and the command each starts is
run; the two-machine walk-through runs every command the page gives, in order, with the
SuperLink on 127.0.0.2 and the site on 127.0.0.1, each machine's /etc/fedtune and
/var/lib/fedtune below its own temporary folder, `scp` copying between the two, and
`sudo systemctl start UNIT` starting the unit file's command."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedtune.cli import build_parser
from tests.conftest import free_port, stop_group

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GUIDE = ROOT / "docs" / "operations.md"
UNITS = {name: ROOT / "docs" / "systemd" / f"{name}.service" for name in ("fedtune-superlink", "fedtune-node")}
SERVER_HOST = "127.0.0.2"  # the operator's machine: a second loopback address


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit: section -> key -> values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
        elif "=" in line and current is not None:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
        else:
            raise AssertionError(f"{path.name}: cannot parse {line!r}")
    return sections


@pytest.mark.parametrize("name", sorted(UNITS))
def test_the_units_run_fedtune_unprivileged_and_confined(name):
    unit = parse_unit(UNITS[name])
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert set(unit) == {"Unit", "Service", "Install"} and unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert service["User"] == "fedtune" and service["Restart"] == "on-failure" and service["UMask"] == "0077"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == "/var/lib/fedtune" and service["WorkingDirectory"] == "/var/lib/fedtune"
    command = shlex.split(service["ExecStart"])
    assert command[0] == "/opt/fedtune/venv/bin/fedtune" and command[1] == {"fedtune-superlink": "server",
                                                                            "fedtune-node": "client"}[name]
    args = build_parser().parse_args(command[1:])  # every flag is one fedtune knows
    writes = [getattr(args, key) for key in ("state", "state_dir", "budget_dir") if getattr(args, key, None)]
    assert writes and all(path.startswith("/var/lib/fedtune/") for path in writes)


# -- the walk-through ----------------------------------------------------------------------

def walkthrough_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of the guide's last section, in order."""
    section = GUIDE.read_text().split("## Two machines, step by step", 1)[1]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


class Machines:
    """Two machines' folders, the substitutions that map the guide onto them, and the
    services started (stopped by PID at the end)."""

    def __init__(self, tmp: Path):
        self.roots = {"operator": tmp / "operator", "site": tmp / "site"}
        self.port, self.node_port = free_port(SERVER_HOST), free_port("127.0.0.1")
        self.services: list[subprocess.Popen] = []
        self.tmp = tmp
        for root in self.roots.values():
            for folder in ("etc/fedtune", "var/lib/fedtune", "srv/data", "home/.flwr"):
                (root / folder).mkdir(parents=True, exist_ok=True)

    def local(self, text: str, machine: str) -> str:
        root = self.roots[machine]
        for path in ("/etc/fedtune", "/var/lib/fedtune", "/srv/data"):
            text = re.sub(rf"(?<![\w/]){re.escape(path)}", str(root) + path, text)
        return (text.replace("/opt/fedtune/venv/bin/", f"{BIN}/").replace("fl.example.org:9092", f"{SERVER_HOST}:{self.port}")
                .replace("fl.example.org", SERVER_HOST).replace("0.0.0.0", SERVER_HOST)
                .replace("--port 9092", f"--port {self.port}").replace("--port 9094", f"--port {self.node_port}"))

    def env(self, machine: str, extra: dict | None = None) -> dict:
        return {**os.environ, "FLWR_HOME": str(self.roots[machine] / "home" / ".flwr"), "TQDM_DISABLE": "1",
                "PYTHONPATH": str(ROOT), "UV_CACHE_DIR": str(self.tmp / "uv"), **(extra or {})}

    def start_unit(self, name: str, machine: str) -> None:
        service = {k: v[-1] for k, v in parse_unit(UNITS[name])["Service"].items()}
        env = dict(item.split("=", 1) for item in [self.local(service["Environment"], machine)])
        command = shlex.split(self.local(service["ExecStart"], machine))
        log = (self.tmp / f"{name}.log").open("w")
        self.services.append(subprocess.Popen(command, cwd=self.local(service["WorkingDirectory"], machine),
                                              env=self.env(machine, env), stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))

    def scp(self, source: str, target: str) -> None:
        """`scp` run on the site: `fl.example.org:PATH` is the operator's PATH, a bare path the site's."""
        def where(spec: str) -> Path:
            host, _, path = spec.rpartition(":")
            return Path(self.local(path, "operator" if host == "fl.example.org" else "site"))

        shutil.copy(where(source), where(target))

    def stop(self) -> None:
        for process in self.services:
            stop_group(process)


def _machine_of(block_index: int) -> str:
    """Which machine a block runs on: the guide says so in the paragraph before it."""
    section = GUIDE.read_text().split("## Two machines, step by step", 1)[1]
    before = section.split("```")[2 * block_index]
    said = re.findall(r"[Oo]n (the operator's machine|the site)", before)
    return "operator" if said and said[-1] == "the operator's machine" else "site"


def _news_rows(path: Path, count: int = 60) -> None:
    from fedtune.data.named import load_builtin

    table = load_builtin("bbc-news")
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(zip(table.texts[::37][:count], table.labels[::37][:count]))


def _wait_for_run(machines: Machines, timeout: float = 400) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run([BIN / "flwr", "ls", "fedtune", "--format", "json"], capture_output=True, text=True,
                                env=machines.env("operator"), timeout=60)
        runs = json.loads(listed.stdout).get("runs", []) if listed.returncode == 0 else []
        if runs and all(run["status"].startswith("finished") for run in runs):
            return runs
        time.sleep(3)
    raise AssertionError("the run did not finish")


@pytest.mark.slow
def test_the_two_machine_walkthrough_runs_as_written(tmp_path):
    machines = Machines(tmp_path)
    blocks = walkthrough_blocks()
    toml_targets = iter([machines.roots["operator"] / "home" / ".flwr" / "config.toml",
                         machines.roots["site"] / "etc" / "fedtune" / "policy.toml"])
    _news_rows(machines.roots["site"] / "srv" / "data" / "news.csv")
    ran, node_ids = [], []
    try:
        for index, (language, text) in enumerate(blocks):
            machine = _machine_of(index)
            if language == "toml":
                next(toml_targets).write_text(machines.local(text, machine))
                continue
            for line in text.strip().splitlines():
                words = shlex.split(line)
                if words[:3] == ["sudo", "systemctl", "start"]:
                    machines.start_unit(words[3], machine)
                    time.sleep(5)
                elif words[0] == "scp":
                    machines.scp(words[1], words[2])
                else:
                    if "NODE_ID" in line:
                        line = line.replace("NODE_ID", str(node_ids[0]))
                    ran.append(_run(line, machine, machines, node_ids))
    finally:
        machines.stop()
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.log")}
    run_dir = machines.roots["operator"] / "var" / "lib" / "fedtune" / "runs" / "first"
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert len(record["clients_accepted"]) == 1, logs
    assert (machines.roots["operator"] / "var/lib/fedtune/adapters/first/adapter_config.json").is_file()
    budget = next(out for command, out in ran if command.startswith("fedtune budget"))
    assert "news.csv" in budget and "rows" in budget.lower()
    assert "node policy: max epsilon 8" in logs["fedtune-node.log"]
    assert not any("Traceback" in output for _, output in ran)
    unregistered = next(out for command, out in ran if command.startswith("flwr supernode unregister"))
    assert str(node_ids[0]) in unregistered or "unregister" in unregistered.lower()


def _run(line: str, machine: str, machines: Machines, node_ids: list) -> tuple[str, str]:
    """One command of the guide on its machine; `flwr run` waits for the run to finish (the
    guide's next command reads its result), `flwr supernode ls` remembers the node ids."""
    command = machines.local(line, machine)
    for attempt in range(20):
        done = subprocess.run(command, shell=True, cwd=ROOT, env=machines.env(machine), capture_output=True,
                              text=True, timeout=300)
        output = done.stdout + done.stderr
        if done.returncode == 0 or "unavailable" not in output.lower() or attempt == 19:
            break
        time.sleep(3)  # the SuperLink is still starting
    assert done.returncode == 0, f"{line}\n{output[-3000:]}"
    if line.startswith("flwr run"):
        runs = _wait_for_run(machines)
        assert all(run["status"] == "finished:completed" for run in runs), runs
    if line.startswith("flwr supernode ls"):
        listed = subprocess.run(command + " --format json", shell=True, cwd=ROOT, env=machines.env(machine),
                                capture_output=True, text=True, timeout=60)
        node_ids += [node["node-id"] for node in json.loads(listed.stdout)["nodes"]]
    return line, output
