"""Where DP works: the runs behind `docs/results.md`, tuned on validation rows, scored once on test rows.

    python -m simulations.results [--max-minutes M] [--stage tune|bar|table|curve]
    python -m simulations.results --report-only      # docs/results.md and its figures from the records

Every run writes one compact record under `docs/results/records/results/` (resolved config,
versions, machine, seed, accuracy after every round, each node's ledger summary, wall
time); the report and its figures are generated from those records alone.

Three splits per dataset (`simulations.records.three_splits`): 15% held-out test rows, then
validation rows, then the pool each seed draws its clients' rows from. Rotten-tomatoes
keeps 8% of the rest for validation (871 rows) so that the pool still holds the table's
10 x 1,000 rows.

What is chosen on the validation rows (seed 0), never on the test rows:
* the federated recipe (`RECIPES`, at the table's shape: 10 IID clients x 1,000 rows,
  epsilon 8), by the accuracy after its last round;
* the centralized non-private reference's learning rate and epochs (per-epoch validation
  accuracy of `REFERENCE_RATES`).

Then, scored on the test rows: the bar (federated epsilon 8 against the reference, seeds 0,
1, 2), the table's other budgets and Dirichlet(0.3) clients, and the data-per-client curve
(5 clients, 100 / 400 / 1,600 rows, two datasets). Cells run breadth-first, so a session cut
short leaves a complete picture at seed 0 and marks what did not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fedtune.system.atomic import atomic_write_text
from fedtune.config import Config, build_config
from fedtune.errors import ConfigError, FedtuneError
from simulations.records import (MIN_SEEDS, RECORDS, client_ledgers, majority_accuracy, mean_sd, metrics_rows,
                                 read_records, three_splits, write_csv, write_record)

ROOT = Path(__file__).resolve().parents[1]
RECORD_DIR = RECORDS / "results"
REPORT = ROOT / "docs" / "results.md"
FIGURES = ROOT / "docs" / "results"
WORK = Path("runs/results")
EPSILONS = (math.inf, 8.0, 3.0, 1.0)
SEEDS = (0, 1, 2)
BAR = 0.95

COMMON = {"model": {"max_seq_len": 32}, "lora": {"rank": 4, "top_layers": 1},
          "dp": {"accountant": "pld", "max_grad_norm": 1.0}}

# Candidate federated recipes, compared on validation rows at the table's shape (epsilon 8).
# The previous report's recipe ran 5 rounds and its probe was still climbing at 10, so every
# candidate runs 10: AdamW at the clients as before, and the lever it had not tried that
# this machine could afford, Adam on the server over the DP average. (A larger expected
# batch in physical chunks, a warm-started head and more rounds still were not tried: each
# candidate costs about 12 min of this 2-core machine, each test cell as much again.)
RECIPES: dict[str, tuple[str, dict]] = {
    "r10-lr0.03": ("10 rounds, AdamW lr 0.03, batch 64",
                   {"training": {"rounds": 10, "epochs": 1, "batch_size": 64, "learning_rate": 0.03}}),
    "r10-lr0.03-fedadam": ("10 rounds, AdamW lr 0.03, batch 64, server Adam lr 0.03 on the average",
                           {"training": {"rounds": 10, "epochs": 1, "batch_size": 64, "learning_rate": 0.03},
                            "federation": {"server_optimizer": "fedadam", "server_learning_rate": 0.03}}),
}
REFERENCE_RATES = (0.001, 0.003)  # the previous report's best two; each run costs about 20 min here
REFERENCE_EPOCHS = 3
REFERENCE_LORA = {"rank": 8, "top_layers": 0}  # plain LoRA on every block: the best model without DP's constraints
MIN_STEPS_PER_EPOCH, MIN_BATCH = 8, 8  # a small client gets a smaller batch, not one or two steps an epoch


@dataclass(frozen=True)
class Shape:
    """A dataset split among clients: what a cell's rows look like."""

    dataset: str
    clients: int
    rows: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-c{self.clients}-n{self.rows}"


TABLE = Shape("rotten-tomatoes", 10, 1000)
CURVE_ROWS = (100, 400, 1600)
CURVE = [Shape(d, 5, n) for d in ("rotten-tomatoes", "tweets") for n in CURVE_ROWS]
SPLITS = {"rotten-tomatoes": {"validation_fraction": 0.08},
          "tweets": {"validation_fraction": 0.15, "max_examples": 12_000}}  # 12,000 tweets: a test set as large


@dataclass(frozen=True)
class Cell:
    """One run: a federated cell (a recipe at a shape, epsilon, partition and seed) or the
    centralized reference (`recipe` = "reference-lr<rate>", epsilon inf)."""

    shape: Shape
    recipe: str
    epsilon: float
    partition: str
    seed: int
    split: str  # "validation" (tuning) or "test" (reported)
    epochs: int = 0  # the reference's epochs (0 = REFERENCE_EPOCHS)

    @property
    def reference(self) -> bool:
        return self.recipe.startswith("reference-")

    @property
    def name(self) -> str:
        eps = "nodp" if math.isinf(self.epsilon) else f"eps{self.epsilon:g}"
        epochs = f"-e{self.epochs}" if self.epochs else ""
        return f"{self.shape.name}-{self.recipe}{epochs}-{eps}-{self.partition}-seed{self.seed}-{self.split}"


def splits(dataset: str) -> dict[str, Path]:
    return three_splits(dataset, WORK / dataset, unseen_test=True, **SPLITS[dataset])


def federated_config(cell: Cell, data: Path, evaluation: Path, budget: Path) -> Config:
    sections = json.loads(json.dumps(COMMON))
    for name, values in RECIPES[cell.recipe][1].items():
        sections.setdefault(name, {}).update(values)
    training = sections["training"]
    training["batch_size"] = min(training["batch_size"], max(MIN_BATCH, cell.shape.rows // MIN_STEPS_PER_EPOCH))
    training["seed"] = cell.seed
    sections["dp"].update({"enabled": math.isfinite(cell.epsilon)}
                          | ({"target_epsilon": cell.epsilon} if math.isfinite(cell.epsilon) else {}))
    partition = {"partitioner": "iid"} if cell.partition == "iid" else {
        "partitioner": "dirichlet", "dirichlet_alpha": float(cell.partition.split("-", 1)[1])}
    sections.setdefault("federation", {}).update({
        "clients_per_round": cell.shape.clients, "min_clients": max(1, cell.shape.clients - 2),
        "central_eval_path": str(evaluation)})
    sections.setdefault("simulation", {}).update({
        "num_clients": cell.shape.clients, "rows_per_client": cell.shape.rows, **partition})
    sections["data"] = {"path": str(data)}
    sections["node"] = {"budget_dir": str(budget)}
    return build_config(sections, source=f"results study: {cell.name}")


def reference_config(cell: Cell, data: Path, evaluation: Path, budget: Path) -> Config:
    rate = float(cell.recipe.removeprefix("reference-lr"))
    return build_config({"model": dict(COMMON["model"]), "lora": dict(REFERENCE_LORA), "dp": {"enabled": False},
                         "training": {"rounds": 1, "epochs": cell.epochs or REFERENCE_EPOCHS, "batch_size": 32,
                                      "learning_rate": rate, "seed": cell.seed},
                         "data": {"path": str(data), "eval_path": str(evaluation)},
                         "node": {"budget_dir": str(budget)}}, source=f"results study: {cell.name}")


def _pooled(cell: Cell, paths: dict[str, Path]) -> Path:
    """The union of the clients' rows of this seed at this shape: what pooling them would give."""
    from simulations.partition import training_pool

    target = WORK / cell.shape.dataset / "data" / f"pooled-{cell.shape.name}-seed{cell.seed}.csv"
    if target.exists():
        return target
    twin = dataclasses.replace(cell, recipe=next(iter(RECIPES)), epsilon=math.inf, partition="iid", epochs=0)
    return write_csv(target, training_pool(federated_config(twin, paths["pool"], paths["validation"], WORK / "unused")))


def _rows(path: Path) -> int:
    """Rows of a CSV split (a review may hold line breaks, so lines are not rows)."""
    import csv

    with open(path, encoding="utf-8", newline="") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def run_cell(cell: Cell, log=print) -> dict:
    """One run in this process; returns (and writes) its record."""
    paths = splits(cell.shape.dataset)
    folder = WORK / "runs" / cell.name
    evaluation = paths[cell.split]
    started = time.perf_counter()
    if cell.reference:
        from fedtune.training.local import prepare_node, train_local

        config = reference_config(cell, _pooled(cell, paths), evaluation, folder / "budgets")
        train_local(prepare_node(config), folder, echo=lambda line: None, progress=False)
        accuracy = [row.get("val_accuracy") for row in metrics_rows(folder)]
        ledgers = []
    else:
        from simulations.run import simulate

        config = federated_config(cell, paths["pool"], evaluation, folder / "budgets")
        simulate(config, folder, engine="in-process", log=lambda line: None)
        accuracy = [row.get("accuracy") for row in metrics_rows(folder)]
        ledgers = client_ledgers(folder)
    record = {"study": "results", "shape": dataclasses.asdict(cell.shape), "recipe": cell.recipe,
              "epsilon": None if math.isinf(cell.epsilon) else cell.epsilon, "partition": cell.partition,
              "seed": cell.seed, "split": cell.split, "epochs": cell.epochs, "accuracy": accuracy[-1],
              "accuracy_by_round": accuracy, "majority_accuracy": majority_accuracy(evaluation),
              "evaluation_rows": _rows(evaluation), "ledgers": ledgers,
              "seconds": round(time.perf_counter() - started, 1), "config": config.to_toml()}
    write_record(RECORD_DIR, cell.name, record)
    log(f"[results] {cell.name}: accuracy {accuracy[-1]:.4f} in {record['seconds']:.0f} s")
    return record


# -------------------------------------------------------------------- reading records


def _epsilon(record: dict) -> float:
    return math.inf if record["epsilon"] is None else float(record["epsilon"])


def _shape(record: dict) -> Shape:
    return Shape(**record["shape"])


def select(records: list[dict], **where) -> list[dict]:
    def matches(r: dict) -> bool:
        for key, value in where.items():
            got = {"shape": _shape(r), "epsilon": _epsilon(r)}.get(key, r.get(key))
            if got != value:
                return False
        return True

    return [r for r in records if matches(r)]


def chosen_recipe(records: list[dict]) -> str | None:
    """The candidate with the best validation accuracy at the table's shape (seed 0,
    epsilon 8, IID); None until every candidate ran."""
    tuned = [r for r in select(records, shape=TABLE, epsilon=8.0, partition="iid", seed=0, split="validation")
             if r["recipe"] in RECIPES]
    if {r["recipe"] for r in tuned} != set(RECIPES):
        return None
    order = list(RECIPES)
    return max(tuned, key=lambda r: (r["accuracy"], -order.index(r["recipe"])))["recipe"]  # a tie: the first listed


def chosen_reference(records: list[dict]) -> tuple[str, int] | None:
    """(recipe, epochs) of the reference with the best per-epoch validation accuracy; None
    until every learning rate ran."""
    tuned = [r for r in select(records, shape=TABLE, seed=0, split="validation") if r["recipe"].startswith("reference-")]
    if {r["recipe"] for r in tuned} != {f"reference-lr{rate:g}" for rate in REFERENCE_RATES}:
        return None
    order = [f"reference-lr{rate:g}" for rate in REFERENCE_RATES]
    best = max(((r["recipe"], epoch + 1, acc) for r in tuned for epoch, acc in enumerate(r["accuracy_by_round"])),
               key=lambda item: (item[2], -item[1], -order.index(item[0])))  # a tie: fewer epochs, then the first rate
    return best[0], best[1]


# -------------------------------------------------------------------- the plan


STAGES = ("tune", "bar", "table", "curve", "seeds")


def plan(records: list[dict], stage: str = "") -> list[Cell]:
    """What runs next, breadth first: the tuning on validation rows; the bar (reference and
    federated epsilon 8 at seeds 0, 1, 2, non-private federated at seed 0); the table's other
    budgets and Dirichlet(0.3) at seed 0; the curve at seed 0; then the remaining seeds.
    Cells that depend on a choice wait until it is made."""
    recipe, reference = chosen_recipe(records), chosen_reference(records)
    validation = [Cell(TABLE, r, 8.0, "iid", 0, "validation") for r in RECIPES]
    references = [Cell(TABLE, f"reference-lr{rate:g}", math.inf, "iid", 0, "validation") for rate in REFERENCE_RATES]
    stages: dict[str, list[Cell]] = {name: [] for name in STAGES}
    # the references first: once they are chosen, their test cells can run while the last
    # federated candidates are still being tuned
    stages["tune"] = [validation[0], *references, *validation[1:]]
    if reference:
        stages["bar"] += [Cell(TABLE, reference[0], math.inf, "iid", s, "test", reference[1]) for s in SEEDS]
    if recipe:
        stages["bar"] += [Cell(TABLE, recipe, 8.0, "iid", s, "test") for s in SEEDS]
        stages["bar"] = sorted(stages["bar"], key=lambda c: c.seed) + [Cell(TABLE, recipe, math.inf, "iid", 0, "test")]
        table = [Cell(TABLE, recipe, e, p, s, "test") for s in SEEDS for p in ("iid", "dirichlet-0.3") for e in EPSILONS]
        curve = [Cell(shape, recipe, e, "iid", s, "test") for s in SEEDS for shape in CURVE for e in EPSILONS]
        stages["table"] = [c for c in table if c.seed == 0 and c not in stages["bar"]]
        stages["curve"] = [c for c in curve if c.seed == 0]
        stages["seeds"] = [c for c in table + curve if c.seed != 0 and c not in stages["bar"]]
    order = [stage] if stage else list(STAGES)
    done = {r_name(r) for r in records}
    return [c for name in order for c in stages[name] if c.name not in done]


def r_name(record: dict) -> str:
    return Cell(_shape(record), record["recipe"], _epsilon(record), record["partition"], record["seed"],
                record["split"], record.get("epochs", 0)).name


def _claim(cell: Cell) -> bool:
    """Take `cell` for this process: several workers (`--workers`) share one plan, each cell
    run by one of them. A claim left by a worker that died is taken over."""
    import os

    folder = WORK / "claims"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cell.name}.claim"
    try:
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(path.read_text(encoding="utf-8") or 0)
            os.kill(owner, 0)
            return owner == os.getpid()
        except (ValueError, ProcessLookupError):
            path.unlink(missing_ok=True)
            return _claim(cell)
        except PermissionError:
            return False
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(str(os.getpid()))
    return True


def run(max_minutes: float, stage: str = "", log=print) -> None:
    """Run the plan until it is done or `max_minutes` have passed; cells another worker
    holds are left to it (this one waits while only those remain)."""
    deadline = time.monotonic() + max_minutes * 60 if max_minutes > 0 else math.inf
    while time.monotonic() < deadline:
        todo = plan(read_records(RECORD_DIR), stage)
        if not todo:
            log("[results] nothing left to run")
            return
        cell = next((c for c in todo if _claim(c)), None)
        if cell is None:
            time.sleep(20)
            continue
        run_cell(cell, log)
    log("[results] --max-minutes reached: the report marks what has not run")


# -------------------------------------------------------------------- the report


def _reference_label(recipe: str, epochs: int) -> str:
    return f"lr {recipe.removeprefix('reference-lr')}, {epochs} epoch{'s' if epochs != 1 else ''}"


def _label(epsilon: float) -> str:
    return "non-private" if math.isinf(epsilon) else f"epsilon {epsilon:g}"


def _accuracies(records: list[dict], **where) -> list[float]:
    return [r["accuracy"] for r in sorted(select(records, split="test", **where), key=lambda r: r["seed"])]


def _seeds(records: list[dict], **where) -> str:
    seeds = sorted(r["seed"] for r in select(records, split="test", **where))
    return ", ".join(map(str, seeds)) or "-"


def header(records: list[dict]) -> list[str]:
    machines = sorted({r["machine"] for r in records})
    versions = sorted({", ".join(f"{k} {v}" for k, v in r["versions"].items()) for r in records})
    seconds = sum(r["seconds"] for r in records)
    left = plan(records)
    per_run = seconds / max(1, len(records))
    waiting = "" if chosen_recipe(records) and chosen_reference(records) else (
        " (more become plannable once the tuning on validation rows has finished)")
    return ["# Results: where DP fine-tuning works", "",
            "Generated by `python -m simulations.results --report-only` from the records in "
            "`docs/results/records/results/` (one JSON file per run: resolved configuration, versions, machine, seed, "
            "accuracy after every round, each node's ledger summary, wall time). Do not edit by hand; "
            "`python -m simulations.results` runs what is missing and rewrites it.", "",
            "Every federated cell is a real `fedtune simulate` run (Flower's simulation engine, in-process; Opacus "
            "DP-SGD at every client, record level; peft LoRA on all-MiniLM-L6-v2). Every reported number is the mean "
            "over training seeds with its standard deviation and n; a cell with fewer than "
            f"{MIN_SEEDS} seeds says so. A seed fixes the clients' rows, the partition and the initial adapter; the DP "
            "noise comes from the operating system's entropy, as in a deployment, so a re-run reproduces a cell within "
            "its seeds' spread, not bit for bit.", "",
            f"Machine: {'; '.join(machines)}. Versions: {'; '.join(versions)}.", "",
            f"Budget: {len(records)} runs recorded, {seconds / 3600:.1f} h of wall time in all ({per_run / 60:.1f} min a "
            f"run); {len(left)} planned runs not recorded yet{waiting}.", ""]


def splits_section(records: list[dict]) -> list[str]:
    lines = ["## Three splits", "",
             "Each dataset is cut once, the same for every cell and seed: 15% of its rows are the held-out test rows "
             "(seed 1); of the rest, a share is the validation rows (seed 2); each seed draws its clients' rows from "
             "what remains. Every choice below (the federated recipe, the reference's learning rate and epochs) was "
             "made on the validation rows at seed 0; the test rows are scored once per reported cell.", "",
             "| dataset | validation rows | test rows | majority class on the test rows |", "|---|---|---|---|"]
    for dataset in dict.fromkeys(s.dataset for s in [TABLE, *CURVE]):
        rows = {split: next((r for r in records if r["shape"]["dataset"] == dataset and r["split"] == split), None)
                for split in ("validation", "test")}
        def cell(split, key="evaluation_rows"):
            return "not run" if rows[split] is None else (f"{rows[split][key]:,}" if key == "evaluation_rows"
                                                           else f"{rows[split][key]:.3f}")
        lines.append(f"| {dataset} | {cell('validation')} | {cell('test')} | {cell('test', 'majority_accuracy')} |")
    return lines + [""]


def tuning_section(records: list[dict]) -> list[str]:
    recipe, reference = chosen_recipe(records), chosen_reference(records)
    lines = ["## How the recipe was chosen (validation rows, seed 0)", "",
             f"Each candidate at the table's shape ({TABLE.clients} IID clients x {TABLE.rows:,} rows, epsilon 8, the "
             "same clients' rows), scored on the validation rows after every round; the candidate with "
             "the best accuracy after its last round is the recipe.", "",
             "| candidate | what it is | validation accuracy (last round) | by round |", "|---|---|---|---|"]
    for name, (what, _) in RECIPES.items():
        found = select(records, shape=TABLE, recipe=name, epsilon=8.0, seed=0, split="validation")
        if found:
            by_round = ", ".join(f"{a:.3f}" for a in found[0]["accuracy_by_round"])
            lines.append(f"| {name}{' (chosen)' if name == recipe else ''} | {what} | {found[0]['accuracy']:.3f} | {by_round} |")
        else:
            lines.append(f"| {name} | {what} | not run | |")
    lines += ["", "The centralized non-private reference (plain LoRA, rank 8 on every block, batch 32, AdamW, on the "
              "pooled rows of the same clients), at each learning rate for up to "
              f"{REFERENCE_EPOCHS} epochs; the (rate, epochs) with the best validation accuracy is the reference:", "",
              "| learning rate | validation accuracy after each epoch |", "|---|---|"]
    for rate in REFERENCE_RATES:
        found = select(records, shape=TABLE, recipe=f"reference-lr{rate:g}", seed=0, split="validation")
        text = ", ".join(f"{a:.3f}" for a in found[0]["accuracy_by_round"]) if found else "not run"
        lines.append(f"| {rate:g} | {text} |")
    if reference:
        lines += ["", f"Chosen: {_reference_label(*reference)}."]
        if reference[1] == REFERENCE_EPOCHS:
            lines[-1] += (f" Its validation accuracy was still rising at the last epoch tried ({REFERENCE_EPOCHS}): a "
                          "longer reference may score higher, which would only lower the ratio to it below.")
    return lines + [""]


def recipe_section(records: list[dict]) -> list[str]:
    from fedtune.privacy.accountants import noise_for_budget
    from fedtune.privacy.planning import poisson_schedule

    recipe = chosen_recipe(records)
    if recipe is None:
        return ["## The recipe", "", "Not chosen yet: the tuning on validation rows has not finished.", ""]
    paths = {name: Path(name) for name in ("pool", "validation", "test")}
    config = federated_config(Cell(TABLE, recipe, 8.0, "iid", 0, "test"), paths["pool"], paths["test"], Path("b"))
    t = config.training
    q, per_epoch = poisson_schedule(TABLE.rows, t.batch_size)
    steps = per_epoch * t.epochs * t.rounds
    delta = 1.0 / (10 * TABLE.rows)
    with warnings.catch_warnings():  # Opacus's "optimal order is the largest alpha": the RDP bound is looser
        warnings.simplefilter("ignore")
        rdp, pld = (noise_for_budget(8.0, delta, q, steps, a) for a in ("rdp", "pld"))
    return ["## The recipe", "",
            f"`{recipe}`: {RECIPES[recipe][0]}; LoRA rank {config.lora.rank} on query/value of the last "
            f"{'block' if config.lora.top_layers == 1 else f'{config.lora.top_layers} blocks'} and the classifier "
            f"head, sequence {config.model.max_seq_len} tokens, clipping norm {config.dp.max_grad_norm:g}, record-level "
            "DP-SGD at every client at delta = 1/(10 n), accounted with PLD (Google's dp-accounting). A client with "
            f"fewer rows gets a smaller batch (at least {MIN_STEPS_PER_EPOCH} steps an epoch).", "",
            f"What the tight accountant saves at the table's shape (q = {q:.4f}, {steps} steps, delta {delta:g}, "
            f"epsilon 8): noise multiplier {pld:.4f} with PLD against {rdp:.4f} with RDP, {(1 - pld / rdp):.1%} less "
            "noise for the same guarantee.", ""]


def table_section(records: list[dict]) -> list[str]:
    recipe, reference = chosen_recipe(records), chosen_reference(records)
    lines = ["## Utility vs epsilon at a realistic size (test rows)", "",
             f"{TABLE.dataset}, {TABLE.clients} clients x {TABLE.rows:,} rows, all training every round; mean ± "
             "standard deviation over training seeds (each seed draws other clients' rows and partitions; the DP noise "
             "is fresh in every run).", "",
             "| setting | non-private | epsilon 8 | epsilon 3 | epsilon 1 | seeds (reference / epsilon 8) |", "|---|---|---|---|---|---|"]
    if reference:
        ref = dict(shape=TABLE, recipe=reference[0], epochs=reference[1])
        lines.append(f"| centralized, pooled, {_reference_label(*reference)} (reference) | {mean_sd(_accuracies(records, **ref))} | | | | {_seeds(records, **ref)} |")
    if recipe:
        for partition, title in (("iid", "IID"), ("dirichlet-0.3", "Dirichlet(0.3)")):
            where = dict(shape=TABLE, recipe=recipe, partition=partition)
            cells = " | ".join(mean_sd(_accuracies(records, epsilon=e, **where)) for e in EPSILONS)
            lines.append(f"| federated, {title} | {cells} | {_seeds(records, epsilon=8.0, **where)} |")
    spent = [float(ledger["epsilon"]) for r in select(records, shape=TABLE, split="test") if r["epsilon"] is not None
             for ledger in r["ledgers"]]
    if spent:
        lines += ["", f"Largest epsilon any client spent (its ledger, PLD): {max(spent):.3f}."]
    return lines + [""] + bar_lines(records) + [""]


def bar_lines(records: list[dict]) -> list[str]:
    """The bar, and where a shortfall comes from: the federation's recipe without DP against
    the reference (what federating with a small adapter costs) and DP against the same
    recipe without it (what the noise costs)."""
    recipe, reference = chosen_recipe(records), chosen_reference(records)
    if not (recipe and reference):
        return ["**The bar:** not measured yet (the tuning on validation rows has not finished)."]
    ref = _accuracies(records, shape=TABLE, recipe=reference[0], epochs=reference[1])
    dp = _accuracies(records, shape=TABLE, recipe=recipe, epsilon=8.0, partition="iid")
    open_ = _accuracies(records, shape=TABLE, recipe=recipe, epsilon=math.inf, partition="iid")
    if not (ref and dp):
        return ["**The bar:** not measured yet (its test cells have not run)."]
    ratio = statistics.mean(dp) / statistics.mean(ref)
    marked = "" if min(len(dp), len(ref)) >= MIN_SEEDS else f" (fewer than {MIN_SEEDS} seeds: not a result yet)"
    lines = [f"**The bar:** federated IID at epsilon 8 reaches {mean_sd(dp)} against the tuned centralized non-private "
             f"reference's {mean_sd(ref)}: ratio **{ratio:.3f}**{_ratio_error(dp, ref, ratio)} (goal >= {BAR}; "
             f"{'met' if ratio >= BAR else 'not met'}){marked}."]
    if ratio < BAR:
        lines[0] += (f" Short by {BAR * statistics.mean(ref) - statistics.mean(dp):.3f} accuracy "
                     f"(the bar is {BAR * statistics.mean(ref):.3f}).")
        if open_:
            lines += ["", f"Where the shortfall comes from: the same federation without DP reaches {mean_sd(open_)}, "
                      f"{statistics.mean(open_) / statistics.mean(ref):.3f} of the reference (what federating a small "
                      "adapter over 10 clients costs by itself), and DP keeps "
                      f"{statistics.mean(dp) / statistics.mean(open_):.3f} of that (what the noise at epsilon 8 costs)."]
    return lines


def _ratio_error(numerator: list[float], denominator: list[float], ratio: float) -> str:
    """± one standard error of a ratio of two means over seeds (first-order propagation of
    each mean's standard error), so a reader sees whether met / not met is within the seeds'
    spread; empty with fewer than two seeds on either side."""
    if min(len(numerator), len(denominator)) < 2:
        return ""
    relative = sum(statistics.variance(v) / len(v) / statistics.mean(v) ** 2 for v in (numerator, denominator))
    return f" ± {ratio * math.sqrt(relative):.3f} (one standard error over the seeds)"


def curve_section(records: list[dict]) -> list[str]:
    recipe = chosen_recipe(records)
    lines = ["## Data per client (test rows)", "",
             f"5 clients, all training every round, IID, the recipe above; rows per client "
             f"{', '.join(map(str, CURVE_ROWS))}. Every size of a dataset scores on the same test rows. The last "
             "column is `fedtune privacy advise` for the same shape at epsilon 8 (run noise-to-signal and verdict).", ""]
    if recipe is None:
        return lines + ["Not run yet: it uses the recipe chosen on validation rows.", ""]
    for dataset in dict.fromkeys(s.dataset for s in CURVE):
        studies = [s for s in CURVE if s.dataset == dataset]
        lines += [f"### {dataset}", "", "| rows per client | non-private | epsilon 8 | epsilon 3 | epsilon 1 | advise at "
                  "epsilon 8 |", "|---|---|---|---|---|---|"]
        for shape in studies:
            row = [mean_sd(_accuracies(records, shape=shape, recipe=recipe, epsilon=e)) for e in EPSILONS]
            nsr, verdict = advise_for(shape, recipe, 8.0)
            lines.append(f"| {shape.rows} | " + " | ".join(row) + f" | {nsr:.2f}, {verdict} |")
        lines += ["", f"![data per client, {dataset}](results/curve-{dataset}.png)" if _curve_points(records, dataset)
                  else "No cell of this dataset has run yet.", ""]
    return lines


def _curve_points(records: list[dict], dataset: str) -> dict[float, list[tuple[int, float]]]:
    """epsilon -> (rows per client, mean test accuracy) of the curve cells that ran."""
    recipe = chosen_recipe(records)
    points = {}
    for epsilon in EPSILONS:
        found = [(s.rows, _accuracies(records, shape=s, recipe=recipe, epsilon=epsilon))
                 for s in CURVE if s.dataset == dataset]
        if any(values for _, values in found):
            points[epsilon] = [(x, statistics.mean(v)) for x, v in found if v]
    return points


def advise_for(shape: Shape, recipe: str, epsilon: float) -> tuple[float, str]:
    from fedtune.privacy.advise import advise

    paths = Path("pool"), Path("test")
    config = federated_config(Cell(shape, recipe, epsilon, "iid", 0, "test"), *paths, Path("b"))
    t = config.training
    a = advise(shape.rows, shape.clients, t.rounds, t.epochs, t.batch_size, epsilon,
               trainable_parameters(config, shape.dataset), accountant=config.dp.accountant)
    return a.nsr_run, a.verdict.split(":")[0]


CLASSES = {"rotten-tomatoes": 2, "tweets": 3}


def trainable_parameters(config: Config, dataset: str) -> int:
    """What the recipe trains on the bundled MiniLM, by advise's own count."""
    from fedtune.privacy.advise import model_config_json
    from fedtune.privacy.advise import trainable_parameters as count

    return count(model_config_json(), config.lora.rank, config.lora.top_layers, CLASSES[dataset])


def advise_section() -> list[str]:
    """How advise's verdict was calibrated, from its committed record (when there is one)."""
    from simulations.advise_calibration import CALIBRATION, calibration_section

    if not CALIBRATION.exists():
        return []
    return calibration_section(json.loads(CALIBRATION.read_text(encoding="utf-8"))) + [""]


def plot_curves(records: list[dict], figures: Path) -> None:
    """One figure per dataset with curve cells; a figure whose dataset has none is removed,
    so docs/ never shows a picture the records do not back."""
    from fedtune.reporting.run_report import new_figure, save_figure

    for dataset in dict.fromkeys(s.dataset for s in CURVE):
        path = figures / f"curve-{dataset}.png"
        points = _curve_points(records, dataset)
        if not points:
            path.unlink(missing_ok=True)
            continue
        figure, axes = new_figure((6.0, 4.0))
        for epsilon, xy in points.items():
            axes.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=_label(epsilon))
        majority = next((r["majority_accuracy"] for r in records
                         if r["shape"]["dataset"] == dataset and r["split"] == "test"), None)
        if majority:
            axes.axhline(majority, color="grey", linestyle=":", linewidth=1, label="majority class")
        axes.set_xscale("log")
        axes.set(xlabel="training rows per client (5 clients)", ylabel="test accuracy (mean over seeds)",
                 title=f"data per client: {dataset}")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figures.mkdir(parents=True, exist_ok=True)
        save_figure(figure, path)


ANCHORS = """## Published anchors (context, not the same settings)

- **Yu et al. 2022**, *Differentially Private Fine-tuning of Language Models* (ICLR 2022):
  DP LoRA on RoBERTa-Large at epsilon = 6.7 reaches 87.8% on MNLI, 95.3% on SST-2, 87.4% on
  QQP and 90.8% on QNLI, a few points under non-private fine-tuning: one central dataset of
  tens to hundreds of thousands of examples, batches in the thousands, many epochs.
- **Li et al. 2022**, *Large Language Models Can Be Strong Differentially Private Learners*
  (ICLR 2022): full fine-tuning under DP works with large batches, small clipping norms and
  many steps; the utility loss shrinks as the data per private learner grows, which is
  what the data-per-client curve measures per silo.
"""


def report(records: list[dict]) -> str:
    """docs/results.md from the records alone."""
    if not records:
        raise ConfigError(f"{RECORD_DIR}: no records; run `python -m simulations.results` first")
    sections = (header(records) + splits_section(records) + tuning_section(records) + recipe_section(records)
                + table_section(records) + curve_section(records) + advise_section())
    return "\n".join(sections) + "\n" + ANCHORS


def write_report(records: list[dict], path: Path = REPORT, figures: Path = FIGURES) -> Path:
    text = report(records)
    plot_curves(records, figures)
    atomic_write_text(path, text)
    return path

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.results", description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="regenerate the report and figures from the records")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop starting new runs after this long (0 = no limit)")
    parser.add_argument("--stage", default="", choices=["", *STAGES], help="run only this stage of the plan")
    parser.add_argument("--records", default=str(RECORD_DIR), help="the records folder (default: the committed one)")
    parser.add_argument("--report", default=str(REPORT), help="the report to write (default docs/results.md)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of this worker (0 = torch's default); several workers share the plan, "
                             "each cell run by one of them")
    args = parser.parse_args(argv)
    try:
        if args.max_minutes < 0:
            raise ConfigError(f"--max-minutes = {args.max_minutes:g}: expected minutes >= 0 (0 = no limit)")
        if args.threads < 0:
            raise ConfigError(f"--threads = {args.threads}: expected a whole number >= 0 (0 = torch's default)")
        if not args.report_only:
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            run(args.max_minutes, args.stage, log=lambda line: print(line, flush=True))
        report_path = Path(args.report)
        print(f"wrote {write_report(read_records(Path(args.records)), report_path, report_path.parent / 'results')}")
    except FedtuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
