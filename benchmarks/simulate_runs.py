"""What the simulation benchmarks share: one `fedtune simulate` variant in its own process,
every variant repeated in ABBA order, and the command line around a `measure` function."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable


def run_simulate(name: str, config_text: str, rounds: int, workdir: Path, index: int, engine: str = "auto",
                 env: tuple = ()) -> tuple[float, list[dict]]:
    """`fedtune simulate` on `config_text` with every core per client, timed from outside:
    (process seconds, the metrics.jsonl records). A failure or a missing round exits."""
    config = workdir / f"{name}-{index}.toml"
    config.write_text(config_text)
    out = workdir / f"{name}-{index}"
    command = [sys.executable, "-m", "fedtune", "simulate", "--config", str(config), "--out", str(out),
               "--cpus-per-client", str(os.cpu_count() or 1), "--engine", engine]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "TQDM_DISABLE": "1", **dict(env)})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if len(records) != rounds:
        sys.exit(f"{name}: {len(records)} of {rounds} rounds recorded; see {out}")
    return wall, records


def abba(plan: list, repeats: int, run_one: Callable, describe: Callable, log=print) -> dict[str, list[dict]]:
    """Every variant of `plan` once per repeat, in reversed order on odd repeats, so that a
    drift of the machine hits every variant alike: {variant name: [run, ...]}."""
    import tempfile

    runs: dict[str, list[dict]] = {variant.name: [] for variant in plan}
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as tmp:
        for repeat in range(repeats):
            for index, variant in enumerate(plan if repeat % 2 == 0 else plan[::-1]):
                log(describe(variant))
                runs[variant.name].append(run_one(variant, Path(tmp), repeat * 100 + index))
    return runs


def rounds_main(doc: str, measure: Callable[[int, int], dict]) -> None:
    """`--rounds`, `--repeats`, `--json`: run `measure(rounds, repeats)`, print its summary."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, in ABBA order")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit("--rounds: at least 2 (round 1 is warm-up)")
    report = measure(args.rounds, args.repeats)
    print(json.dumps({"machine": report["machine"], "summary": report["summary"]}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
