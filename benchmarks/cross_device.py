"""Cross-device simulation: many small clients, a few per round, measured side by side.

The workload: tweets, 1,000 registered clients of 20 rows each, 10 sampled per round,
all-MiniLM-L6-v2 + LoRA r8, DP-SGD at epsilon 8 per client, batch 8, sequence 32,
central evaluation on 300 held-out tweets. At this shape a client trains for a fraction of
a second (3 Poisson batches), so what a simulator pays per client call decides the round:
messaging, scheduling, the partition lookup, and above all whether the base model is
loaded again for every call.

Variants, each `fedtune simulate` in its own process, same seed (same clients, same
Poisson batches), repeated in ABBA order:

  fedtune      the default: `--engine auto` (here in-process: one client at a time), one
               base model kept per worker, adapters swapped in
  fedtune-ray  the same on Flower's Ray backend (`--engine ray`)
  flowertune   the FlowerTune template's pattern: Ray, and a fresh base model and
               tokenizer in every ClientApp call (FEDTUNE_RELOAD_MODEL_EVERY_CALL=1)
  cohort-N     fedtune with N clients per round (round time vs cohort size)
  registered-N fedtune with N registered clients (round time vs population)

Reported: round time without evaluation (rounds 2+; round 1 pays start-up), whole-process
wall time, and the ratios flowertune / fedtune (goal >= 2) and fedtune-ray / fedtune.

    python benchmarks/cross_device.py [--rounds 4] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fedtune.system.machine import machine  # noqa: E402
from simulate_runs import abba, rounds_main, run_simulate  # noqa: E402

ROWS_PER_CLIENT = 20
HELD_OUT = 300


@dataclass(frozen=True)
class Variant:
    name: str
    registered: int = 1000
    per_round: int = 10
    engine: str = "auto"
    env: tuple = ()


def variants(cohorts=(5, 20), populations=(10, 100)) -> list[Variant]:
    return ([Variant("fedtune"), Variant("fedtune-ray", engine="ray"),
             Variant("flowertune", engine="ray", env=(("FEDTUNE_RELOAD_MODEL_EVERY_CALL", "1"),))]
            + [Variant(f"cohort-{n}", per_round=n) for n in cohorts]
            + [Variant(f"registered-{n}", registered=n) for n in populations])


def _config(variant: Variant, rounds: int) -> str:
    rows = variant.registered * ROWS_PER_CLIENT + 100  # a margin: rows_per_client cuts the pool to size
    return f"""
[data]
dataset = "tweets"
max_examples = {rows + HELD_OUT}
[model]
max_seq_len = 32
[training]
rounds = {rounds}
epochs = 1
batch_size = 8
learning_rate = 0.01
[dp]
target_epsilon = 8.0
noise_seed = 0  # reproducible noise (benchmark only): the same batches in every variant
[federation]
clients_per_round = {variant.per_round}
min_clients = {variant.per_round}
[simulation]
num_clients = {variant.registered}
rows_per_client = {ROWS_PER_CLIENT}
central_holdout = {HELD_OUT / (rows + HELD_OUT):.6f}
"""


def run(variant: Variant, rounds: int, workdir: Path, index: int) -> dict:
    wall, records = run_simulate(variant.name, _config(variant, rounds), rounds, workdir, index, variant.engine,
                                 variant.env)
    return {"name": variant.name, "registered": variant.registered, "per_round": variant.per_round,
            "engine": variant.engine, "process_seconds": round(wall, 2),
            "round_seconds": [round(r["seconds"] - r["evaluation_seconds"], 3) for r in records],
            "train_seconds_sum": [r["train_seconds_sum"] for r in records],
            "accuracy": [r["accuracy"] for r in records]}


def summarize(runs: dict[str, list[dict]]) -> dict:
    def steady(name: str) -> float:
        return statistics.median(statistics.mean(r["round_seconds"][1:]) for r in runs[name])

    def wall(name: str) -> float:
        return statistics.median(r["process_seconds"] for r in runs[name])

    base = steady("fedtune")
    cohort_rows = sorted([(r["per_round"], name) for name, rs in runs.items() for r in rs[:1]
                          if name == "fedtune" or name.startswith("cohort-")])
    population_rows = sorted([(r["registered"], name) for name, rs in runs.items() for r in rs[:1]
                              if name == "fedtune" or name.startswith("registered-")])
    return {
        "round_seconds_steady": {name: round(steady(name), 3) for name in runs},
        "process_seconds": {name: round(wall(name), 2) for name in runs},
        "flowertune_over_fedtune_round": round(steady("flowertune") / base, 3),
        "flowertune_over_fedtune_process": round(wall("flowertune") / wall("fedtune"), 3),
        "ray_over_in_process_round": round(steady("fedtune-ray") / base, 3),
        "by_cohort": [{"clients_per_round": n, "round_seconds": round(steady(name), 3),
                       "seconds_per_client": round(steady(name) / n, 3)} for n, name in cohort_rows],
        "by_registered": [{"registered": n, "round_seconds": round(steady(name), 3)} for n, name in population_rows],
        "final_accuracy": {name: [r["accuracy"][-1] for r in rs] for name, rs in runs.items()},
    }


def measure(rounds: int = 4, repeats: int = 1, plan: list[Variant] | None = None, log=print) -> dict:
    """Every variant once per repeat, in reversed order on odd repeats (ABBA)."""
    if rounds < 2:
        raise ValueError("rounds: at least 2 (round 1 is warm-up)")
    plan = plan or variants()
    runs = abba(plan, repeats, lambda variant, workdir, index: run(variant, rounds, workdir, index),
                lambda v: f"[cross-device] {v.name} ({v.registered} registered, {v.per_round} per round, engine {v.engine}) ...",
                log)
    return {"benchmark": "cross_device", "machine": machine(),
            "workload": {"dataset": "tweets", "model": "all-MiniLM-L6-v2 + LoRA r8", "registered": 1000,
                         "rows_per_client": ROWS_PER_CLIENT, "clients_per_round": 10, "rounds": rounds,
                         "repeats": repeats, "dp_epsilon": 8.0, "max_seq_len": 32, "batch_size": 8,
                         "held_out": HELD_OUT},
            "summary": summarize(runs), "runs": runs}


def main() -> None:
    rounds_main(__doc__, measure)


if __name__ == "__main__":
    main()
