"""Layers with arrows pointing one way, checked in fresh interpreters: the core imports
neither Flower nor the packages above it; the deployment apps never import the simulation
harness; a config mistake is reported before torch or Flower is imported."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER = ("flwr", "ray", "simulations", "server", "clients")


def _imported_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _modules(package: str) -> list[str]:
    """Every module of a package, subpackages included."""
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py") if p.stem != "__main__")


def test_the_core_imports_nothing_above_it():
    imported = _imported_after("\n".join(f"import {m}" for m in _modules("fedtune")))
    assert not imported & set(UPPER), imported & set(UPPER)


def test_the_deployment_apps_never_import_the_simulation_harness():
    modules = _modules("server") + _modules("clients")
    imported = _imported_after("\n".join(f"import {m}" for m in modules))
    assert "flwr" in imported and "simulations" not in imported


def test_a_config_mistake_is_reported_before_torch_or_flower_load():
    for command in ("train-local", "simulate"):
        code = (f"from fedtune.cli import main\nrc = main([{command!r}, '--set', 'dp.target_epsilon=-1'])\n"
                "assert rc == 2, rc")
        imported = _imported_after(code)
        assert not imported & {"torch", "flwr", "ray", "transformers"}, (command, imported & {"torch", "flwr"})
