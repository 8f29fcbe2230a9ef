"""Simulation efficiency of `fedtune simulate`, measured side by side in one run.

Three simulations of the same workload (tweets, all-MiniLM-L6-v2 + LoRA, DP-SGD at
epsilon 8, 10 clients sampled per round, 35 rows per client, same seed, so the same
clients and the same Poisson batches), each `fedtune simulate` in its own process:

  fedtune      the real thing: one base model per worker process, adapters swapped in
  reload       the FlowerTune pattern: a fresh base model in every ClientApp call
               (FEDTUNE_RELOAD_MODEL_EVERY_CALL=1), everything else identical
  fedtune-1000 the fedtune run with 1,000 registered clients instead of 10

Reported (issue 4's goals in brackets):
  (a) round wall time without evaluation / summed bare local training time of the round's
      clients (the DP-SGD steps only, timed inside each client)  [<= 1.15]
  (b) reload round time / fedtune round time: the speed-up over the FlowerTune pattern
  (c) peak resident memory (server + Ray workers) with 1,000 vs 10 registered clients [<= 1.1]

Clients run one at a time (Ray CPUs per client = all cores), so (a) is pure overhead and
not hidden by parallelism. Round 1 (Ray start, first model load) is reported separately.

    python benchmarks/simulation_efficiency.py [--rounds 4] [--json docs/simulation_efficiency.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fedtune.machine import machine  # noqa: E402

ROWS_PER_CLIENT = 35
PER_ROUND = 10


def _config(registered: int, rounds: int) -> str:
    return f"""
[data]
dataset = "tweets"
max_examples = {registered * ROWS_PER_CLIENT}
[model]
max_seq_len = 64
[training]
rounds = {rounds}
epochs = 1
batch_size = 8
learning_rate = 0.01
[dp]
target_epsilon = 8.0
[federation]
num_clients = {registered}
clients_per_round = {PER_ROUND}
min_clients = {PER_ROUND}
"""


def run(name: str, registered: int, rounds: int, workdir: Path, env_extra: dict) -> dict:
    config = workdir / f"{name}.toml"
    config.write_text(_config(registered, rounds))
    out = workdir / name
    cpus = os.cpu_count() or 1
    command = [sys.executable, "-m", "fedtune", "simulate", "--config", str(config), "--out", str(out),
               "--cpus-per-client", str(cpus)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1", **env_extra})
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if len(records) != rounds:
        sys.exit(f"{name}: {len(records)} of {rounds} rounds recorded; see {out}")
    return {"name": name, "registered": registered, "process_seconds": round(wall, 1), "rounds": records}


def _round_seconds(record: dict) -> float:
    return record["seconds"] - record["evaluation_seconds"]


def summarize(runs: dict) -> dict:
    fed, reload, big = runs["fedtune"], runs["reload"], runs["fedtune-1000"]
    steady = slice(1, None)  # rounds 2.. (round 1 includes Ray start and the first model load)
    overhead = [_round_seconds(r) / r["train_seconds_sum"] for r in fed["rounds"][steady]]
    return {
        "a_round_over_bare_training": round(statistics.mean(overhead), 3),
        "a_round1_over_bare_training": round(_round_seconds(fed["rounds"][0]) / fed["rounds"][0]["train_seconds_sum"], 3),
        "b_reload_over_fedtune": round(sum(_round_seconds(r) for r in reload["rounds"][steady])
                                       / sum(_round_seconds(r) for r in fed["rounds"][steady]), 3),
        "b_reload_over_fedtune_all_rounds": round(sum(_round_seconds(r) for r in reload["rounds"])
                                                  / sum(_round_seconds(r) for r in fed["rounds"]), 3),
        "c_peak_memory_1000_over_10": round(max(r["resident_mb"] for r in big["rounds"])
                                            / max(r["resident_mb"] for r in fed["rounds"]), 3),
        "peak_memory_mb": {name: max(r["resident_mb"] for r in run["rounds"]) for name, run in runs.items()},
        "mean_round_seconds_steady": {name: round(statistics.mean(_round_seconds(r) for r in run["rounds"][steady]), 2)
                                      for name, run in runs.items()},
        "mean_bare_training_seconds_steady": round(statistics.mean(r["train_seconds_sum"] for r in fed["rounds"][steady]), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args()
    if args.rounds < 2:
        sys.exit("--rounds: at least 2 (round 1 is warm-up)")
    with tempfile.TemporaryDirectory(prefix="fedtune-simbench-") as tmp:
        workdir = Path(tmp)
        runs = {}
        for name, registered, env in (("fedtune", PER_ROUND, {}),
                                      ("reload", PER_ROUND, {"FEDTUNE_RELOAD_MODEL_EVERY_CALL": "1"}),
                                      ("fedtune-1000", 1000, {})):
            print(f"running {name} ({registered} registered clients, {args.rounds} rounds) ...", flush=True)
            runs[name] = run(name, registered, args.rounds, workdir, env)
    summary = summarize(runs)
    report = {"machine": machine(), "workload": {"dataset": "tweets", "model": "all-MiniLM-L6-v2 + LoRA r8",
                                                 "rows_per_client": ROWS_PER_CLIENT, "clients_per_round": PER_ROUND,
                                                 "rounds": args.rounds, "dp_epsilon": 8.0, "max_seq_len": 64,
                                                 "batch_size": 8},
              "summary": summary, "runs": runs}
    print(json.dumps({"machine": report["machine"], "summary": summary}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
