"""A quiet first run: the warnings known to be harmless and Flower's DEBUG lines are
filtered for the whole process, even when Flower sets its logger to DEBUG after fedtune
set it; `--verbose` (FEDTUNE_VERBOSE=1) shows them; the one true warning, Opacus's
"Secure RNG turned off", is said once per run in fedtune's own words. Each check runs in a
fresh interpreter, as a user's command does."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import logging, warnings
from fedtune.system.quiet import quiet_libraries
quiet_libraries()
import flwr.common.logger  # Flower sets its logger to DEBUG on import
logging.getLogger("flwr").setLevel(logging.DEBUG)
logging.getLogger("flwr").addHandler(logging.StreamHandler())  # as a simulation engine's log set-up does
from flwr.common.logger import log
log(logging.DEBUG, "a flower debug line")
log(logging.INFO, "a flower info line")
from opacus import PrivacyEngine
PrivacyEngine(accountant="rdp")
from fedtune.privacy import compute_epsilon
compute_epsilon(20.0, 0.01, 10, 1e-5)  # Opacus: "Optimal order is the largest alpha"
"""


def _run(env_verbose: bool) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(ROOT), **({"FEDTUNE_VERBOSE": "1"} if env_verbose else {})}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout + out.stderr


def test_harmless_warnings_and_flower_debug_lines_are_filtered_for_the_whole_process():
    text = _run(env_verbose=False)
    assert "a flower info line" in text
    for noise in ("a flower debug line", "Secure RNG turned off", "Optimal order"):
        assert noise not in text, noise


def test_verbose_shows_them_all():
    text = _run(env_verbose=True)
    for noise in ("a flower debug line", "Secure RNG turned off", "Optimal order"):
        assert noise in text, noise


def test_the_generator_is_described_once_in_fedtunes_words_in_every_summary(tmp_path):
    from fedtune.privacy.randomness import GENERATOR_NOTE
    from fedtune.reporting.run_report import write_report

    (tmp_path / "config.toml").write_text("[dp]\ntarget_epsilon = 8.0\n[data]\nlabels = [\"a\", \"b\"]\n")
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "accuracy": 0.5, "loss": 1.0, "seconds": 1.0}\n')
    write_report(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count(GENERATOR_NOTE) == 1 and "not a cryptographically secure generator" in GENERATOR_NOTE
    (tmp_path / "config.toml").write_text("[dp]\nenabled = false\n[data]\nlabels = [\"a\", \"b\"]\n")
    write_report(tmp_path)
    assert GENERATOR_NOTE not in (tmp_path / "summary.md").read_text()
