"""Where DP works: the runs behind `docs/results.md` (report v2).

Two studies, every cell a real `fedtune simulate` run (Flower simulation engine, Ray,
Opacus, peft) in its own process, with the private recipe in `RECIPE`:

- **Data per client** (`CURVE`): accuracy at epsilon 1, 3, 8 and non-private against the
  rows each client holds, on two bundled datasets, 5 clients (a consortium), all of them
  every round. Every size is scored on the same held-out rows (`rows_per_client` cuts the
  pool after the held-out share), so the curve moves only with the data.
- **Utility vs epsilon at a realistic size** (`TABLE`): rotten-tomatoes, 10 clients x
  1,000 rows, IID and Dirichlet(0.3), three seeds, beside a centralized non-private
  reference tuned over learning rates (the best one counts): the bar is federated DP at
  epsilon 8 >= 0.95 of it.

How the recipe was chosen is a third, cheap study: a proxy grid on one silo
(`simulations/recipe_grid.py`), rendered in the same report.

Cells run in priority order (what the report needs first), each skipped when it finished
before, so the whole plan resumes across invocations; `--max-minutes` stops launching
new cells after that much wall time, and the report marks what has not run. Nothing in
the report is typed by hand: it is rendered from the cells' metrics.

    python -m simulations.results [--only curve|table|recipe] [--max-minutes M] [--out runs/results]
    python -m simulations.results --report-only
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.atomic import atomic_write_json, atomic_write_text
from fedtune.config import Config, config_from_toml_text
from fedtune.errors import ConfigError, FedtuneError
from fedtune.machine import machine_description
from fedtune.privacy.accountants import noise_for_budget
from fedtune.privacy.advise import advise
from fedtune.privacy.planning import poisson_schedule
from fedtune.report import read_metrics
from simulations import recipe_grid
from simulations.sweep import Cell, centralized_baseline, run_cell

ROOT = Path(__file__).resolve().parent.parent
EPSILONS = (math.inf, 8.0, 3.0, 1.0)

# The private recipe every cell shares (see docs/results.md, "The recipe", for why each value).
RECIPE = """
[model]
max_seq_len = 32

[lora]
rank = 4
top_layers = 1

[training]
rounds = 5
epochs = 1
batch_size = 64
learning_rate = 0.03

[dp]
accountant = "pld"
max_grad_norm = 1.0

[federation]
central_holdout = 0.15
"""


MIN_STEPS_PER_EPOCH, MIN_BATCH = 8, 8  # a small client gets a smaller batch, not one or two steps an epoch


@dataclass(frozen=True)
class Study:
    """One sweep folder: a dataset at a shape, over epsilons, partitions and seeds."""

    dataset: str
    clients: int
    rows_per_client: int
    partitions: tuple[str, ...] = ("iid",)
    seeds: tuple[int, ...] = (0,)
    max_examples: int = 0  # a seeded sample of the dataset before the held-out share (0 = all)
    reference_rates: tuple[float, ...] = ()  # centralized non-private references, tuned over these

    @property
    def folder(self) -> str:
        return f"{self.dataset}-c{self.clients}-n{self.rows_per_client}"

    def config(self) -> Config:
        base = config_from_toml_text(RECIPE, source="simulations/results.py RECIPE")
        batch = min(base.training.batch_size, max(MIN_BATCH, self.rows_per_client // MIN_STEPS_PER_EPOCH))
        return base.replace(
            training=dataclasses.replace(base.training, batch_size=batch),
            data=dataclasses.replace(base.data, dataset=self.dataset, max_examples=self.max_examples),
            federation=dataclasses.replace(base.federation, num_clients=self.clients, clients_per_round=self.clients,
                                           min_clients=max(1, self.clients - 2), rows_per_client=self.rows_per_client))

    def cells(self, epsilons=EPSILONS) -> list[Cell]:
        """Seed 0 first over every epsilon and partition, then the further seeds."""
        partitions = ["iid" if p == "iid" else f"dirichlet-{float(p):g}" for p in self.partitions]
        return [Cell(e, self.clients, p, False, s) for s in self.seeds for p in partitions for e in epsilons]


# The tweets pool is a 12,000-row sample so that its held-out set (1,800 rows) scores as fast as the others'.
CURVE_ROWS = (100, 400, 1600)
CURVE = [Study(name, 5, rows, max_examples=12_000 if name == "tweets" else 0)
         for name in ("rotten-tomatoes", "tweets") for rows in CURVE_ROWS]
TABLE = Study("rotten-tomatoes", 10, 1000, partitions=("iid", "0.3"), seeds=(0, 1, 2), reference_rates=(0.001, 0.003))


def plan(only: str = "") -> list[tuple[Study, list[Cell]]]:
    """Every (study, cells) in the order they run, breadth before depth, so that a session
    cut short by `--max-minutes` still leaves a complete picture at one seed: the bar (the
    table's IID epsilon 8 over every seed, and non-private at seed 0), the curve's epsilon 8
    and non-private, the table's other budgets and Dirichlet clients at seed 0, the curve's
    epsilon 3 and 1, and last the table's further seeds (epsilon 8 and non-private first).
    Each cell appears once."""
    bar = [c for c in TABLE.cells((8.0, math.inf)) if c.partition == "iid" and (c.seed == 0 or c.epsilon == 8.0)]
    rest = [c for c in TABLE.cells() if c not in bar]
    first_seed = [c for c in rest if c.seed == 0]
    budget_order = {8.0: 0, math.inf: 1, 3.0: 2, 1.0: 3}
    further_seeds = sorted((c for c in rest if c.seed != 0), key=lambda c: (budget_order[c.epsilon], c.seed))
    table = [(TABLE, bar), (TABLE, first_seed), (TABLE, further_seeds)]
    curve = [(s, s.cells((8.0, math.inf))) for s in CURVE]
    curve_rest = [(s, s.cells((3.0, 1.0))) for s in CURVE]
    if only == "table":
        return table
    if only == "curve":
        return curve + curve_rest
    return table[:1] + curve + table[1:2] + curve_rest + table[2:]


def run_plan(out: Path, only: str, max_minutes: float, log=print) -> None:
    started = time.monotonic()
    deadline = started + max_minutes * 60 if max_minutes > 0 else math.inf
    references_done = False
    if only == "recipe":
        recipe_grid.run_grid(out / "recipe", lambda: time.monotonic() > deadline, log)
        return
    for study, cells in plan(only):
        folder = out / study.folder
        base = study.config()
        atomic_write_json(folder / "study.json", {**dataclasses.asdict(study), "recipe": RECIPE})
        if study.reference_rates and not references_done:
            for rate in study.reference_rates:
                if time.monotonic() > deadline:
                    break
                _reference(base, rate, folder, log)
            references_done = True
        for cell in cells:
            if time.monotonic() > deadline:
                log(f"[results] --max-minutes {max_minutes:g} reached: the report marks the cells not run")
                return
            run_cell(cell, base, folder, log)
    if not only:
        recipe_grid.run_grid(out / "recipe", lambda: time.monotonic() > deadline, log)


REFERENCE_LORA = {"rank": 8, "top_layers": 0}  # the non-private reference needs no DP-motivated restriction


def _reference(base: Config, rate: float, folder: Path, log) -> dict:
    """Centralized non-private LoRA on the pooled rows at one learning rate, as many epochs
    as the federation's rounds x local epochs, with plain LoRA (rank 8, every block): the
    recipe's smaller adapter is a choice for DP, the reference is the best model without it."""
    tuned = base.replace(training=dataclasses.replace(base.training, learning_rate=rate),
                         lora=dataclasses.replace(base.lora, **REFERENCE_LORA))
    return centralized_baseline(tuned, folder, log, filename=f"reference-lr{rate:g}.json")


# ---------------------------------------------------------------- reading the cells


def _finished(folder: Path, cell: Cell) -> dict | None:
    run_dir = folder / "cells" / cell.name
    try:
        metrics = read_metrics(run_dir)
    except FedtuneError:
        return None
    config = config_from_toml_text((run_dir / "cell.toml").read_text(encoding="utf-8"))
    if len(metrics) < config.training.rounds:
        return None
    last = metrics[-1]
    return {"accuracy": last["accuracy"], "majority": last.get("majority_accuracy"),
            "epsilon_spent": last.get("epsilon_max"), "seconds": sum(m.get("seconds", 0.0) for m in metrics)}


def collect(out: Path) -> dict:
    """Every finished cell and reference, keyed for the report."""
    found = {"cells": {}, "references": {}, "planned": 0, "seconds": 0.0}
    for study, cells in plan():
        found["planned"] += len(cells)
        for cell in cells:
            result = _finished(out / study.folder, cell)
            if result is not None:
                found["cells"][(study.folder, cell.partition, cell.epsilon, cell.seed)] = result
                found["seconds"] += result["seconds"]
    for study in dict.fromkeys(study for study, _ in plan()):
        found["planned"] += len(study.reference_rates)
        for rate in study.reference_rates:
            path = out / study.folder / f"reference-lr{rate:g}.json"
            if path.is_file():
                reference = json.loads(path.read_text(encoding="utf-8"))
                found["references"][(study.folder, rate)] = reference
                found["seconds"] += reference["seconds"]
    return found


def _values(found: dict, study: Study, partition: str, epsilon: float) -> list[float]:
    return [r["accuracy"] for (f, p, e, _), r in sorted(found["cells"].items())
            if f == study.folder and p == partition and e == epsilon]


def _mean(values: list[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (n={len(values)})"


def _eps_label(epsilon: float) -> str:
    return "non-private" if math.isinf(epsilon) else f"epsilon {epsilon:g}"


# ---------------------------------------------------------------- advise, checked


LEARNED_SHARE = 0.5  # "learned": closed at least half the gap from the majority class to non-private


def advise_for(study: Study, epsilon: float) -> tuple[float, str]:
    config = study.config()
    a = advise(study.rows_per_client, study.clients, config.training.rounds, config.training.epochs,
               config.training.batch_size, epsilon, trainable_parameters(config, study.dataset),
               accountant=config.dp.accountant)
    return a.nsr_run, a.verdict.split(":")[0]


MINILM_BLOCKS, MINILM_WIDTH = 6, 384
CLASSES = {"rotten-tomatoes": 2, "tweets": 3}


def trainable_parameters(config: Config, dataset: str) -> int:
    """What the recipe trains on MiniLM: LoRA A and B on query and value of the adapted
    blocks, and the classifier head (weights and bias per class)."""
    blocks = config.lora.top_layers or MINILM_BLOCKS
    lora = blocks * 2 * 2 * MINILM_WIDTH * config.lora.rank
    return lora + CLASSES[dataset] * (MINILM_WIDTH + 1)


def learned(accuracy: float, majority: float, nonprivate: float) -> bool:
    return nonprivate > majority and accuracy - majority >= LEARNED_SHARE * (nonprivate - majority)


# ---------------------------------------------------------------- the report


def curve_section(found: dict, figures: Path) -> list[str]:
    lines = ["## Data per client", "",
             f"5 clients, all training every round, IID; rows per client {', '.join(map(str, CURVE_ROWS))}; seed 0. "
             "Each point is the held-out accuracy after the last round; every size of a dataset scores on the "
             "same held-out rows. The last column is `fedtune privacy advise` for the same shape at epsilon 8 "
             "(run noise-to-signal and verdict), next to what happened.", ""]
    checks = []
    for dataset in dict.fromkeys(s.dataset for s in CURVE):
        studies = [s for s in CURVE if s.dataset == dataset]
        majority = next((r["majority"] for (f, *_), r in found["cells"].items()
                         if f in {s.folder for s in studies} and r["majority"]), None)
        lines += [f"### {dataset}" + (f" (majority class {majority:.3f})" if majority else ""), "",
                  "| rows per client | non-private | epsilon 8 | epsilon 3 | epsilon 1 | advise at epsilon 8 |",
                  "|---|---|---|---|---|---|"]
        for study in studies:
            row = {e: _values(found, study, "iid", e) for e in EPSILONS}
            nsr, verdict = advise_for(study, 8.0)
            lines.append(f"| {study.rows_per_client} | " + " | ".join(_mean(row[e]) for e in EPSILONS)
                         + f" | {nsr:.2f}, {verdict} |")
            for epsilon in (8.0, 3.0, 1.0):
                if row[epsilon] and row[math.inf] and majority:
                    nsr_e, verdict_e = (nsr, verdict) if epsilon == 8.0 else advise_for(study, epsilon)
                    checks.append((dataset, study.rows_per_client, epsilon, nsr_e, verdict_e,
                                   learned(row[epsilon][0], majority, row[math.inf][0])))
        lines += ["", f"![data per client, {dataset}](results/curve-{dataset}.png)", ""]
        _plot_curve(figures / f"curve-{dataset}.png", found, studies, majority, dataset)
    if checks:
        agree = sum((verdict == "can learn") == did for *_, verdict, did in checks)
        lines += [f"**advise, checked:** its verdict matched the outcome in {agree} of {len(checks)} measured "
                  f"(shape, epsilon) pairs (\"learned\" = closed at least {LEARNED_SHARE:.0%} of the gap from the "
                  "majority class to non-private at the same size):", ""]
        lines += [f"- {d}, {n} rows, epsilon {e:g}: advise {nsr:.2f} \"{v}\"; measured: "
                  f"{'learned' if did else 'did not learn'}" for d, n, e, nsr, v, did in checks]
        lines.append("")
    return lines


def table_section(found: dict, figures: Path) -> list[str]:
    study = TABLE
    references = {rate: found["references"][(study.folder, rate)] for rate in study.reference_rates
                  if (study.folder, rate) in found["references"]}
    lines = ["## Utility vs epsilon at a realistic size", "",
             f"{study.dataset}, {study.clients} clients x {study.rows_per_client} rows, all training every round; "
             f"seeds {', '.join(map(str, study.seeds))}; mean ± standard deviation over the seeds that ran. The "
             "centralized reference trains non-private plain LoRA (rank 8 on every block) on the pooled rows, for the "
             "epochs stated, at each learning rate listed; the best one is the reference.", "",
             "| setting | non-private | epsilon 8 | epsilon 3 | epsilon 1 |", "|---|---|---|---|---|"]
    for rate, reference in sorted(references.items()):
        lines.append(f"| centralized, pooled, lr {rate:g}, {reference['epochs']} epochs (reference) "
                     f"| {reference['accuracy']:.3f} | | | |")
    for partition, title in (("iid", "IID"), ("dirichlet-0.3", "Dirichlet(0.3)")):
        lines.append(f"| federated, {title} | " + " | ".join(_mean(_values(found, study, partition, e))
                                                            for e in EPSILONS) + " |")
    spent = [r["epsilon_spent"] for (f, _, e, _), r in found["cells"].items()
             if f == study.folder and math.isfinite(e) and r["epsilon_spent"] is not None]
    lines.append("")
    if spent:
        lines.append(f"Largest epsilon any client spent (its ledger, PLD): {max(spent):.3f}.")
    iid8 = _values(found, study, "iid", 8.0)
    if references and iid8:
        best_rate, best = max(references.items(), key=lambda item: item[1]["accuracy"])
        ratio = statistics.mean(iid8) / best["accuracy"]
        lines += ["", f"**The bar:** federated IID at epsilon 8 reaches {statistics.mean(iid8):.3f} against the "
                  f"tuned centralized non-private {best['accuracy']:.3f} (lr {best_rate:g}): ratio **{ratio:.3f}** "
                  f"(goal >= 0.95; {'met' if ratio >= 0.95 else 'not met'}; {len(iid8)} seed(s))."]
    nsr, verdict = advise_for(study, 8.0)
    lines += ["", f"`fedtune privacy advise` for this shape at epsilon 8: run noise-to-signal {nsr:.2f}, \"{verdict}\".", ""]
    return lines


def recipe_section() -> list[str]:
    config = config_from_toml_text(RECIPE)
    t = config.training
    q, per_epoch = poisson_schedule(TABLE.rows_per_client, t.batch_size)
    steps = per_epoch * t.epochs * t.rounds
    delta = 1.0 / (10 * TABLE.rows_per_client)
    rdp, pld = (noise_for_budget(8.0, delta, q, steps, a) for a in ("rdp", "pld"))
    return ["## The recipe", "",
            f"Every cell: all-MiniLM-L6-v2, LoRA rank {config.lora.rank} on query/value of the last "
            f"{'block' if config.lora.top_layers == 1 else f'{config.lora.top_layers} blocks'} + the classifier head, sequence {config.model.max_seq_len} tokens, "
            f"{t.rounds} rounds x {t.epochs} local epoch, expected Poisson batch {t.batch_size}, AdamW lr "
            f"{t.learning_rate:g}, clipping norm {config.dp.max_grad_norm:g}, record-level DP-SGD per client at "
            f"delta = 1/(10 n), accounted with PLD (`dp.accountant = \"pld\"`, Google's dp-accounting; every "
            f"ledger is re-checked with Opacus's PRV).", "",
            f"What the tight accountant saves at the table's shape (q = {q:.4f}, {steps} steps, delta {delta:g}, "
            f"epsilon 8): noise multiplier {pld:.4f} with PLD against {rdp:.4f} with RDP, "
            f"{(1 - pld / rdp):.1%} less noise for the same guarantee.", ""]


def _plot_curve(path: Path, found: dict, studies: list[Study], majority: float | None, dataset: str) -> None:
    from fedtune.report import new_figure, save_figure

    figure, axes = new_figure((6.0, 4.0))
    for epsilon in EPSILONS:
        points = [(s.rows_per_client, _values(found, s, "iid", epsilon)) for s in studies]
        points = [(x, statistics.mean(v)) for x, v in points if v]
        if points:
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=_eps_label(epsilon))
    if majority:
        axes.axhline(majority, color="grey", linestyle=":", linewidth=1, label="majority class")
    axes.set_xscale("log")
    axes.set(xlabel="training rows per client (5 clients)", ylabel="held-out accuracy", title=f"data per client: {dataset}")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _remaining(found: dict, done: int) -> str:
    left = found["planned"] - done
    if left <= 0:
        return ""
    per_run = found["seconds"] / max(1, done)
    return (f"; the {left} runs not finished yet need about {left * per_run / 3600:.1f} h more at the mean so far "
            f"({per_run / 60:.1f} min a run): `python -m simulations.results` resumes them")


def write_report(out: Path, report: Path) -> Path:
    found = collect(out)
    if not found["cells"]:
        raise ConfigError(f"{out}: no finished cell to report; run `python -m simulations.results` first")
    figures = report.parent / "results"
    done = len(found["cells"]) + len(found["references"])
    header = ["# Results v2: where DP fine-tuning works", "",
              "Produced by `python -m simulations.results` (the script writes this file and its figures from the "
              "cells' own metrics; re-run it to resume or reproduce). Every federated cell is a real `fedtune "
              "simulate` run: Flower's simulation engine, Opacus DP-SGD per client (record-level), peft LoRA on "
              "all-MiniLM-L6-v2. \"not run\" marks a planned cell the budget has not reached yet.", "",
              f"Machine: {machine_description()}.", "",
              f"Budget: {done} of {found['planned']} planned runs finished; their "
              f"training and evaluation time summed: {found['seconds'] / 60:.0f} min on this machine (each run also "
              f"pays about 15 s of process and Ray start-up){_remaining(found, done)}.", ""]
    sections = (recipe_section() + recipe_grid.section(out / "recipe") + table_section(found, figures)
                + curve_section(found, figures))
    atomic_write_text(report, "\n".join(header + sections) + "\n" + ANCHORS)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.results", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", choices=["", "curve", "table", "recipe"],
                        help="run one study (default all: table and curve, then the recipe grid's remaining runs)")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="stop launching cells after this much wall time")
    parser.add_argument("--out", default="runs/results", help="cell folders (default runs/results)")
    parser.add_argument("--report", default=str(ROOT / "docs" / "results.md"), help="report to write (default docs/results.md)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from finished cells")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if args.max_minutes < 0:
            raise ConfigError(f"--max-minutes = {args.max_minutes:g}: expected minutes >= 0 (0 = no limit)")
        if not args.report_only:
            run_plan(out, args.only, args.max_minutes)
        print(f"wrote {write_report(out, Path(args.report))}")
    except FedtuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
