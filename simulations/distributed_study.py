"""Small sites under DP: local DP-SGD, distributed DP, and the pooled references, on the
same rows, tuned on validation rows, scored once on held-out test rows.

    python -m simulations.distributed_study [--max-minutes M] [--seeds 0,1,2] [--epsilons 3,1]
    python -m simulations.distributed_study --report-only      # docs/results-distributed.md from the records

Every cell writes one compact record (resolved config, versions, machine, seed, the
learning rate chosen, accuracy per round, each node's ledger summary, wall time) under
`docs/results/records/distributed/`; the report is generated from those records alone, so
a fresh clone regenerates it in seconds.

The splits, fixed for every cell and seed: the dataset's rows -> 15% held-out test rows
(seed 1) -> of the rest, 15% validation rows (seed 2) -> the pool. Each seed draws its
clients' rows (`simulation.rows_per_client`) from the pool with its own seed. Tuning runs
(seed 0) score on the validation rows; each method's learning rate is the best there;
the reported cells (seeds 0, 1, 2) score on the test rows, touched once per cell.

Methods, at 10 sites x 100 rows, epsilon 8 per site:
* local DP: each site runs DP-SGD on its rows (the recipe of docs/results.md), FedAvg;
* distributed DP: one DP-SGD step per round over the union of the sites' Poisson batches,
  each site adding its share of the noise inside SecAgg+ (t = 8 of 10, threshold 0.8);
* central DP-SGD on the pooled 1,000 rows (a trusted curator: the reference distributed DP
  aims at), the same number of steps and expected batch;
* non-private, pooled.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from fedtune.system.atomic import atomic_write_text
from fedtune.config import Config, build_config
from simulations.records import (client_ledgers, majority_accuracy, mean_sd, read_records, three_splits, write_csv,
                                 write_record)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "docs" / "results" / "records" / "distributed"
REPORT = ROOT / "docs" / "results-distributed.md"
WORK = Path("runs/distributed-study")
DATASET, SITES, ROWS, EPSILON = "bbc-news", 10, 100, 8.0

COMMON = {"model": {"max_seq_len": 32}, "lora": {"rank": 4, "top_layers": 1}, "data": {"dataset": DATASET}}

# method -> (learning rates tuned on validation rows, config sections)
METHODS: dict[str, tuple[tuple[float, ...], dict]] = {
    "local": ((0.01, 0.03, 0.1), {
        "training": {"rounds": 5, "epochs": 1, "batch_size": 12},
        "dp": {"accountant": "pld", "target_epsilon": EPSILON, "max_grad_norm": 1.0},
        "federation": {"server_optimizer": "fedavg"}}),
    "distributed": ((0.01, 0.03, 0.1), {
        "training": {"rounds": 50, "epochs": 1, "batch_size": 20},
        "dp": {"mode": "distributed", "target_epsilon": EPSILON, "max_grad_norm": 1.0},
        "federation": {"secure_aggregation": True, "secagg_threshold": 0.8, "min_clients": 8,
                       "server_optimizer": "fedadam"},
        "node": {"distributed_min_contributors": 8}}),
    "central-dp": ((0.003, 0.01, 0.03), {
        "training": {"rounds": 1, "epochs": 10, "batch_size": 200},
        "dp": {"accountant": "pld", "target_epsilon": EPSILON, "max_grad_norm": 1.0}}),
    "non-private": ((0.001, 0.003, 0.01), {
        "training": {"rounds": 1, "epochs": 5, "batch_size": 32},
        "dp": {"enabled": False}}),
}
FEDERATED = ("local", "distributed")
PRIVATE = ("distributed", "local", "central-dp")


def splits(work: Path) -> dict[str, Path]:
    """pool.csv, validation.csv, test.csv: the same for every cell."""
    return three_splits(DATASET, work)


def _config(method: str, rate: float, seed: int, data: Path, evaluation: Path, budget: Path,
            epsilon: float = EPSILON) -> Config:
    sections = json.loads(json.dumps(COMMON))
    for name, values in METHODS[method][1].items():
        sections.setdefault(name, {}).update(values)
    if sections.get("dp", {}).get("enabled", True):
        sections["dp"]["target_epsilon"] = epsilon
    sections["data"] = {"path": str(data)}
    sections.setdefault("training", {}).update({"seed": seed, "learning_rate": rate})
    sections.setdefault("node", {})["budget_dir"] = str(budget)
    if method in FEDERATED:
        fed = sections.setdefault("federation", {})
        fed.update({"clients_per_round": SITES, "central_eval_path": str(evaluation)})
        sections.setdefault("simulation", {}).update({"num_clients": SITES, "rows_per_client": ROWS})
        fed.setdefault("min_clients", SITES)
        if method == "distributed":  # the server's Adam steps on the decoded gradient
            fed["server_learning_rate"] = rate
    else:
        sections["data"]["eval_path"] = str(evaluation)
    return build_config(sections, source=f"distributed study: {method}")


def _pooled(config: Config, paths: dict[str, Path], seed: int, work: Path) -> Path:
    """The union of the sites' rows of this seed: what a trusted curator would pool."""
    from simulations.partition import training_pool

    federated = _config("local", 0.01, seed, paths["pool"], paths["validation"], work / "unused")
    return write_csv(work / "data" / f"pooled-seed{seed}.csv", training_pool(federated))


def _name(method: str, rate: float, seed: int, split: str, epsilon: float) -> str:
    suffix = "" if epsilon == EPSILON else f"-eps{epsilon:g}"
    return f"{method}-lr{rate:g}-seed{seed}-{split}{suffix}"


def run_cell(method: str, rate: float, seed: int, split: str, paths: dict[str, Path], work: Path, log,
             epsilon: float = EPSILON) -> dict:
    """One run; returns its compact record."""
    folder = work / _name(method, rate, seed, split, epsilon)
    evaluation = paths["validation" if split == "validation" else "test"]
    started = time.perf_counter()
    if method in FEDERATED:
        from simulations.run import simulate

        config = _config(method, rate, seed, paths["pool"], evaluation, folder / "budgets", epsilon)
        simulate(config, folder, engine="in-process", log=lambda line: None)
        rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        accuracy = [r.get("accuracy") for r in rounds]
        ledgers = client_ledgers(folder)
    else:
        from fedtune.training.local import prepare_node, train_local

        data = _pooled(None, paths, seed, work)
        config = _config(method, rate, seed, data, evaluation, folder / "budgets", epsilon)
        node = prepare_node(config)
        train_local(node, folder, echo=lambda line: None, progress=False)
        rounds = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        accuracy = [r.get("val_accuracy") for r in rounds]
        ledger = json.loads((folder / "ledger.json").read_text())
        ledgers = [{"epsilon": ledger["epsilon"], "delta": ledger["delta"], "history": ledger["history"]}]
    record = {"method": method, "dataset": DATASET, "sites": SITES, "rows_per_site": ROWS, "epsilon": epsilon,
              "seed": seed, "split": split, "learning_rate": rate, "accuracy": accuracy[-1], "accuracy_by_round": accuracy,
              "majority_accuracy": majority_accuracy(evaluation), "ledgers": ledgers,
              "seconds": round(time.perf_counter() - started, 1), "config": config.to_toml()}
    write_record(RECORDS, _name(method, rate, seed, split, epsilon), record)
    log(f"{method} lr {rate:g} seed {seed} epsilon {epsilon:g} ({split}): accuracy {accuracy[-1]:.4f} in {record['seconds']:.0f} s")
    return record


def _records() -> list[dict]:
    return read_records(RECORDS)


def chosen_rate(method: str, records: list[dict]) -> float | None:
    """The learning rate with the best validation accuracy (seed 0), None before tuning ran."""
    tuned = [r for r in records if r["method"] == method and r["split"] == "validation" and r["epsilon"] == EPSILON]
    if len(tuned) < len(METHODS[method][0]):
        return None
    return max(tuned, key=lambda r: (r["accuracy"], -r["learning_rate"]))["learning_rate"]


def run(seeds: tuple[int, ...], max_minutes: float, log=print, epsilons: tuple[float, ...] = (),
        epsilon_seeds: tuple[int, ...] = (0,)) -> None:
    """Breadth-first: tune every method (seed 0, validation rows, epsilon 8), then each
    method's test cell at seed 0, then the other seeds, then the private methods at the
    other `epsilons` (learning rates as chosen at epsilon 8); records already written are kept."""
    deadline = time.monotonic() + max_minutes * 60
    paths = splits(WORK)
    done = {(r["method"], r["learning_rate"], r["seed"], r["split"], r["epsilon"]) for r in _records()}
    plan = [(m, rate, 0, "validation", EPSILON) for m in METHODS for rate in METHODS[m][0]]
    plan += [(m, None, seed, "test", EPSILON) for seed in seeds for m in METHODS]
    plan += [(m, None, seed, "test", eps) for eps in epsilons for seed in epsilon_seeds for m in PRIVATE]
    for method, rate, seed, split, epsilon in plan:
        if time.monotonic() > deadline:
            log("time is up: the report shows what ran")
            break
        rate = rate if rate is not None else chosen_rate(method, _records())
        if rate is None or (method, rate, seed, split, epsilon) in done:
            continue
        run_cell(method, rate, seed, split, paths, WORK, log, epsilon)


# -- the report -------------------------------------------------------------------------------

def report(records: list[dict]) -> str:
    majority = _majority_line(records)
    lines = ["# Small sites under DP: local, distributed and pooled", "",
             "Generated by `python -m simulations.distributed_study --report-only` from the records in "
             "`docs/results/records/distributed/` (one JSON file per run). Do not edit by hand.", "",
             f"BBC News, {SITES} sites x {ROWS} rows, epsilon {EPSILON:g} per site (record level), all-MiniLM-L6-v2 with "
             "LoRA rank 4 on the last block, sequence 32. Splits fixed for every cell: 15% of the articles are the "
             "held-out test rows, 15% of the rest the validation rows; each seed draws its sites' rows from the rest. "
             "Learning rates were chosen on the validation rows (seed 0); every reported cell is scored once on the "
             f"test rows. {majority}", "",
             "| method | learning rate (chosen on validation) | test accuracy, mean ± sd over seeds | seeds |",
             "|---|---|---|---|"]
    for method in METHODS:
        rate = chosen_rate(method, records)
        cells = [r for r in records if r["method"] == method and r["split"] == "test" and r["learning_rate"] == rate
                 and r["epsilon"] == EPSILON]
        seeds = ", ".join(str(r["seed"]) for r in sorted(cells, key=lambda r: r["seed"])) or "-"
        lines.append(f"| {DESCRIPTIONS[method]} | {rate if rate is not None else 'not tuned yet'} | "
                     f"{mean_sd([r['accuracy'] for r in cells])} | {seeds} |")
    lower = sorted({r["epsilon"] for r in records if r["epsilon"] != EPSILON}, reverse=True)
    if lower:
        lines += ["", "## Smaller epsilon", "", f"The same cells at a smaller epsilon per site, with the learning rates "
                  f"chosen at epsilon {EPSILON:g} on the validation rows (no tuning at these epsilons).", "",
                  "| method | " + " | ".join(f"epsilon {e:g}" for e in lower) + " |", "|---|" + "---|" * len(lower)]
        for method in PRIVATE:
            rate = chosen_rate(method, records)
            row = [mean_sd([r["accuracy"] for r in records if r["method"] == method and r["split"] == "test"
                             and r["epsilon"] == e and r["learning_rate"] == rate]) for e in lower]
            lines.append(f"| {DESCRIPTIONS[method]} | " + " | ".join(row) + " |")
    lines += ["", "## Tuning (validation rows, seed 0)", "", "| method | learning rate | validation accuracy |",
              "|---|---|---|"]
    for r in sorted((r for r in records if r["split"] == "validation" and r["epsilon"] == EPSILON),
                    key=lambda r: (r["method"], r["learning_rate"])):
        lines.append(f"| {r['method']} | {r['learning_rate']:g} | {r['accuracy']:.3f} |")
    lines += ["", "## Privacy of the distributed cells", ""]
    for r in sorted((r for r in records if r["method"] == "distributed" and r["split"] == "test"),
                    key=lambda r: (-r["epsilon"], r["seed"])):
        eps = [ledger["epsilon"] for ledger in r["ledgers"]]
        entry = r["ledgers"][0].get("distributed") or [[math.nan] * 5]
        z, _, dim, q, steps = entry[0]
        lines.append(f"- epsilon {r['epsilon']:g}, seed {r['seed']}: {len(eps)} site ledgers, largest epsilon {max(eps):.3f} at delta "
                     f"{r['ledgers'][0]['delta']:.3g}; noise multiplier {z:g} over the rounded sensitivity, "
                     f"q = {q:g}, {steps} steps, dimension {dim} (each recomputed by "
                     "`fedtune.privacy.ddgauss_accounting.epsilon` from these values)")
    lines += ["", "## Not run", "", "Rotten-tomatoes, 400 rows per site, three seeds at the smaller epsilons, and the "
              "instruction task (SmolLM2) with distributed DP: the CPU time of this machine went to the cells above "
              "first.", ""]
    return "\n".join(lines)


DESCRIPTIONS = {"local": "federated, record-level DP-SGD at each site (local DP)",
                "distributed": "federated, distributed DP (SecAgg+, t = 8 of 10)",
                "central-dp": "central DP-SGD on the pooled rows (trusted curator)",
                "non-private": "non-private, pooled rows"}


def _majority_line(records: list[dict]) -> str:
    test = [r["majority_accuracy"] for r in records if r["split"] == "test"]
    return f"Always answering the majority class scores {test[0]:.3f} on the test rows." if test else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.distributed_study", description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="regenerate the report from the committed records")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the reported cells (default 0,1,2)")
    parser.add_argument("--max-minutes", type=float, default=600.0, help="stop starting new cells after this long")
    parser.add_argument("--epsilons", default="", help="smaller epsilons to run the private methods at, e.g. 3,1")
    parser.add_argument("--epsilon-seeds", default="0", help="seeds of those cells (default 0)")
    args = parser.parse_args(argv)
    if not args.report_only:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
            epsilon_seeds = tuple(int(s) for s in args.epsilon_seeds.split(",") if s.strip())
            epsilons = tuple(float(e) for e in args.epsilons.split(",") if e.strip())
        except ValueError:
            print(f"--seeds {args.seeds!r}, --epsilon-seeds {args.epsilon_seeds!r}, --epsilons {args.epsilons!r}: "
                  "expected numbers separated by commas", file=sys.stderr)
            return 2
        run(seeds, args.max_minutes, log=lambda line: print(line, flush=True), epsilons=epsilons,
            epsilon_seeds=epsilon_seeds)
    atomic_write_text(REPORT, report(_records()))
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
