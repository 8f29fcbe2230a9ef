"""Utility-vs-privacy sweeps: a grid of simulations, resumable, with a reference baseline.

The grid crosses target epsilon (``inf`` = non-private), number of clients, partitioning
(``iid`` or a Dirichlet alpha), FFA-LoRA off/on and seeds. Each cell is an ordinary
`fedtune simulate` run in its own directory under ``OUT/cells/`` and its own process (a
fresh Ray per cell). A cell whose run finished every round is skipped on a re-run. The
reference row is centralized non-private LoRA on the same training pool (every client's
rows together), scored on the same held-out set, for the same number of epochs.

Outputs: ``OUT/results.csv`` (one row per cell), ``OUT/results.md`` (cells grouped over
seeds: mean and spread) and ``OUT/results.png`` (accuracy vs epsilon per setting).

Before any cell runs, the sweep says how many cells there are, how many a re-run skips and
how long the rest should take: the mean measured time of this sweep's finished cells
(`plan_sweep`); before the first cell finishes, the default run's committed benchmark record
(`DEFAULT_RUN_RECORD`, its machine named in the line) scaled by each cell's work, since a
bare constant would be wrong on every machine but one.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedtune.system.atomic import atomic_write_json, atomic_write_text
from fedtune.config import Config
from fedtune.errors import ConfigError, FedtuneError
from fedtune.reporting.run_report import read_metrics
from simulations.settings import simulation_settings, with_simulation

# benchmarks/default_run.py's record: the default simulation's wall time, and its machine
DEFAULT_RUN_RECORD = Path(__file__).resolve().parents[1] / "docs" / "benchmark-runs" / "default_run.json"

CELL_SECONDS = "seconds.txt"  # a finished cell's wall time, written by `run_cell`


@dataclass(frozen=True)
class Cell:
    epsilon: float  # inf = non-private
    num_clients: int
    partition: str  # "iid" or "dirichlet-<alpha>"
    ffa: bool
    seed: int

    @property
    def name(self) -> str:
        eps = "nodp" if math.isinf(self.epsilon) else f"eps{self.epsilon:g}"
        return f"{eps}_c{self.num_clients}_{self.partition}_{'ffa' if self.ffa else 'lora'}_s{self.seed}"

    @property
    def setting(self) -> str:
        """The cell without epsilon and seed: one line of the plot."""
        return f"{self.num_clients} clients, {self.partition}, {'FFA-LoRA' if self.ffa else 'LoRA'}"

    def config(self, base: Config) -> Config:
        """The base config with this cell's settings; its [simulation] table resolved, so
        the cell's cell.toml says every setting it ran with."""
        fed = base.federation
        partition = {"partitioner": "iid"} if self.partition == "iid" else {
            "partitioner": "dirichlet", "dirichlet_alpha": float(self.partition.split("-", 1)[1])}
        per_round = min(fed.clients_per_round, self.num_clients)
        config = base.replace(
            dp=dataclasses.replace(base.dp, enabled=not math.isinf(self.epsilon),
                                   target_epsilon=self.epsilon if math.isfinite(self.epsilon) else base.dp.target_epsilon),
            federation=dataclasses.replace(fed, clients_per_round=per_round,
                                           min_clients=min(fed.min_clients, per_round)),
            lora=dataclasses.replace(base.lora, ffa=self.ffa),
            training=dataclasses.replace(base.training, seed=self.seed),
        )
        return with_simulation(config, num_clients=self.num_clients, **partition)


def _values(text: str, key: str, parse) -> list:
    try:
        values = [parse(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--{key} = {text!r}: expected a comma-separated list") from None
    if not values:
        raise ConfigError(f"--{key} = {text!r}: expected at least one value")
    return values


def _epsilon(text: str) -> float:
    value = math.inf if text.lower() in ("inf", "none", "nodp", "non-private") else float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def _partition(text: str) -> str:
    if text.lower() == "iid":
        return "iid"
    alpha = float(text)
    if not alpha > 0:
        raise ValueError(text)
    return f"dirichlet-{alpha:g}"


def _switch(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes", "ffa"):
        return True
    if text.lower() in ("off", "false", "0", "no", "lora"):
        return False
    raise ValueError(text)


def _clients(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def grid(epsilons: str, clients: str, partitions: str, ffa: str, seeds: str) -> list[Cell]:
    """All cells, in the order they run (cheapest settings first, seeds innermost)."""
    return [Cell(e, c, p, f, s) for c, p, f, e, s in itertools.product(
        _values(clients, "clients", _clients), _values(partitions, "partitions", _partition),
        _values(ffa, "ffa", _switch), _values(epsilons, "epsilons", _epsilon), _values(seeds, "seeds", int))]


def cell_finished(run_dir: Path, rounds: int) -> bool:
    try:
        return (run_dir / "adapter").is_dir() and len(read_metrics(run_dir)) >= rounds
    except FedtuneError:
        return False


def cell_done(cell: Cell, base: Config, out: Path) -> bool:
    """Whether a re-run skips this cell: it finished every round under the configuration
    the base gives it now (`run_cell` runs a cell again when the base changed)."""
    run_dir = out / "cells" / cell.name
    config = cell.config(base)
    return not _stale(run_dir / "cell.toml", config) and cell_finished(run_dir, config.training.rounds)


def _stale(config_path: Path, config: Config) -> bool:
    return config_path.is_file() and _ran_with(config_path) != config


def cell_seconds(run_dir: Path) -> float | None:
    """How long a finished cell took: the wall time `run_cell` recorded (start-up included),
    else, for a cell that ran before it was recorded, the sum of its rounds' own seconds."""
    try:
        return float((run_dir / CELL_SECONDS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    try:
        rounds = [m.get("seconds") for m in read_metrics(run_dir)]
    except FedtuneError:
        return None
    measured = [r for r in rounds if isinstance(r, (int, float))]
    return float(sum(measured)) if measured else None


def _work(config: Config) -> float:
    """A cell's training work relative to another's on the same data: rounds x epochs x the
    share of clients training each round x tokens per example (the time is nearly all
    DP-SGD steps: docs/benchmarks.md)."""
    sim = simulation_settings(config)
    share = min(1.0, config.federation.clients_per_round / max(1, sim.num_clients))
    return config.training.rounds * config.training.epochs * share * config.model.max_seq_len


def record_estimate(base: Config, cells: "list[Cell]") -> tuple[list[float], str] | None:
    """Each cell's seconds judged by the default run's record, and where that figure comes
    from; None without the record (an installed copy without the repository's docs)."""
    from simulations.defaults import default_config_path
    from fedtune.config import load_config

    try:
        record = json.loads(DEFAULT_RUN_RECORD.read_text(encoding="utf-8"))
        seconds = float(record["summary"]["in-process"]["wall_seconds_mean"])
        machine = f"{record['machine']['cores']}-core {record['machine']['cpu']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None
    default = load_config(default_config_path())
    same_data = (base.data.path, base.data.dataset, simulation_settings(base).rows_per_client) == \
        (default.data.path, default.data.dataset, simulation_settings(default).rows_per_client)
    source = (f"the default run's {_duration(seconds)} on a {machine} (docs/benchmarks.md) scaled by each cell's "
              f"rounds, clients and tokens{'' if same_data else '; for BBC News: your data scales it by its rows'}")
    return [seconds * _work(cell.config(base)) / _work(default) for cell in cells], source


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep will do before it does it: which cells a re-run skips, and how long the
    rest should take, judged by the cells of this sweep that already finished, else by the
    default run's record (`record_estimate`)."""

    cells: list[Cell]
    done: list[bool]
    seconds: list[float]  # measured times of the finished cells that recorded one
    baseline_done: bool
    prior: tuple[list[float], str] | None = None  # per cell, from the record, and its source

    @property
    def to_run(self) -> int:
        return self.done.count(False)

    def summary(self) -> str:
        finished = len(self.cells) - self.to_run
        if not self.to_run:
            rest = "nothing to run" if self.baseline_done else "only the centralized baseline to run"
            return f"[sweep] {len(self.cells)} cells: all finished, {rest}"
        head = f"[sweep] {len(self.cells)} cells: {finished} finished, {self.to_run} to run"
        baseline = "" if self.baseline_done else " plus the centralized baseline"
        if not self.seconds:
            if self.prior is None:
                return f"{head}; no estimate until the first cell finishes"
            left = sum(t for t, done in zip(self.prior[0], self.done) if not done)
            return f"{head}; estimated about {_duration(left)}{baseline}, from {self.prior[1]}"
        mean = statistics.mean(self.seconds)
        cells = f"{len(self.seconds)} finished cell{'s' if len(self.seconds) != 1 else ''}"
        return (f"{head}; estimated {_duration(mean * self.to_run)} ({self.to_run} x {_duration(mean)}, the mean "
                f"measured time of the {cells})" + baseline)

    def grid_lines(self) -> list[str]:
        lines = [f"  {'done' if done else 'to run':6}  {cell.name}" for cell, done in zip(self.cells, self.done)]
        return lines + [f"  {'done' if self.baseline_done else 'to run':6}  centralized non-private baseline"]


def plan_sweep(base: Config, cells: list[Cell], out: str | Path) -> SweepPlan:
    """Read (never write) the sweep directory: which cells are finished and their times."""
    out = Path(out)
    done = [cell_done(cell, base, out) for cell in cells]
    seconds = [cell_seconds(out / "cells" / cell.name) for cell, finished in zip(cells, done) if finished]
    return SweepPlan(cells, done, [s for s in seconds if s is not None], (out / "baseline.json").is_file(),
                     record_estimate(base, cells))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {round(seconds % 3600 / 60):02d} min"


def _ran_with(config_path: Path) -> Config | None:
    """The configuration a cell ran with (fields added since then take their defaults; the
    simulation settings it kept in [federation] before they moved count as [simulation]'s)."""
    import tomllib

    from fedtune.config import build_config
    from simulations.settings import moved_from_federation

    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
        return build_config(moved_from_federation(raw), source=str(config_path))
    except (FedtuneError, tomllib.TOMLDecodeError):
        return None


def run_cell(cell: Cell, base: Config, out: Path, log=print, simulate_args: tuple[str, ...] = ()) -> Path:
    """One simulation in a child process (its own Ray); skipped when already finished."""
    run_dir = out / "cells" / cell.name
    config = cell.config(base)
    config_path = run_dir / "cell.toml"
    if _stale(config_path, config):
        log(f"[sweep] {cell.name}: base configuration changed since it ran; running it again")
        shutil.rmtree(run_dir)
    if cell_finished(run_dir, config.training.rounds):
        log(f"[sweep] {cell.name}: finished earlier, skipped")
        return run_dir
    if run_dir.exists() and not (run_dir / "checkpoint.safetensors").exists():
        shutil.rmtree(run_dir)  # a cell that never finished a round: start clean
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(config_path, config.to_toml())
    log(f"[sweep] {cell.name}: running")
    started = time.perf_counter()
    command = [sys.executable, "-m", "fedtune", "simulate", "--config", str(config_path), "--out", str(run_dir),
               *simulate_args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    atomic_write_text(run_dir / "simulate.log", result.stdout + result.stderr)
    if result.returncode != 0 or not cell_finished(run_dir, config.training.rounds):
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FedtuneError(f"sweep cell {cell.name} failed (exit {result.returncode}): {tail}; log: {run_dir / 'simulate.log'}")
    elapsed = time.perf_counter() - started
    atomic_write_text(run_dir / CELL_SECONDS, f"{elapsed:.1f}\n")  # what the next run's estimate is based on
    log(f"[sweep] {cell.name}: done in {elapsed:.0f} s, "
        f"accuracy {read_metrics(run_dir)[-1].get('accuracy', float('nan')):.4f}")
    return run_dir


def centralized_baseline(base: Config, out: Path, log=print, filename: str = "baseline.json") -> dict:
    """Non-private LoRA on all clients' rows pooled, scored on the sweep's held-out set."""
    path = out / filename
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from fedtune.federation.central_eval import CentralEvaluator
    from fedtune.training.dp_train import train_call
    from fedtune.privacy.planning import new_ledger, plan_training
    from fedtune.training.local import build_model, prepare_data
    from fedtune.models.base import load_tokenizer, resolve_model_path
    from simulations.partition import held_out_table, training_pool
    from simulations.run import prepare_simulation

    config = prepare_simulation(base.replace(dp=dataclasses.replace(base.dp, enabled=False)))
    pool, held_out = training_pool(config), held_out_table(config)
    if held_out is None:
        raise ConfigError("simulation.central_holdout: a sweep needs a held-out share (e.g. 0.15) to compare cells")
    epochs = config.training.rounds * config.training.epochs
    config = config.replace(training=dataclasses.replace(config.training, rounds=1, epochs=epochs))
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    model = build_model(config, tokenizer, len(config.data.labels))
    data = prepare_data(config, tokenizer, table=pool, validation=False)
    plan = plan_training(config, len(data.train))
    started = time.perf_counter()
    log(f"[sweep] centralized non-private baseline: {len(data.train)} examples, {epochs} epochs")
    train_call(model, data.train, config, plan, new_ledger(config, plan), None, label="centralized baseline")
    from fedtune.models.adapter_io import adapter_state

    scores = CentralEvaluator(config, model, tokenizer, held_out)(adapter_state(model))
    result = {"accuracy": scores.get("accuracy"), "macro_f1": scores.get("macro_f1"), "loss": scores.get("loss"),
              "majority_accuracy": scores.get("majority_accuracy"), "examples": len(data.train), "epochs": epochs,
              "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(path, result)
    return result


def _cell_row(cell: Cell, run_dir: Path) -> dict:
    metrics = read_metrics(run_dir)
    last = metrics[-1]
    eps = last.get("epsilon_max")
    return {"cell": cell.name, "target_epsilon": "inf" if math.isinf(cell.epsilon) else cell.epsilon,
            "num_clients": cell.num_clients, "partition": cell.partition, "ffa": cell.ffa, "seed": cell.seed,
            "accuracy": last.get("accuracy"), "macro_f1": last.get("macro_f1"), "loss": last.get("loss"),
            "best_accuracy": max((m.get("accuracy") or 0.0) for m in metrics),
            "epsilon_spent_max": eps, "rounds": len(metrics),
            "seconds": round(sum(m.get("seconds", 0.0) for m in metrics), 1)}


def _spread(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def write_tables(out: Path, cells: list[Cell], rows: list[dict], baseline: dict) -> list[Path]:
    import csv

    columns = list(rows[0])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    reference = {"cell": "centralized-nonprivate-baseline", "target_epsilon": "inf", "num_clients": 1,
                 "partition": "pooled", "ffa": False, "seed": "", "accuracy": baseline["accuracy"],
                 "macro_f1": baseline["macro_f1"], "loss": baseline["loss"], "best_accuracy": baseline["accuracy"],
                 "epsilon_spent_max": "inf", "rounds": 1, "seconds": baseline["seconds"]}
    writer.writerows([[r.get(c, "") for c in columns] for r in rows + [reference]])
    atomic_write_text(out / "results.csv", buffer.getvalue())

    groups: dict[tuple, list[dict]] = {}
    for cell, row in zip(cells, rows):
        groups.setdefault((cell.setting, cell.epsilon), []).append(row)
    lines = ["# Utility vs privacy", "",
             f"Final-round accuracy on the central held-out set; mean ± standard deviation over seeds. "
             f"Majority class: {baseline['majority_accuracy']:.4f}.", "",
             "| setting | target epsilon | seeds | accuracy | macro F1 | epsilon spent (max) |", "|---|---|---|---|---|---|",
             f"| centralized, pooled, LoRA (reference) | non-private | 1 | {baseline['accuracy']:.4f} | {baseline['macro_f1']:.4f} | inf |"]
    for (setting, epsilon), group in groups.items():
        spent = [g["epsilon_spent_max"] for g in group if isinstance(g["epsilon_spent_max"], float)]
        target = "non-private" if math.isinf(epsilon) else f"{epsilon:g}"
        lines.append(f"| {setting} | {target} | {len(group)} | {_spread([g['accuracy'] for g in group])} "
                     f"| {_spread([g['macro_f1'] for g in group])} | {f'{max(spent):.3f}' if spent else 'inf'} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    _plot(out / "results.png", groups, baseline)
    return [out / "results.csv", out / "results.md", out / "results.png"]


def _plot(path: Path, groups: dict, baseline: dict) -> None:
    from fedtune.reporting.run_report import new_figure, save_figure

    finite = sorted({eps for _, eps in groups if math.isfinite(eps)})
    nonprivate_x = (max(finite) * 2.5) if finite else 1.0  # where "non-private" sits on the axis
    figure, axes = new_figure((6.5, 4.2))
    for setting in dict.fromkeys(s for s, _ in groups):
        points = sorted((eps if math.isfinite(eps) else nonprivate_x, [g["accuracy"] for g in rows])
                        for (s, eps), rows in groups.items() if s == setting)
        xs = [x for x, _ in points]
        means = [statistics.mean(v) for _, v in points]
        errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        axes.errorbar(xs, means, yerr=errors, marker="o", markersize=4, capsize=3, label=setting)
    axes.axhline(baseline["accuracy"], color="black", linestyle="--", linewidth=1, label="centralized non-private")
    axes.axhline(baseline["majority_accuracy"], color="grey", linestyle=":", linewidth=1, label="majority class")
    axes.set_xscale("log")
    ticks = finite + [nonprivate_x]
    axes.set_xticks(ticks, [f"{t:g}" for t in finite] + ["no DP"])
    axes.set(xlabel="target epsilon per client", ylabel="accuracy (held-out)", title="utility vs privacy")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    save_figure(figure, path)


def sweep(base: Config, cells: list[Cell], out: str | Path, log=print, simulate_args: tuple[str, ...] = ()) -> list[Path]:
    out = Path(out)
    log(f"[sweep] {len(cells)} cells into {out}")
    log(plan_sweep(base, cells, out).summary())  # before anything runs, so a long sweep can be stopped now
    out.mkdir(parents=True, exist_ok=True)
    baseline = centralized_baseline(base, out, log)
    rows = [_cell_row(cell, run_cell(cell, base, out, log, simulate_args)) for cell in cells]
    written = write_tables(out, cells, rows, baseline)
    log(f"[sweep] wrote {', '.join(str(p) for p in written)}")
    return written
