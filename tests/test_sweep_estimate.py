"""`fedtune sweep` says what it is about to do before it does it: how many cells, how many a
re-run skips, and how long the rest should take, measured on this sweep's finished cells.
`--dry-run` says only that and writes nothing.

No simulation runs here (a cell takes minutes): finished cells are written the way a
finished run leaves them, as `run_cell` and `cell_finished` read them (an adapter folder,
one metrics line per round, the cell.toml it ran with, and the wall time it took)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.config import load_config
from simulations.defaults import default_config_path
from simulations.sweep import CELL_SECONDS, grid, plan_sweep, sweep

GRID = ["--epsilons", "1,8", "--seeds", "0,1", "--clients", "2"]  # 4 cells


def _base():
    """The base `fedtune sweep` builds when given no --config and no flags."""
    return load_config(default_config_path())


def _finish(out: Path, cell, round_seconds: float, wall_seconds: float | None = None) -> Path:
    """A cell as a finished run leaves it; `wall_seconds` None: a cell from before the
    sweep recorded its wall time (only its rounds' own seconds are known)."""
    config = cell.config(_base())
    run_dir = out / "cells" / cell.name
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "cell.toml").write_text(config.to_toml())
    rounds = [{"round": r, "accuracy": 0.5, "macro_f1": 0.4, "loss": 1.0, "epsilon_max": 1.0,
               "seconds": round_seconds} for r in range(1, config.training.rounds + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rounds))
    if wall_seconds is not None:
        (run_dir / CELL_SECONDS).write_text(f"{wall_seconds}\n")
    return run_dir


def _cells():
    return grid("1,8", "2", "iid", "off", "0,1")


def _on_disk(folder: Path) -> dict:
    return {str(p): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_dry_run_prints_the_grid_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", *GRID, "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"[sweep] dry run: 4 cells into {out}")
    assert [line.split()[-1] for line in lines[1:5]] == [cell.name for cell in _cells()]
    assert all(line.strip().startswith("to run") for line in lines[1:6])
    assert lines[-1].startswith("[sweep] 4 cells: 0 finished, 4 to run; estimated about ")
    assert "plus the centralized baseline, from the default run's" in lines[-1] and "docs/benchmarks.md" in lines[-1]
    assert not out.exists()


def test_before_any_cell_finishes_the_estimate_is_the_records_scaled_by_work(tmp_path, monkeypatch):
    """The default run's committed record, scaled by rounds x training share x tokens; no
    record (an installed copy without docs/), no estimate rather than a made-up one."""
    import simulations.sweep as sweep_module

    record = json.loads(sweep_module.DEFAULT_RUN_RECORD.read_text())["summary"]["in-process"]["wall_seconds_mean"]
    base = _base()
    longer = base.replace(training=dataclasses.replace(base.training, rounds=base.training.rounds * 2))
    cells = grid("8", "5", "iid", "off", "0")
    seconds, source = sweep_module.record_estimate(base, cells)
    assert seconds == [pytest.approx(record)] and "2-core" in source
    assert sweep_module.record_estimate(longer, cells)[0] == [pytest.approx(2 * record)]
    monkeypatch.setattr(sweep_module, "DEFAULT_RUN_RECORD", tmp_path / "missing.json")
    assert plan_sweep(base, cells, tmp_path / "sweep").summary().endswith("no estimate until the first cell finishes")


def test_the_estimate_is_the_mean_time_of_the_finished_cells(tmp_path, capsys):
    out = tmp_path / "sweep"
    first, second = _cells()[:2]
    _finish(out, first, round_seconds=100.0, wall_seconds=900.0)  # 15 min, start-up included
    _finish(out, second, round_seconds=60.0)  # older cell: 5 rounds x 60 s = 5 min
    before = _on_disk(out)
    assert main(["sweep", *GRID, "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:5]] == ["done", "done", "to", "to"]
    assert lines[-1] == ("[sweep] 4 cells: 2 finished, 2 to run; estimated 20 min (2 x 10 min, the mean measured "
                         "time of the 2 finished cells) plus the centralized baseline")
    assert _on_disk(out) == before


def test_a_cell_finished_under_another_base_is_run_again(tmp_path):
    out = tmp_path / "sweep"
    cell = _cells()[0]
    run_dir = _finish(out, cell, round_seconds=10.0, wall_seconds=60.0)
    (run_dir / "cell.toml").write_text(cell.config(_base()).to_toml().replace("seed = 0", "seed = 7"))
    plan = plan_sweep(_base(), _cells(), out)
    assert plan.done == [False] * 4 and "estimated about" in plan.summary() and "default run's" in plan.summary()


def test_a_finished_sweep_says_so_before_it_starts(tmp_path):
    """Every cell and the baseline finished: the re-run announces nothing to run, then only
    rebuilds its tables."""
    out = tmp_path / "sweep"
    cells = _cells()
    for cell in cells:
        _finish(out, cell, round_seconds=30.0, wall_seconds=200.0)
    (out / "baseline.json").write_text(json.dumps({"accuracy": 0.6, "macro_f1": 0.5, "loss": 0.9,
                                                   "majority_accuracy": 0.3, "seconds": 12.0}))
    logged = []
    sweep(_base(), cells, out, log=logged.append)
    assert logged[:2] == [f"[sweep] 4 cells into {out}", "[sweep] 4 cells: all finished, nothing to run"]
    assert (out / "results.csv").is_file()
