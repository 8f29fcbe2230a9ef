"""What the registered population costs: 10^3 to 10^6 virtual clients, 10 sampled a round.

The workload: tweets, a tiny random-init BERT (2 layers, hidden 32, built here with the
bundled tokenizer: the population's cost, not the model's, is what is measured) + LoRA,
DP-SGD at epsilon 8 per client, the "sampled" partitioner (16 rows per client, drawn from
the pool when a client is first sampled), 10 clients a round, 3 rounds, central evaluation
on 300 held-out tweets, `--engine auto` (here: in-process). Each population is one
`fedtune simulate` in its own process, watched from outside:

  peak memory   the largest resident memory of the process and its children, sampled every
                50 ms from launch to exit (psutil)
  start-up      launch until the first round begins (imports, data, model, Flower's
                registration of the population)
  round time    each round without its evaluation, from the run's metrics.jsonl

Populations run in ABBA order when repeated (--repeats 2: 10^3..10^6, then 10^6..10^3).

    python benchmarks/population.py [--repeats 1] [--populations 1000,10000,100000,1000000]
                                    [--json docs/benchmark-runs/population.json]
    python -m benchmarks.report     # docs/benchmarks.md from the committed records
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POPULATIONS = (1_000, 10_000, 100_000, 1_000_000)
ROWS_PER_CLIENT = 16
PER_ROUND = 10
ROUNDS = 3
HELD_OUT = 300
TWEETS = 38_158  # the packaged tweets dataset's rows


def tiny_model(directory: Path) -> Path:
    """A random-init 2-layer BERT with the bundled tokenizer, saved for the runs to load."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedtune.models.base import bundled_model_path

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def config_text(model: Path, registered: int, rounds: int) -> str:
    return f"""
[data]
dataset = "tweets"
[model]
path = "{model}"
max_seq_len = 32
[training]
rounds = {rounds}
epochs = 1
batch_size = 8
learning_rate = 0.01
[dp]
target_epsilon = 8.0
noise_seed = 0  # reproducible noise (benchmark only): the same batches at every population
[federation]
clients_per_round = {PER_ROUND}
min_clients = {PER_ROUND}
[simulation]
num_clients = {registered}
partitioner = "sampled"
rows_per_client = {ROWS_PER_CLIENT}
central_holdout = {HELD_OUT / TWEETS:.6f}
"""


def tree_rss(process) -> int:
    import psutil

    total = 0
    for each in [process, *process.children(recursive=True)]:
        try:
            total += each.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(model: Path, registered: int, rounds: int, workdir: Path, index: int) -> dict:
    """One `fedtune simulate`, watched: peak tree memory, start-up, round times."""
    import psutil

    config = workdir / f"population-{registered}-{index}.toml"
    config.write_text(config_text(model, registered, rounds))
    out = workdir / f"population-{registered}-{index}"
    metrics = out / "metrics.jsonl"
    command = [sys.executable, "-m", "fedtune", "simulate", "--config", str(config), "--out", str(out),
               "--engine", "auto"]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "TQDM_DISABLE": "1"})
    watched, peak, first_record_at = psutil.Process(child.pid), 0, None
    while child.poll() is None:
        try:
            peak = max(peak, tree_rss(watched))
        except psutil.Error:
            pass
        if first_record_at is None and metrics.exists() and metrics.stat().st_size:
            first_record_at = time.perf_counter() - started
        time.sleep(0.05)
    wall = time.perf_counter() - started
    stderr = child.stderr.read() if child.stderr else ""
    if child.returncode != 0:
        sys.exit(f"{registered} registered: fedtune simulate failed:\n{stderr[-3000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    if len(records) != rounds or first_record_at is None:
        sys.exit(f"{registered} registered: {len(records)} of {rounds} rounds recorded; see {out}")
    return {"registered": registered, "process_seconds": round(wall, 2), "peak_memory_mb": round(peak / 2**20, 1),
            "startup_seconds": round(first_record_at - records[0]["seconds"], 2),
            "round_seconds": [round(r["seconds"] - r["evaluation_seconds"], 3) for r in records],
            "accuracy": [r.get("accuracy") for r in records]}


def summarize(runs: dict[int, list[dict]]) -> dict:
    base = min(runs)

    def median(registered: int, key) -> float:
        return statistics.median(key(r) for r in runs[registered])

    def peak(r):
        return r["peak_memory_mb"]

    def startup(r):
        return r["startup_seconds"]

    def steady(r):
        return statistics.mean(r["round_seconds"][1:])

    rows = [{"registered": n, "peak_memory_mb": round(median(n, peak), 1),
             "memory_over_smallest": round(median(n, peak) / median(base, peak), 3),
             "startup_seconds": round(median(n, startup), 2),
             "startup_over_smallest": round(median(n, startup) / median(base, startup), 3),
             "round_seconds_steady": round(median(n, steady), 3),
             "round_over_smallest": round(median(n, steady) / median(base, steady), 3),
             "process_seconds": round(median(n, lambda r: r["process_seconds"]), 2)} for n in sorted(runs)]
    return {"by_registered": rows, "largest_memory_over_smallest": rows[-1]["memory_over_smallest"],
            "largest_startup_over_smallest": rows[-1]["startup_over_smallest"],
            "largest_round_over_smallest": rows[-1]["round_over_smallest"]}


def measure(populations=POPULATIONS, repeats: int = 1, rounds: int = ROUNDS, log=print) -> dict:
    from fedtune.system.machine import machine

    runs: dict[int, list[dict]] = {n: [] for n in populations}
    with tempfile.TemporaryDirectory(prefix="fedtune-population-") as tmp:
        model = tiny_model(Path(tmp) / "tiny-bert")
        for repeat in range(repeats):
            for index, registered in enumerate(populations if repeat % 2 == 0 else populations[::-1]):
                log(f"[population] {registered:,} registered, {PER_ROUND} a round, {rounds} rounds ...")
                result = run(model, registered, rounds, Path(tmp), repeat * 100 + index)
                log(f"  peak {result['peak_memory_mb']} MiB, start-up {result['startup_seconds']} s, "
                    f"rounds {result['round_seconds']}")
                runs[registered].append(result)
    return {"benchmark": "population", "machine": machine(),
            "workload": {"dataset": "tweets", "model": "random-init BERT (2 layers, hidden 32) + LoRA r8",
                         "partitioner": "sampled", "rows_per_client": ROWS_PER_CLIENT, "clients_per_round": PER_ROUND,
                         "rounds": rounds, "repeats": repeats, "dp_epsilon": 8.0, "held_out": HELD_OUT,
                         "engine": "auto (in-process on this host)"},
            "summary": summarize(runs), "runs": {str(n): r for n, r in runs.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="runs per population, in ABBA order")
    parser.add_argument("--populations", default=",".join(str(n) for n in POPULATIONS),
                        help="registered clients, comma-separated (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args()
    try:
        populations = tuple(int(n) for n in args.populations.split(","))
    except ValueError:
        sys.exit(f"--populations = {args.populations!r}: expected whole numbers separated by commas")
    if args.rounds < 2 or args.repeats < 1 or not populations or min(populations) < PER_ROUND:
        sys.exit(f"--rounds >= 2, --repeats >= 1 and populations of at least {PER_ROUND} expected")
    report = measure(populations, args.repeats, args.rounds)
    print(json.dumps({"machine": report["machine"], "summary": report["summary"]}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
