"""The default `fedtune simulate`, as a new user runs it, on each engine, side by side.

What a first run costs and says: the README's Quickstart runs `fedtune simulate` with no
arguments (simulations/default.toml: BBC News, 5 clients, 5 rounds, epsilon 8). Which
engine the default picks decides most of its time on a small host, so both are measured
on the same workload, in ABBA order, each in its own process, timed from outside:

  in-process  one client at a time in the simulation's own process, every core for it
  ray         Flower's Ray backend, one worker per core (`--cpus-per-client 1`)

Each run uses `dp.noise_seed = 0`, so both engines train the same clients on the same
Poisson batches with the same noise: their accuracies must agree, and a difference in time
is the engine's. Reported per run: whole-process wall time, final accuracy, and the lines
the run printed besides its progress bar (tqdm's own lines are not counted).

    python benchmarks/default_run.py [--repeats 1] [--json docs/benchmark-runs/default_run.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedtune.system.machine import machine  # noqa: E402

VARIANTS = {
    "in-process": ("--engine", "in-process", "--cpus-per-client", str(os.cpu_count() or 1)),
    "ray": ("--engine", "ray", "--cpus-per-client", "1"),
}


def printed_lines(text: str) -> list[str]:
    """The lines a run printed, without the progress bar's redraws (tqdm writes `\\r`)."""
    lines = []
    for raw in text.splitlines():
        line = raw.split("\r")[-1].strip()
        bar = line.startswith("rounds:") or (line.startswith("round ") and " nodes trained" in line)
        if line and not bar:
            lines.append(line)
    return lines


def run_once(variant: str, out: Path) -> dict:
    command = [sys.executable, "-m", "fedtune", "simulate", "--out", str(out), "--set", "dp.noise_seed=0",
               *VARIANTS[variant]]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = printed_lines(result.stdout + result.stderr)
    return {"engine": variant, "wall_seconds": round(wall, 1), "accuracy": records[-1]["accuracy"],
            "rounds": len(records), "printed_lines": len(lines), "lines": lines}


def measure(repeats: int) -> dict:
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    order = list(VARIANTS)
    with tempfile.TemporaryDirectory(prefix="fedtune-default-run-") as tmp:
        for repeat in range(repeats):
            for index, variant in enumerate(order if repeat % 2 == 0 else order[::-1]):
                print(f"[default run] {variant}, repeat {repeat + 1} of {repeats} ...", flush=True)
                runs[variant].append(run_once(variant, Path(tmp) / f"{variant}-{repeat}-{index}"))
    summary = {name: {"wall_seconds_mean": round(statistics.mean(r["wall_seconds"] for r in rs), 1),
                      "accuracy": sorted({r["accuracy"] for r in rs}), "printed_lines_max": max(r["printed_lines"]
                                                                                                for r in rs),
                      "repeats": len(rs)} for name, rs in runs.items()}
    summary["ray_over_in_process"] = round(summary["ray"]["wall_seconds_mean"]
                                           / summary["in-process"]["wall_seconds_mean"], 3)
    return {"machine": machine(), "workload": "fedtune simulate (simulations/default.toml), dp.noise_seed = 0",
            "runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per engine, in ABBA order")
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args()
    report = measure(args.repeats)
    print(json.dumps({"machine": report["machine"], "summary": report["summary"]}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
