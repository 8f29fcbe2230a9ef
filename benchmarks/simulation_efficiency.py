"""Simulation efficiency of `fedtune simulate`, measured side by side in one run.

Three simulations of the same workload (tweets, all-MiniLM-L6-v2 + LoRA, DP-SGD at
epsilon 8, 10 clients sampled per round, 35 rows per client, same seed, so the same
clients and the same Poisson batches), each `fedtune simulate` in its own process:

  fedtune      the real thing (`--engine auto`: here one client at a time in-process), one
               base model per worker, adapters swapped in
  reload       the FlowerTune pattern: Flower's Ray backend and a fresh base model in every
               ClientApp call (FEDTUNE_RELOAD_MODEL_EVERY_CALL=1), everything else identical
  fedtune-1000 the fedtune run with 1,000 registered clients instead of 10
  ffa          the fedtune run with FFA-LoRA (A frozen, so A never travels)
  cohort-N     the fedtune run with N clients per round (scale: round time vs cohort)

Reported (issue 4's goals in brackets):
  (a) round wall time without evaluation / summed bare local training time of the round's
      clients (the DP-SGD steps only, timed inside each client)  [<= 1.15]
  (b) reload round time / fedtune round time: the speed-up over the FlowerTune pattern
  (c) peak resident memory (server + Ray workers) with 1,000 vs 10 registered clients [<= 1.1]
  (d) communication: bytes per client per round (each direction, from the Flower messages
      the server actually sent and received) / full-model bytes, LoRA and FFA-LoRA
  (e) round time per client at each cohort size, relative to the 10-client cohort [~1]

Clients run one at a time (Ray CPUs per client = all cores), so (a) is pure overhead and
not hidden by parallelism. Round 1 (Ray start, first model load) is reported separately.

    python benchmarks/simulation_efficiency.py [--rounds 4] [--repeats 1] [--json docs/simulation_efficiency.json]
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

ROWS_PER_CLIENT = 35
PER_ROUND = 10


@dataclass(frozen=True)
class Variant:
    name: str
    registered: int = PER_ROUND
    per_round: int = PER_ROUND
    ffa: bool = False
    env: tuple = ()
    engine: str = "auto"


def variants(cohorts: tuple[int, ...]) -> list[Variant]:
    return [Variant("fedtune"), Variant("reload", env=(("FEDTUNE_RELOAD_MODEL_EVERY_CALL", "1"),), engine="ray"),
            Variant("fedtune-1000", registered=1000), Variant("ffa", ffa=True)] + [
            Variant(f"cohort-{n}", registered=n, per_round=n) for n in cohorts if n != PER_ROUND]


def _config(variant: Variant, rounds: int) -> str:
    return f"""
[data]
dataset = "tweets"
max_examples = {variant.registered * ROWS_PER_CLIENT}
[model]
max_seq_len = 64
[lora]
ffa = {str(variant.ffa).lower()}
[training]
rounds = {rounds}
epochs = 1
batch_size = 8
learning_rate = 0.01
[dp]
target_epsilon = 8.0
noise_seed = 0  # reproducible noise (not for production): the same batches and cohorts in every variant
[federation]
clients_per_round = {variant.per_round}
min_clients = {variant.per_round}
[simulation]
num_clients = {variant.registered}
"""


def run(variant: Variant, rounds: int, workdir: Path, index: int) -> dict:
    wall, records = run_simulate(variant.name, _config(variant, rounds), rounds, workdir, index, variant.engine,
                                 variant.env)
    return {"name": variant.name, "registered": variant.registered, "per_round": variant.per_round,
            "process_seconds": round(wall, 1), "rounds": records}


def _round_seconds(record: dict) -> float:
    return record["seconds"] - record["evaluation_seconds"]


def full_model_bytes() -> int:
    """What full fine-tuning would exchange per direction: every base-model parameter, fp32."""
    from fedtune.config import ModelConfig
    from fedtune.models.base import load_base_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(ModelConfig())
    model = load_base_model(path, "classification", 3, load_tokenizer(path).pad_token_id)
    return sum(p.numel() * 4 for p in model.parameters())


def _bytes_per_client(run: dict) -> dict:
    records = run["rounds"]
    clients = [len(r["clients_accepted"]) + len(r["clients_rejected"]) for r in records]
    return {"down": statistics.mean(r["bytes_sent"] / run["per_round"] for r in records),
            "up": statistics.mean(r["bytes_received"] / max(n, 1) for r, n in zip(records, clients))}


def summarize(runs: dict[str, list[dict]], model_bytes: int) -> dict:
    steady = slice(1, None)  # rounds 2.. (round 1 includes Ray start and the first model load)

    def median_over_repeats(name: str, value) -> float:
        return statistics.median(value(run) for run in runs[name])

    def steady_round(run: dict) -> float:
        return statistics.mean(_round_seconds(r) for r in run["rounds"][steady])

    def overhead(run: dict) -> float:
        return statistics.mean(_round_seconds(r) / r["train_seconds_sum"] for r in run["rounds"][steady])

    def peak(run: dict) -> float:
        return max(r["resident_mb"] for r in run["rounds"])

    fed_round = median_over_repeats("fedtune", steady_round)
    per_client = {name: median_over_repeats(name, steady_round) / runs[name][0]["per_round"]
                  for name in runs if name == "fedtune" or name.startswith("cohort-")}
    communication = {}
    for name, label in (("fedtune", "lora"), ("ffa", "ffa_lora")):
        moved = _bytes_per_client(runs[name][0])
        communication[label] = {"down_bytes": round(moved["down"]), "up_bytes": round(moved["up"]),
                                "down_over_full_model": moved["down"] / model_bytes,
                                "up_over_full_model": moved["up"] / model_bytes}
    return {
        "a_round_over_bare_training": round(median_over_repeats("fedtune", overhead), 3),
        "a_round1_over_bare_training": round(median_over_repeats(
            "fedtune", lambda r: _round_seconds(r["rounds"][0]) / r["rounds"][0]["train_seconds_sum"]), 3),
        "b_reload_over_fedtune": round(median_over_repeats("reload", steady_round) / fed_round, 3),
        "c_peak_memory_1000_over_10": round(median_over_repeats("fedtune-1000", peak) / median_over_repeats("fedtune", peak), 3),
        "d_communication": {"full_model_bytes": model_bytes, **communication},
        "e_round_seconds_per_client": {name: round(v, 3) for name, v in sorted(per_client.items())},
        "e_per_client_relative_to_cohort_10": {name: round(v / per_client["fedtune"], 3) for name, v in sorted(per_client.items())},
        "peak_memory_mb": {name: median_over_repeats(name, peak) for name in runs},
        "mean_round_seconds_steady": {name: round(median_over_repeats(name, steady_round), 2) for name in runs},
    }


def measure(rounds: int = 4, repeats: int = 1, cohorts: tuple[int, ...] = (5, 20), log=print) -> dict:
    """Every variant once per repeat, in reversed order on odd repeats (ABBA), then the ratios."""
    if rounds < 2:
        raise ValueError("rounds: at least 2 (round 1 is warm-up)")
    plan = variants(cohorts)
    runs = abba(plan, repeats, lambda variant, workdir, index: run(variant, rounds, workdir, index),
                lambda v: f"[simulation] {v.name} ({v.registered} registered, {v.per_round} per round, {rounds} rounds) ...",
                log)
    summary = summarize(runs, full_model_bytes())
    return {"benchmark": "simulation_efficiency", "machine": machine(),
            "workload": {"dataset": "tweets", "model": "all-MiniLM-L6-v2 + LoRA r8", "rows_per_client": ROWS_PER_CLIENT,
                         "clients_per_round": PER_ROUND, "rounds": rounds, "repeats": repeats, "dp_epsilon": 8.0,
                         "max_seq_len": 64, "batch_size": 8},
            "summary": summary, "runs": runs}


def main() -> None:
    rounds_main(__doc__, lambda rounds, repeats: measure(rounds, repeats))


if __name__ == "__main__":
    main()
