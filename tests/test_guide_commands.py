"""Every command the guides give is either run here (those that take under a minute: they
run as written, in a scratch home, and must exit 0) or named with the test that runs it
(or why nothing can: it needs hours, a GPU, another package). A command added to a guide
without either fails this test."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "docs" / name for name in ("node-operator.md", "federation-operator.md", "researcher.md",
                                            "deployment.md", "operations.md")]

# Run here, as written: reads, accounting, estimates and read-only listings.
RUN = ("fedtune privacy epsilon", "fedtune privacy plan", "fedtune privacy advise", "fedtune budget --dir",
       "fedtune sweep --epsilons 1,3,8,inf --partitions iid,0.3 --ffa-modes off,on --seeds 0,1,2 --out runs/sweep")

# Run elsewhere, or why not here (first words of the command -> where).
ELSEWHERE = {
    "fedtune client": "tests/test_deployment_e2e.py, tests/test_operations.py (a SuperLink and nodes)",
    "fedtune server": "tests/test_deployment_e2e.py, tests/test_operations.py",
    "fedtune certs": "tests/test_deployment_e2e.py, tests/test_operations.py",
    "flwr supernode": "tests/test_deployment_e2e.py, tests/test_operations.py",
    "flwr run .": "tests/test_flwr_run_dot.py, tests/test_deployment_e2e.py, tests/test_operations.py",
    "flwr run simulations/flwr_app": "tests/test_simulation_policy.py",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run": "tests/test_simulation_policy.py",
    "FEDTUNE_SIMULATION_POLICY=": "tests/test_simulation_policy.py",
    "flwr ls": "tests/test_operations.py",
    "fedtune export": "tests/test_operations.py, tests/test_cli.py",
    "fedtune budget": "tests/test_budget_command.py (a budget must exist first), tests/test_operations.py",
    "fedtune privacy ledger": "tests/test_privacy.py (a ledger must exist first)",
    "fedtune train-local": "tests/test_cli.py, tests/test_training.py (trains a model: minutes on a CPU)",
    "fedtune audit": "tests/test_audit.py (trains many models)",
    "fedtune simulate": "tests/test_first_run.py, tests/test_simulation_e2e.py (minutes on a CPU)",
    "fedtune sweep": "tests/test_sweep_estimate.py (hours as written)",
    "fedtune report": "tests/test_report.py",
    "fedtune generate": "tests/test_smollm2.py (needs the instruct extra and a trained adapter)",
    "python -m simulations.": "tests/test_results_report.py, tests/test_committed_reports_*.py (rewrite docs/)",
    "python -m benchmarks.report": "tests/test_committed_reports_benchmarks.py (rewrites docs/)",
    "python benchmarks/": "benchmark scripts: minutes to hours, run by hand, their records committed",
    "pip install": "the README's install, run by .ci/run",
    "ssh-keygen": "tests/test_operations.py",
    "scp ": "tests/test_operations.py (copies between the two machines' folders)",
    "sudo ": "needs root: tests/test_operations.py starts the units' commands instead",
}


def guide_commands() -> list[tuple[Path, str]]:
    """(guide, command) for every command line of every bash block (continuations joined,
    comments dropped)."""
    found = []
    for guide in GUIDES:
        for block in re.findall(r"```bash\n(.*?)```", guide.read_text(), re.S):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                command = re.sub(r"\s+#.*$", "", line).strip()
                if command and not command.startswith("#"):
                    found.append((guide, command))
    return found


def test_every_guide_command_is_run_here_or_says_where():
    unplaced = [f"{guide.name}: {command}" for guide, command in guide_commands()
                if not command.startswith(RUN) and not command.startswith(tuple(ELSEWHERE))]
    assert not unplaced, unplaced
    assert len(guide_commands()) > 40
    named = {name for where in ELSEWHERE.values() for name in re.findall(r"tests/test_\w+\.py", where)}
    assert all((ROOT / name).is_file() for name in named), sorted(n for n in named if not (ROOT / n).is_file())


@pytest.mark.parametrize("command", sorted({c for _, c in guide_commands() if c.startswith(RUN)}))
def test_the_quick_commands_run_as_written(command, tmp_path):
    words = shlex.split(command)
    if words[:2] == ["fedtune", "sweep"]:
        words.append("--dry-run")  # as written it is hours of training: its estimate and plan only
    if words[:3] == ["fedtune", "budget", "--dir"]:
        (tmp_path / "var-lib").mkdir()
        words[3] = str(tmp_path / "var-lib")  # the guide's /var/lib/fedtune/budgets, empty here
    done = subprocess.run([sys.executable, "-m", "fedtune", *words[1:]], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "FEDTUNE_HOME": str(tmp_path / "home")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() and "Traceback" not in done.stderr
