"""docs/benchmarks.md, generated from the committed benchmark records and nothing else.

Why generated: a page of timings written by hand drifts from the runs it describes (a
figure re-typed wrong, a run re-done and the page left alone). Here every number on the
page is read from a JSON record a benchmark script wrote, or computed from one, and the
prose between them is fixed text that quotes no number of its own. A test
(tests/test_committed_reports_benchmarks.py) regenerates the page in memory and compares
it with the committed one, so the two cannot disagree unnoticed.

    python -m benchmarks.report            # rewrite docs/benchmarks.md from the records
    python -m benchmarks.report --check    # exit 1 if the committed page is not what they give

Reads only JSON (no torch model, no benchmark run): seconds on a fresh clone. A record that
lacks a field the page needs stops it with one line naming the file and the field.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.run_all import GOALS, cohort_size, table, verdict, workloads
from fedtune.system.machine import machine_description

ROOT = Path(__file__).resolve().parents[1]
PAGE = Path("docs/benchmarks.md")

# Where each record lives, relative to the repository root.
RECORDS = {
    "full": "docs/benchmark-runs/full.json",
    "quick": "docs/benchmark-runs/quick.json",
    "requick": "docs/benchmark-runs/quick-2026-11-27-dp-simulation.json",
    "llm": "docs/benchmark-runs/llm_step.json",
    "secagg": "docs/benchmark-runs/secagg_overhead.json",
    "distributed": "docs/benchmark-runs/distributed_cost.json",
    "dp": "docs/dp_overhead.json",
    "simulation": "docs/simulation_efficiency.json",
    "default_run": "docs/benchmark-runs/default_run.json",
    "population": "docs/benchmark-runs/population.json",
    "pfl_compare": "docs/benchmark-runs/pfl_compare.json",
}

# The fields the page reads, as dotted paths ("[]": every element of a list). Checked
# before anything is rendered, so a broken record fails with its name, not a KeyError.
MACHINE = ("machine.cpu", "machine.cores", "machine.gpu", "machine.python")
RUN_ALL = MACHINE + (
    "plan", "command", "seconds",
    "dp_cost.workload", "dp_cost.seq_len", "dp_cost.ratio_hooks", "dp_cost.ratio_ghost",
    "dp_cost.median_step_seconds",
    "hardware_efficiency.matmul_peak_flops", "hardware_efficiency.flops_per_token",
    "hardware_efficiency.achieved_flops.non-private", "hardware_efficiency.achieved_flops.hooks",
    "hardware_efficiency.fraction_of_peak.non-private", "hardware_efficiency.fraction_of_peak.hooks",
    "simulation.workload.dataset", "simulation.workload.model", "simulation.workload.dp_epsilon",
    "simulation.workload.rows_per_client", "simulation.workload.clients_per_round", "simulation.workload.rounds",
    "simulation.workload.max_seq_len", "simulation.workload.batch_size", "simulation.workload.repeats",
    "simulation.summary.a_round_over_bare_training", "simulation.summary.a_round1_over_bare_training",
    "simulation.summary.b_reload_over_fedtune", "simulation.summary.c_peak_memory_1000_over_10",
    "simulation.summary.d_communication.full_model_bytes",
    *(f"simulation.summary.d_communication.{kind}.{field}" for kind in ("lora", "ffa_lora")
      for field in ("up_bytes", "down_bytes", "up_over_full_model", "down_over_full_model")),
    "simulation.summary.e_per_client_relative_to_cohort_10.fedtune",
    "simulation.summary.e_per_client_relative_to_cohort_10.cohort-5",
    "simulation.summary.e_per_client_relative_to_cohort_10.cohort-20",
    "simulation.summary.mean_round_seconds_steady.fedtune",
    "simulation.summary.mean_round_seconds_steady.fedtune-1000",
    "simulation.runs.fedtune[].registered", "simulation.runs.fedtune-1000[].registered",
)
CROSS_DEVICE = (
    *(f"cross_device.workload.{field}" for field in ("dataset", "model", "registered", "rows_per_client",
                                                      "clients_per_round", "dp_epsilon", "max_seq_len", "batch_size",
                                                      "held_out", "rounds", "repeats")),
    "cross_device.summary.flowertune_over_fedtune_round", "cross_device.summary.flowertune_over_fedtune_process",
    "cross_device.summary.ray_over_in_process_round",
    "cross_device.summary.round_seconds_steady.fedtune", "cross_device.summary.round_seconds_steady.flowertune",
    "cross_device.summary.process_seconds.fedtune", "cross_device.summary.process_seconds.fedtune-ray",
    "cross_device.summary.by_cohort[].clients_per_round", "cross_device.summary.by_cohort[].round_seconds",
    "cross_device.summary.by_cohort[].seconds_per_client",
    "cross_device.summary.by_registered[].registered", "cross_device.summary.by_registered[].round_seconds",
    "cross_device.runs.flowertune[].engine",
)
PFL = (
    "pfl.workload", "pfl.repeats", "pfl.fedtune_over_pfl_wall", "pfl.fedtune_over_pfl_round",
    "pfl.round_seconds_steady.fedtune", "pfl.round_seconds_steady.pfl",
    "pfl.final_accuracy.fedtune", "pfl.final_accuracy.pfl",
    "pfl.runs.fedtune[].rounds[].seconds", "pfl.runs.pfl[].rounds[].seconds",
)
LLM_MODES = ("fp32, hooks", "bf16, hooks", "bf16, ghost", "bf16, hooks, chunks of 4", "bf16, loop (per example)",
             "bf16, NON-PRIVATE")
SECAGG = MACHINE + ("results[].nodes", "results[].secure", "results[].round_seconds",
                    "results[].bytes_sent_per_node_round", "results[].bytes_received_per_node_round")
DEFAULT_RUN = MACHINE + ("workload", "runs.in-process[].wall_seconds", "runs.in-process[].accuracy",
                         "runs.in-process[].printed_lines", "runs.ray[].wall_seconds", "runs.ray[].accuracy",
                         "runs.ray[].printed_lines", "summary.ray_over_in_process")
POPULATION = MACHINE + (
    *(f"workload.{field}" for field in ("dataset", "model", "partitioner", "rows_per_client", "clients_per_round",
                                        "rounds", "repeats", "dp_epsilon", "held_out", "engine")),
    *(f"summary.by_registered[].{field}" for field in (
        "registered", "peak_memory_mb", "memory_over_smallest", "startup_seconds", "startup_over_smallest",
        "round_seconds_steady", "round_over_smallest", "process_seconds")),
)
PFL_COMPARE = MACHINE + tuple(field.removeprefix("pfl.") for field in PFL) + ("wall_seconds.fedtune", "wall_seconds.pfl",
                                                                              "runs.fedtune[].wall_seconds",
                                                                              "runs.pfl[].wall_seconds")
REQUIRED = {
    "default_run": DEFAULT_RUN,
    "population": POPULATION,
    "pfl_compare": PFL_COMPARE,
    "full": RUN_ALL + CROSS_DEVICE + PFL,
    "quick": RUN_ALL + PFL,
    "requick": RUN_ALL,
    "llm": MACHINE + ("workload",) + tuple(f"{field}.{mode}" for field in ("median_seconds_per_step", "ratio_to_fp32_hooks")
                                            for mode in LLM_MODES),
    "secagg": SECAGG,
    "distributed": SECAGG + ("results[].variant",),
    "dp": MACHINE + ("workload", "goal_hooks", "ratio_hooks", "ratio_ghost",
                     "median_step_seconds.non-private", "median_step_seconds.hooks", "median_step_seconds.ghost"),
    "simulation": MACHINE + (
        *(f"workload.{field}" for field in ("dataset", "model", "dp_epsilon", "max_seq_len", "batch_size",
                                            "rows_per_client", "clients_per_round", "rounds")),
        "summary.a_round_over_bare_training", "summary.a_round1_over_bare_training", "summary.b_reload_over_fedtune",
        "summary.c_peak_memory_1000_over_10", "summary.peak_memory_mb.fedtune", "summary.peak_memory_mb.fedtune-1000",
        "runs.fedtune.registered", "runs.fedtune-1000.registered"),
}
# Fields whose value may be null (no GPU is recorded as null).
NULLABLE = {"machine.gpu"}

LLM_LABELS = {
    "bf16, ghost": "bf16, ghost clipping",
    "bf16, hooks, chunks of 4": "bf16, hooks, physical chunks of 4",
    "bf16, loop (per example)": "bf16, loop (exact per-example gradients, what IA3 needs)",
}
ENGINES = {"ray": "on Ray", "auto": "in-process"}
VARIANT_LABELS = {
    "local": "local DP",
    "secagg": "local DP + SecAgg+",
    "distributed": "distributed DP",
    "distributed-sparse": "distributed DP, sparse key graph",
}


class RecordError(ValueError):
    """A record the page cannot be built from; the message is one line naming file and field."""


@dataclass(frozen=True)
class Record:
    """One committed JSON record: where it lives (as the page names it) and what it holds."""

    path: str
    data: dict

    def fail(self, problem: str) -> RecordError:
        """An error naming this record's file, for the caller to raise."""
        return RecordError(f"{self.path}: {problem}")


# ---- reading and checking the records ----------------------------------------------------


def _check(record: Record, value, parts: list[str], where: str) -> None:
    """Walk one dotted path down `value`, raising at the first step that is not there."""
    if not parts:
        if value is None and where not in NULLABLE:
            raise record.fail(f"field '{where}' is null")
        return
    step, many = (parts[0][:-2], True) if parts[0].endswith("[]") else (parts[0], False)
    here = f"{where}.{step}" if where else step
    if not isinstance(value, dict) or step not in value:
        raise record.fail(f"missing field '{here}'")
    value = value[step]
    if not many:
        _check(record, value, parts[1:], here)
        return
    if not isinstance(value, list) or not value:
        raise record.fail(f"field '{here}' should be a non-empty list")
    for index, item in enumerate(value):
        _check(record, item, parts[1:], f"{here}[{index}]")


def validate(record: Record, fields: tuple[str, ...]) -> None:
    """Every field the page reads is present (and not null): checked up front, by name."""
    for field in fields:
        _check(record, record.data, field.split("."), "")


def load(root: Path, name: str) -> Record:
    """One record, parsed and checked; a missing or unreadable file is one line too."""
    relative = RECORDS[name]
    record = Record(relative, {})
    try:
        data = json.loads((root / relative).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise record.fail("file not found") from None
    except (OSError, ValueError) as error:
        raise record.fail(f"not readable as JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise record.fail("expected a JSON object at the top level")
    record = Record(relative, data)
    validate(record, REQUIRED[name])
    return record


def load_all(root: Path = ROOT) -> dict[str, Record]:
    """Every record the page is built from, checked before any line is rendered."""
    return {name: load(root, name) for name in RECORDS}


# ---- formatting ------------------------------------------------------------------------


def _machine(record: Record) -> str:
    """The machine line of a record, as every report in this project writes it."""
    return machine_description(record.data["machine"])


def _goal(name: str, value: float) -> str:
    """'goal <= 1.1: met' for a ratio, from the goals run_all.py judges its table by."""
    comparison, threshold = GOALS[name]
    return f"goal {comparison} {threshold:g}: {verdict(name, value)}"


def _both(first: float, second: float) -> str:
    """'both cost about 1.6x' when two ratios print alike, else 'cost 1.5x and 1.7x'."""
    a, b = f"{first:.1f}x", f"{second:.1f}x"
    return f"both cost about {a}" if a == b else f"cost {a} and {b}"


def _kb(count: float) -> str:
    return f"{count / 1e3:,.0f} kB"


def _seconds_list(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _minutes(record: Record) -> str:
    return f"{record.data['seconds'] / 60:.1f} min"


def _percent_more(ratio: float) -> str:
    """1.165 -> '16%': how much larger, for prose ('grows by', 'adds')."""
    return f"{(ratio - 1) * 100:.0f}%"


# ---- sections --------------------------------------------------------------------------


def intro(records: dict[str, Record]) -> list[str]:
    """What the page is and how it is made: fixed text, no figures (every section takes the records)."""
    return [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks.report` from the JSON records in `docs/benchmark-runs/` and `docs/`; "
        "edit the records or `benchmarks/report.py`, not this page (`tests/test_committed_reports_benchmarks.py` "
        "fails when the two disagree). Every figure here is read from those records or computed from them, "
        "beside the command that wrote the record and the machine it ran on. Ratios are measured side by side "
        "in one run (both sides on the same batches or the same workload, interleaved). Timings are never "
        "asserted in tests.",
        "",
    ]


def default_run(records: dict[str, Record]) -> list[str]:
    """The README's first run on each engine: the default engine is the one measured faster."""
    record = records["default_run"]
    runs = record.data["runs"]
    inner, ray = runs["in-process"], runs["ray"]
    rows = [f"| {name} | {_seconds_list([r['wall_seconds'] for r in rs])} | "
            f"{', '.join(format(r['accuracy'], '.4f') for r in rs)} | {max(r['printed_lines'] for r in rs)} |"
            for name, rs in (("in-process (every core per client; the default)", inner),
                             ("Ray (one core per client, 2 workers)" if record.data["machine"]["cores"] == 2
                              else "Ray (one core per client)", ray))]
    repeats = len(inner)
    return [
        "## The first run: `fedtune simulate` with no arguments, on each engine (`benchmarks/default_run.py`)",
        "",
        f"`python benchmarks/default_run.py --repeats {repeats} --json {record.path}` on {_machine(record)}: the "
        "default config (BBC News, 5 clients, 5 rounds, epsilon 8) with `dp.noise_seed = 0`, so that both engines "
        "train the same clients with the same batches and noise; whole-process wall time, timed from outside; "
        f"the lines a run prints besides its progress bar. {repeats} run(s) per engine"
        + (" (one seed only)" if repeats == 1 else "") + ".",
        "",
        "| engine | wall time (s) | final accuracy | lines printed |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Ray takes {record.data['summary']['ray_over_in_process']:.2f}x the in-process time here, so the default "
        "gives every core to each client and `--engine auto` runs them one at a time in the simulation's own "
        "process; `--cpus-per-client 1` (or a GPU share) runs them on Ray.",
        "",
    ]


def population(records: dict[str, Record]) -> list[str]:
    """What the registered population costs, 10^3 to 10^6 clients."""
    record = records["population"]
    w, rows = record.data["workload"], record.data["summary"]["by_registered"]
    largest, smallest = rows[-1], rows[0]
    table_rows = [f"| {r['registered']:,} | {r['peak_memory_mb']:.0f} | {r['memory_over_smallest']:.3f} | "
                  f"{r['startup_seconds']:.1f} | {r['startup_over_smallest']:.2f} | {r['round_seconds_steady']:.2f} | "
                  f"{r['round_over_smallest']:.2f} | {r['process_seconds']:.1f} |" for r in rows]
    repeats = w["repeats"]
    return [
        "## A million registered clients on one host (`benchmarks/population.py`)",
        "",
        f"`python benchmarks/population.py --repeats {repeats} --json {record.path}` on {_machine(record)}: "
        f"{w['dataset']}, {w['model']}, the \"{w['partitioner']}\" partitioner ({w['rows_per_client']} rows per client, "
        f"drawn when a client is first sampled), {w['clients_per_round']} clients a round, {w['rounds']} rounds, "
        f"DP-SGD at epsilon {w['dp_epsilon']:g} per client, central evaluation on {w['held_out']} held-out rows, "
        f"engine {w['engine']}. Each population is one `fedtune simulate` process watched from outside: peak "
        "resident memory of its process tree (sampled every 50 ms), start-up (launch until round 1 begins), steady "
        f"rounds (2+, without evaluation). Medians of {repeats} run(s) per population, in ABBA order"
        + (" (one run only)" if repeats == 1 else "") + ".",
        "",
        f"| registered | peak memory (MiB) | vs {smallest['registered']:,} | start-up (s) | vs {smallest['registered']:,} "
        f"| steady round (s) | vs {smallest['registered']:,} | whole process (s) |",
        "|---|---|---|---|---|---|---|---|",
        *table_rows,
        "",
        f"At {largest['registered']:,} registered: memory {largest['memory_over_smallest']:.3f}x "
        f"({_goal('population_memory', largest['memory_over_smallest'])}), start-up "
        f"{largest['startup_over_smallest']:.2f}x ({_goal('population_startup', largest['startup_over_smallest'])}), "
        f"steady rounds {largest['round_over_smallest']:.2f}x ({_goal('population_round', largest['round_over_smallest'])}). "
        "Flower's engine registers the population as a range of node ids: a node's record and Context are made "
        "when the server first sends it a message, the server samples its cohort from the range, the engine's "
        "message loop asks only for nodes with a message waiting, and a client's rows are drawn from its own seed "
        "when it is sampled (`simulations/lazy_population.py`, `simulations/partition.py`).",
        "",
    ]


def pfl_steady(records: dict[str, Record]) -> list[str]:
    """fedtune against pfl-research with three runs per side, after the steady-round work."""
    record = records["pfl_compare"]
    data, runs = record.data, record.data["runs"]

    def listed(side: str, field: str, digits: int) -> str:
        return ", ".join(f"{r[field]:.{digits}f}" for r in runs[side])

    rows = [f"| {side} | {listed(side, 'wall_seconds', 1)} | {listed(side, 'round_seconds_steady', 2)} | "
            f"{listed(side, 'final_accuracy', 3)} |" for side in ("fedtune", "pfl")]
    wall, steady = data["fedtune_over_pfl_wall"], data["fedtune_over_pfl_round"]
    return [
        f"## Against pfl-research, {data['repeats']} runs per side (`benchmarks/pfl_compare.py`)",
        "",
        f"`python benchmarks/pfl_compare.py --repeats {data['repeats']} --json {record.path}` on {_machine(record)}, "
        f"in ABBA order: {data['workload']}.",
        "",
        "| side | whole process (s) | steady round (s) | final accuracy |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Medians: fedtune's whole process takes **{wall:.3f}x** pfl's ({_goal('pfl_wall', wall)}), its rounds 2+ "
        f"**{steady:.3f}x** ({_goal('pfl_round', steady)}). pfl's runs share one seed, so they end alike; fedtune "
        "draws its cohorts and central noise from secret randomness, so its runs differ by those draws.",
        "",
        "Where the last fraction of a second per round went (py-spy on fedtune's side of this workload): the "
        "fixed-cohort user-level epsilon was recomputed by dp-accounting after every round while every node waited "
        "(0.2 s; each event's RDP curve is now computed once and composed by addition, equal to dp-accounting's "
        "own composition); peft's state dict walked the whole base model three times per client call (25 ms; its "
        "views are now kept per model); the warnings filters were re-installed at each training call (10 ms); "
        "Flower's engine picked each round's messages up on its next 0.1 s tick (it now wakes when the server "
        "stores one). The ledgers' write-ahead charges and fsyncs are unchanged.",
        "",
    ]


def full_run(records: dict[str, Record]) -> list[str]:
    """The latest full `run_all.py` record: its ratio table and workloads, as run_all renders them."""
    full = records["full"]
    lines = [
        "## The simulator against pfl-research, cross-device, the engine",
        "",
        f"`{full.data['command']}` (record: `{full.path}`; its own rendering: `full.md` beside it) on "
        f"{_machine(full)}. {_minutes(full)}.",
        "",
    ]
    lines += table(full.data)
    lines += ["", "Workloads:", ""] + workloads(full.data) + [""]
    return lines + what_changed() + full_reading(full)


def what_changed() -> list[str]:
    """The changes the full run measures the result of; their own before/after runs are not recorded."""
    return [
        "### What changed before this run",
        "",
        "Each change below was measured with `benchmarks/pfl_compare.py` on the day it was made; those "
        "before/after runs are not among the committed records, so their figures are not repeated here. "
        "The full run above measures fedtune with all of them in place.",
        "",
        "| change | what it removes |",
        "|---|---|",
        "| `--engine auto`: one client at a time runs in the simulation's own process (`simulations/in_process.py`) "
        "| Ray's start, a second process importing torch and loading a second model, message pickling, Ray's shutdown |",
        "| every torch call of an in-process run on one thread (clients and the server's central evaluation) "
        "| later rounds slowing down: GNU OpenMP throttles its spinning once two thread teams exist |",
        "| Ray path: Ray started once with a worker set-up hook that imports the libraries and loads the base model "
        "as a worker starts | the imports and the model load inside round 1 |",
        "| the server polls for replies at a short interval that backs off (it was a fixed, longer interval) "
        "| most of the wait between a reply arriving and the server seeing it, per round and per evaluation |",
        "| partitions cached per worker process | cutting a client's rows from the whole table again on every call |",
        "| Flower's usage telemetry off (unless `FLWR_TELEMETRY_ENABLED` is set) "
        "| a call to telemetry.flower.ai at start and end |",
        "",
    ]


def _pfl_bullet(pfl: dict) -> str:
    """fedtune against pfl-research in the full run; the gap is stated only when a goal is missed."""
    wall, steady = pfl["fedtune_over_pfl_wall"], pfl["fedtune_over_pfl_round"]
    ours, theirs = pfl["round_seconds_steady"]["fedtune"], pfl["round_seconds_steady"]["pfl"]
    acc = pfl["final_accuracy"]
    accuracies = f"{', '.join(f'{a:.3f}' for a in acc['fedtune'])} vs {', '.join(f'{a:.3f}' for a in acc['pfl'])}"
    behind = f", by {ours - theirs:.1f} s a round" if verdict("pfl_round", steady) != "met" else ""
    seeds = ("; pfl's runs end at the same accuracy: they share one seed" if len(set(acc["pfl"])) == 1 < len(acc["pfl"])
             else "")
    return (f"- **pfl-research**: fedtune's whole process takes **{wall:.2f}x** pfl's ({_goal('pfl_wall', wall)}). "
            f"Rounds 2+ take **{steady:.2f}x** pfl's ({ours:.1f} s vs {theirs:.1f} s; {_goal('pfl_round', steady)}"
            f"{behind}). The final accuracies ({accuracies}) differ by the DP noise draws, as between any two "
            f"seeds{seeds}. What a fedtune round does beyond the clients' own training: Flower's engine picks "
            "messages up on a poll, the server polls for replies, the checkpoint and the ledger writes are "
            "fsynced, and each node wraps its training in a policy check, a write-ahead ledger charge and the "
            "adapter in and out.")


def _cross_device_bullets(xdev: dict) -> list[str]:
    """The cross-device, engine, cohort and population findings, each figure from the summary."""
    x, w = xdev["summary"], xdev["workload"]
    ratio, per = x["flowertune_over_fedtune_round"], w["clients_per_round"]
    ours, reload = x["round_seconds_steady"]["fedtune"], x["round_seconds_steady"]["flowertune"]
    this_cohort = next((c for c in x["by_cohort"] if c["clients_per_round"] == per), None)
    per_client = f" ({this_cohort['seconds_per_client']:.2f} s a client: its DP-SGD steps plus the call)" if this_cohort else ""
    engines = sorted({ENGINES.get(run["engine"], run["engine"]) for run in xdev["runs"]["flowertune"]})
    by_cohort = ", ".join(f"{c['clients_per_round']}: {c['round_seconds']:.1f} s" for c in x["by_cohort"])
    per_clients = ", ".join(f"{c['seconds_per_client']:.2f}" for c in x["by_cohort"])
    registered = x["by_registered"]
    by_registered = ", ".join(f"{r['registered']:,}: {r['round_seconds']:.1f} s" for r in registered)
    growth = registered[-1]["round_seconds"] / registered[0]["round_seconds"]
    return [
        f"- **Cross-device against the FlowerTune pattern**: **{ratio:.2f}x** ({_goal('cross_device', ratio)}). On "
        f"{w['registered']:,} clients of {w['rows_per_client']} rows, a fedtune round of {per} clients takes "
        f"{ours:.1f} s{per_client}. The FlowerTune pattern ({', '.join(engines)}, and a fresh base model and "
        f"tokenizer in every ClientApp call) takes {reload:.1f} s: reloading the base model costs about "
        f"{(reload - ours) / per:.2f} s a call here. The ratio is (training + reload) / training, so it reaches "
        f"{GOALS['cross_device'][1]:g} only where loading the model takes as long as a client's local training: a "
        f"much larger model, or a slower disk. Whole process: {x['flowertune_over_fedtune_process']:.2f}x.",
        f"- **Engine**: on this workload Ray rounds take {x['ray_over_in_process_round']:.2f}x the in-process ones "
        f"once warm; Ray's cost is at start and stop (whole process {x['process_seconds']['fedtune-ray']:.0f} s vs "
        f"{x['process_seconds']['fedtune']:.0f} s).",
        f"- **Cohort size**: a round grows linearly with the clients sampled ({by_cohort}; {per_clients} s a client).",
        f"- **Registered clients**: {by_registered} a round at {per} per round (+{_percent_more(growth)} from "
        f"{registered[0]['registered']:,} to {registered[-1]['registered']:,}). The growth is Flower's engine: on every "
        "poll it asks the link state for every registered node's messages (`vce_api.add_messages_to_queue`), and each "
        "ask scans the outstanding messages.",
    ]


def full_reading(full: Record) -> list[str]:
    """What the full run's figures say, every figure computed from its record."""
    sim = full.data["simulation"]
    many, few = (registered_clients(sim["runs"][name]) for name in ("fedtune-1000", "fedtune"))
    memory = sim["summary"]["c_peak_memory_1000_over_10"]
    return [
        "### Reading it",
        "",
        _pfl_bullet(full.data["pfl"]),
        *_cross_device_bullets(full.data["cross_device"]),
        f"- **Memory**: peak resident memory with {many:,} registered clients is {memory:.3f}x that with {few:,} "
        f"({_goal('memory', memory)}; the simulation rows of the table).",
        "- **Not done: several virtual clients per worker call.** Flower's engine hands a backend one `Message` for "
        "one node per call (`Backend.process_message`), and the ServerApp sends one message per sampled node. "
        "Batching several nodes into a call would mean going around Flower's messages, which is what makes the "
        "simulation the deployment's code.",
        "",
    ]


def registered_clients(runs) -> int:
    """Registered clients of a simulation variant: its runs are a list (repeats) or one run."""
    return (runs[0] if isinstance(runs, list) else runs)["registered"]


def _cohort_order(relative: dict, per_round: int) -> list[tuple[int, str]]:
    """(clients per round, variant) pairs in cohort order, for tables that put cohorts side by side."""
    return sorted((cohort_size(name, per_round), name) for name in relative)


def remeasured(records: dict[str, Record]) -> list[str]:
    """The quick re-run after the node-policy and strategy changes, beside the earlier quick run."""
    now, before = records["requick"], records["quick"]
    rows = [
        ("DP-SGD hooks / non-private step", lambda r: f"{r['dp_cost']['ratio_hooks']:.3f}x"),
        ("DP-SGD ghost / non-private step", lambda r: f"{r['dp_cost']['ratio_ghost']:.3f}x"),
        ("round time / bare local training, rounds 2+", lambda r: f"{r['simulation']['summary']['a_round_over_bare_training']:.3f}"),
        ("FlowerTune reload / fedtune round time", lambda r: f"{r['simulation']['summary']['b_reload_over_fedtune']:.3f}x"),
    ]
    many, few = (registered_clients(now.data["simulation"]["runs"][name]) for name in ("fedtune-1000", "fedtune"))
    rows.append((f"peak memory, {many:,} vs {few:,} registered clients",
                 lambda r: f"{r['simulation']['summary']['c_peak_memory_1000_over_10']:.3f}"))
    per_round = now.data["simulation"]["workload"]["clients_per_round"]
    order = _cohort_order(now.data["simulation"]["summary"]["e_per_client_relative_to_cohort_10"], per_round)
    rows.append((f"round time per client, cohort {' / '.join(str(size) for size, _ in order)}",
                 lambda r: " / ".join(f"{r['simulation']['summary']['e_per_client_relative_to_cohort_10'][name]:.2f}"
                                      for _, name in order)))
    lines = [
        "## Re-measured after the node-policy and strategy changes",
        "",
        f"`{now.data['command']}` (record: `{now.path}`; its table: the `.md` beside it) on {_machine(now)}: "
        f"{_minutes(now)}, {_goals_line(now.data)}. The earlier quick run beside it, `{before.data['command']}` "
        f"(record: `{before.path}`), ran on {_machine(before)}, so absolute times differ; the ratios are side by "
        "side within each run. Training now draws its own Poisson batches from secret generators, plans exact "
        "step counts, shares one loop for private and plain training, and every round goes through the strategy "
        "seam.",
        "",
        f"| ratio | this run ({now.data['machine']['cpu']}) | earlier quick run ({before.data['machine']['cpu']}) |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {cell(now.data)} | {cell(before.data)} |" for label, cell in rows]
    if "pfl" not in now.data:
        lines += ["", "pfl-research was not installed for this run (its record names no pfl version), so the "
                      "comparison with it was not re-run; the full run above has it."]
    return lines + [""]


def _goals_line(results: dict) -> str:
    """'every goal met' or the goals missed, over the checked ratios a quick dp+simulation run has."""
    s = results["simulation"]["summary"]
    checked = {"dp_hooks": results["dp_cost"]["ratio_hooks"], "simulation_round": s["a_round_over_bare_training"],
               "reload": s["b_reload_over_fedtune"], "memory": s["c_peak_memory_1000_over_10"]}
    missed = [name for name, value in checked.items() if verdict(name, value) != "met"]
    return "every goal met" if not missed else f"goals not met: {', '.join(missed)}"


def llm(records: dict[str, Record]) -> list[str]:
    """The bundled LLM's training-call time per mode."""
    record = records["llm"]
    seconds, ratios = record.data["median_seconds_per_step"], record.data["ratio_to_fp32_hooks"]
    lines = [
        "## The bundled LLM: precision, per-sample mode, chunks (`benchmarks/llm_step.py`)",
        "",
        f"`python benchmarks/llm_step.py --json {record.path}` on {_machine(record)}. Workload: "
        f"{record.data['workload']}; fedtune's own training call on the same Poisson batches in every mode.",
        "",
        "| mode | seconds / step | vs fp32 Opacus hooks |",
        "|---|---|---|",
    ]
    for mode in seconds:
        if mode not in ratios:
            raise record.fail(f"missing field 'ratio_to_fp32_hooks.{mode}'")
        lines.append(f"| {LLM_LABELS.get(mode, mode)} | {seconds[mode]:.2f} | {ratios[mode]:.2f}x |")
    hooks = seconds["bf16, hooks"]
    lines += [
        "",
        f"Reading it: bf16 autocast is the lever on this CPU ({seconds['fp32, hooks'] / hooks:.1f}x faster than fp32 "
        "with hooks). DP-SGD with Opacus hooks costs nothing measurable on the LLM: the per-sample work is on the "
        f"LoRA tensors only, and the non-private row ({seconds['bf16, NON-PRIVATE']:.2f} s) is within this run's noise "
        f"of it ({hooks:.2f} s; a few steps per mode). Physical chunks cost nothing at this size "
        f"({seconds['bf16, hooks, chunks of 4']:.2f} s); they only cap memory. Ghost clipping (a second backward pass) "
        f"and the per-example loop {_both(seconds['bf16, ghost'] / hooks, seconds['bf16, loop (per example)'] / hooks)} "
        "hooks in bf16. That is why `loop` is the mode for IA3 "
        "only, and hooks stays the default.",
        "",
    ]
    return lines


def _by_nodes(record: Record) -> dict[int, list[dict]]:
    """The record's results grouped by cohort size, in the order they ran."""
    groups: dict[int, list[dict]] = {}
    for result in record.data["results"]:
        groups.setdefault(result["nodes"], []).append(result)
    return groups


def _round_name(record: Record) -> str:
    """Which round's wall time the tables give: the last (round 1 carries Ray's start)."""
    return f"round {len(record.data['results'][0]['round_seconds'])}"


def secagg(records: dict[str, Record]) -> list[str]:
    """SecAgg+ on vs off, per cohort size."""
    record = records["secagg"]
    groups = _by_nodes(record)
    nodes = ",".join(str(n) for n in groups)
    lines = [
        "## Secure aggregation: SecAgg+ on vs off (`benchmarks/secagg_overhead.py`)",
        "",
        f"`python benchmarks/secagg_overhead.py --nodes {nodes} --json {record.path}` on {_machine(record)}. The same "
        "workload and seeds in both variants (the one fixed in `benchmarks/secagg_overhead.py`: tweets, "
        "all-MiniLM-L6-v2 + LoRA, DP-SGD, every node in every round, federated evaluation), run back to back; "
        f"{_round_name(record)}'s wall time; bytes counted on the server's grid, both ways, per node per round.",
        "",
        "| nodes | round time off | round time on | ratio | bytes up off / on | bytes down off / on |",
        "|---|---|---|---|---|---|",
    ]
    ratios, uploads = {}, []
    for n, results in groups.items():
        off, on = _pair(record, n, results)
        ratios[n] = on["round_seconds"][-1] / off["round_seconds"][-1]
        uploads.append(on["bytes_received_per_node_round"] / off["bytes_received_per_node_round"])
        lines.append(f"| {n} | {off['round_seconds'][-1]:.1f} s | {on['round_seconds'][-1]:.1f} s | {ratios[n]:.2f}x | "
                     f"{off['bytes_received_per_node_round'] / 1e3:,.0f} / {_kb(on['bytes_received_per_node_round'])} | "
                     f"{off['bytes_sent_per_node_round'] / 1e3:,.0f} / {_kb(on['bytes_sent_per_node_round'])} |")
    return lines + ["", secagg_reading(ratios, uploads), ""]


def _pair(record: Record, nodes: int, results: list[dict]) -> tuple[dict, dict]:
    """The off and on runs of one cohort size."""
    off = [r for r in results if not r["secure"]]
    on = [r for r in results if r["secure"]]
    if not off or not on:
        raise record.fail(f"results for {nodes} nodes need one run with secure false and one with secure true")
    return off[0], on[0]


def secagg_reading(ratios: dict[int, float], uploads: list[float]) -> str:
    """Why SecAgg+ costs what it does: the ratios per cohort size and the upload growth, computed."""
    *small, largest = sorted(ratios)
    added = " and ".join(f"{_percent_more(ratios[n])}" for n in small)
    return (f"Reading: at {' and '.join(str(n) for n in small)} nodes the protocol adds {added} to a round; at "
            f"{largest} it takes {ratios[largest]:.2f}x as long, because with the default share fraction every node "
            "shares keys with every other (SecAgg's full graph: key agreements, encryptions and mask expansions "
            "quadratic in the cohort, every round), and the survivor-set consistency round that makes the protocol "
            "hold against a lying server adds one more exchange of small encrypted confirmations, also quadratic "
            f"(the kB a node's traffic grows by at {largest} nodes); a smaller share fraction (SecAgg+'s sparse "
            f"graph) is the lever for large cohorts. Upload grows {min(uploads):.2f}x to {max(uploads):.2f}x: a "
            "masked update is a vector of wide integers where the plain update is single-precision floats, and the "
            "keys, shares and confirmations add to it. Download counts the training payload and the "
            "federated-evaluation broadcast.")


def distributed(records: dict[str, Record]) -> list[str]:
    """Distributed DP beside local DP and SecAgg+, per cohort size."""
    record = records["distributed"]
    groups = _by_nodes(record)
    variants = list(dict.fromkeys(r["variant"] for r in record.data["results"]))
    lines = [
        "## Distributed DP: its cost beside local DP and SecAgg+ (`benchmarks/secagg_overhead.py --variants`)",
        "",
        f"`python benchmarks/secagg_overhead.py --nodes {','.join(str(n) for n in groups)} --variants "
        f"{','.join(variants)} --json {record.path}` on {_machine(record)}. The workload of the section above, "
        "each variant run back to back for each cohort size: local DP in plain messages; local DP inside SecAgg+; "
        "distributed DP over SecAgg+ with the full key graph; the same with SecAgg+'s sparse graph. "
        f"{_round_name(record).capitalize()}'s wall time; bytes counted on the server's grid, both ways, per node "
        "per round.",
        "",
        "| nodes | variant | round time | vs local DP | bytes up | bytes down |",
        "|---|---|---|---|---|---|",
    ]
    seconds = {}
    for n, results in groups.items():
        base = _variant(record, n, results, "local")
        for result in results:
            seconds[n, result["variant"]] = result["round_seconds"][-1]
            lines.append(f"| {n} | {VARIANT_LABELS.get(result['variant'], result['variant'])} | "
                         f"{result['round_seconds'][-1]:.1f} s | "
                         f"{result['round_seconds'][-1] / base['round_seconds'][-1]:.2f}x | "
                         f"{_kb(result['bytes_received_per_node_round'])} | {_kb(result['bytes_sent_per_node_round'])} |")
    return lines + ["", distributed_reading(record, seconds, max(groups)), ""]


def _variant(record: Record, nodes: int, results: list[dict], variant: str) -> dict:
    """The run of `variant` for one cohort size: the base each row is divided by."""
    for result in results:
        if result["variant"] == variant:
            return result
    raise record.fail(f"results for {nodes} nodes have no '{variant}' variant to compare with")


def distributed_reading(record: Record, seconds: dict, largest: int) -> str:
    """Where distributed DP's time goes; the sparse graph's saving is computed at the largest cohort."""
    full, sparse = seconds.get((largest, "distributed")), seconds.get((largest, "distributed-sparse"))
    saved = (f": {(full - sparse) / full * 100:.0f}% of the round at {largest} nodes" if full and sparse else "")
    return ("Reading: a distributed round is one DP-SGD step, a local round a whole local epoch, so the rows' "
            "compute is smaller in distributed mode; what it adds is the noise share. The node draws an exact "
            "discrete Gaussian per coordinate of the padded (power-of-two) update with OpenDP's sampler from secure "
            "randomness (`fedtune.privacy.ddgauss.noise_share`), a cost that grows with the adapter's padded size, "
            f"and the {record.data['machine']['cores']} cores serve the nodes' shares one after another. The upload "
            "grows by the padding to a power of two and by the wide masked integers. The sparse graph saves key "
            f"agreements{saved}. An adapter of fewer parameters makes the sampler's share small: see the study in "
            "`docs/results-distributed.md`.")


def one_command(records: dict[str, Record]) -> list[str]:
    """How to re-run everything, with the times the records took, and what each script measures."""
    full, quick = records["full"], records["quick"]
    dp, hw, xw = full.data["dp_cost"], full.data["hardware_efficiency"], full.data["cross_device"]["workload"]
    many, few = (registered_clients(full.data["simulation"]["runs"][name]) for name in ("fedtune-1000", "fedtune"))
    pfl_version = full.data["machine"].get("pfl")
    install = [f"pip install --no-deps pfl=={pfl_version} prv-accountant==0.2.0      # pfl-research, for the comparison"
               ] if pfl_version else []
    return [
        "## All of them in one command: `benchmarks/run_all.py`",
        "",
        "```bash",
        *install,
        f"python benchmarks/run_all.py --quick --out docs/benchmark-runs   # {_minutes(quick)} on {quick.data['machine']['cpu']}",
        f"python benchmarks/run_all.py --out docs/benchmark-runs           # the full run: {_minutes(full)} on "
        f"{full.data['machine']['cpu']}",
        "python -m benchmarks.report                                      # this page, from the records",
        "```",
        "",
        "Each run writes `quick|full.md` (its table and workloads) and `quick|full.json` (every raw timing, the "
        "machine, library versions). `--only dp,simulation,pfl` runs a subset; `--report-only` runs nothing and "
        "regenerates this page. The pieces:",
        "",
        "| script | measures | how the two sides are kept comparable |",
        "|---|---|---|",
        f"| `dp_overhead.py` | DP-SGD step / non-private step (Opacus hooks, ghost clipping) | "
        f"{len(dp['median_step_seconds'])} copies of the model step on the same batches, order rotated every step |",
        "| `hardware_efficiency.py` | achieved training FLOP/s / matmul peak | peak measured on the same machine and "
        f"dtype just before; FLOPs counted from the model config ({hw['flops_per_token'] / 1e6:.1f} MFLOP per token "
        f"for MiniLM at sequence {dp['seq_len']}) |",
        "| `simulation_efficiency.py` | round time / bare training; FlowerTune reload pattern; memory "
        f"{many:,} vs {few:,} clients; bytes per client per round vs full model (LoRA, FFA-LoRA); round time vs cohort "
        "| `fedtune simulate` variants of one workload (same seed: same clients, same Poisson batches), repeated in "
        "ABBA order |",
        f"| `cross_device.py` | {xw['registered']:,} clients x {xw['rows_per_client']} rows, {xw['clients_per_round']} "
        "per round: fedtune vs the FlowerTune reload pattern, in-process vs Ray, round time vs cohort size and vs "
        "registered clients | `fedtune simulate` variants of one workload (same seed), ABBA order |",
        "| `pfl_compare.py` | fedtune vs pfl-research: whole-process wall time, steady round time, final accuracy | "
        "same model and initial adapter, same clients holding the same rows, same cohort, same local steps and "
        "optimizer, same central Gaussian DP (clip, noise multiplier), same evaluation code; each side its own "
        "process, ABBA order |",
        "",
    ]


def earlier_quick(records: dict[str, Record]) -> list[str]:
    """The earlier quick run in full: its table, workloads and what it said then."""
    quick = records["quick"]
    lines = [
        f"### Earlier quick run ({quick.data['machine']['cpu']})",
        "",
        f"`{quick.data['command']}` (record: `{quick.path}`) on {_machine(quick)}. {_minutes(quick)}.",
        "",
    ]
    lines += table(quick.data)
    return lines + ["", "Workloads:", ""] + workloads(quick.data) + [""] + earlier_reading(quick)


def earlier_reading(quick: Record) -> list[str]:
    """What the earlier quick run said, every figure computed from its record."""
    data = quick.data
    dp, hw, s = data["dp_cost"], data["hardware_efficiency"], data["simulation"]["summary"]
    fractions = sorted(hw["fraction_of_peak"][mode] for mode in ("non-private", "hooks"))
    lora, ffa = s["d_communication"]["lora"], s["d_communication"]["ffa_lora"]
    full_mb = s["d_communication"]["full_model_bytes"] / 1e6
    per_round = data["simulation"]["workload"]["clients_per_round"]
    relative = s["e_per_client_relative_to_cohort_10"]
    cohorts = ", ".join(f"{size}: {relative[name]:.2f}" for size, name in _cohort_order(relative, per_round))
    many, few = (registered_clients(data["simulation"]["runs"][name]) for name in ("fedtune-1000", "fedtune"))
    steady = s["mean_round_seconds_steady"]
    return [
        "### Reading it",
        "",
        f"- **DP cost is small with hooks ({dp['ratio_hooks']:.2f}x)** because LoRA's per-sample gradients are "
        f"adapter-sized; ghost clipping ({dp['ratio_ghost']:.2f}x) pays a second backward through the frozen network, "
        "so hooks stay the default.",
        f"- **Hardware efficiency {fractions[0]:.2f}-{fractions[1]:.2f}** of the matmul peak this CPU reaches "
        f"({hw['matmul_peak_flops'] / 1e9:.0f} GFLOP/s measured; {hw['achieved_flops']['non-private'] / 1e9:.0f} "
        "GFLOP/s achieved without DP). The rest goes to attention softmax, layer norms, GELU and the "
        "per-sample-gradient einsums, which do not run at GEMM speed on a CPU.",
        f"- **Simulation overhead {s['a_round_over_bare_training']:.2f}x** of bare training from round 2 "
        f"({_goal('simulation_round', s['a_round_over_bare_training'])}); round 1 pays Ray start and the first model "
        f"load per worker ({s['a_round1_over_bare_training']:.1f}x).",
        f"- **FlowerTune reload pattern {s['b_reload_over_fedtune']:.2f}x slower** "
        f"({data['simulation']['workload']['repeats']} repeat(s) per variant); the gap grows with the base model's load time.",
        f"- **Communication**: a LoRA client moves {lora['up_over_full_model'] * 100:.2f}% of the full model's bytes "
        f"each way per round ({_kb(lora['up_bytes'])} of {full_mb:.1f} MB); FFA-LoRA uploads "
        f"{ffa['up_bytes'] / lora['up_bytes']:.2f} of that ({_kb(ffa['up_bytes'])}, "
        f"{ffa['up_over_full_model'] * 100:.2f}%): A is frozen and never travels after the first contact, which is "
        f"why its average download ({_kb(ffa['down_bytes'])}) sits between.",
        f"- **Scale**: peak memory with {many:,} registered clients is {s['c_peak_memory_1000_over_10']:.2f}x that with "
        f"{few:,} ({_goal('memory', s['c_peak_memory_1000_over_10'])}); round time per client relative to "
        f"{per_round} per round: {cohorts}. Not in the table but in the record: a round with {many:,} registered "
        f"clients took {steady['fedtune-1000']:.1f} s vs {steady['fedtune']:.1f} s with {few:,}.",
        _earlier_pfl(data["pfl"]),
        "",
    ]


def _earlier_pfl(pfl: dict) -> str:
    """The earlier pfl-research comparison, with round 1 of each side from the raw runs."""
    wall, steady = pfl["fedtune_over_pfl_wall"], pfl["fedtune_over_pfl_round"]
    first = {side: _seconds_list([run["rounds"][0]["seconds"] for run in pfl["runs"][side]]) for side in ("fedtune", "pfl")}
    acc = pfl["final_accuracy"]
    return (f"- **pfl-research was faster on this workload: fedtune took {wall:.2f}x its wall time and {steady:.2f}x "
            f"its steady round time** ({_goal('pfl_wall', wall)}; {_goal('pfl_round', steady)}), at accuracy "
            f"{', '.join(f'{a:.3f}' for a in acc['fedtune'])} vs {', '.join(f'{a:.3f}' for a in acc['pfl'])}. "
            f"Round 1 took {first['fedtune']} s in fedtune (Ray's start and each worker's first model load) against "
            f"{first['pfl']} s in pfl. pfl's published speed-ups are against frameworks that reload models and "
            "pickle full state per client; fedtune avoids both, so the remaining gap was Flower's and Ray's "
            "per-message cost, the price of running the same ClientApp in simulation and deployment. The full run "
            "at the top of this page compares the two on a larger workload with the changes listed there.")


def gpu(records: dict[str, Record]) -> list[str]:
    """Whether any record ran on a GPU, and how to get GPU figures."""
    on_gpu = [record.path for record in records.values() if record.data["machine"].get("gpu")]
    status = ("No GPU was available to any run recorded here, so no GPU figures exist yet." if not on_gpu
              else f"Runs recorded on a GPU: {', '.join(f'`{path}`' for path in on_gpu)}.")
    return [
        "### GPU",
        "",
        f"{status} The GPU path is in place and tested where it can be without one: CUDA placement "
        "(`model.device = \"auto\"`), several virtual clients per GPU by default through Ray GPU fractions "
        "(`--gpus-per-client`), and bf16 autocast under Opacus (`training.precision = \"bf16\"`, exercised on CPU "
        "by `tests/test_accelerator.py`; the CUDA tests there skip without a GPU). On a GPU host, "
        "`python benchmarks/run_all.py` measures the same ratios there (the DP and FLOP/s benchmarks use CUDA when "
        "present; the matmul peak is measured in the training dtype); compare `fedtune simulate "
        "--gpus-per-client` at a fraction of a GPU and at a whole one for clients per GPU.",
        "",
    ]


def single_runs(records: dict[str, Record]) -> list[str]:
    """The earliest records: one benchmark script each, on their own."""
    return ["## Earlier single-benchmark runs", ""] + dp_single(records["dp"]) + simulation_single(records["simulation"])


def dp_single(record: Record) -> list[str]:
    """The standalone DP-SGD overhead run, its ms and ratios from the record."""
    data = record.data
    step = data["median_step_seconds"]
    base = step["non-private"]
    hooks = step["hooks"] / base
    return [
        "### DP-SGD overhead (`benchmarks/dp_overhead.py`)",
        "",
        f"Command: `python benchmarks/dp_overhead.py --json {record.path}`",
        "",
        f"Workload: {data['workload']}.",
        "",
        f"Machine: {_machine(record)}.",
        "",
        "| mode | median step | ratio to non-private | goal |",
        "| --- | --- | --- | --- |",
        f"| non-private | {base * 1e3:.0f} ms | {1:.3f}x | |",
        f"| DP, Opacus hooks (default) | {step['hooks'] * 1e3:.0f} ms | **{hooks:.3f}x** | <= {data['goal_hooks']:.2f}x |",
        f"| DP, ghost clipping | {step['ghost'] * 1e3:.0f} ms | {step['ghost'] / base:.3f}x | reported |",
        "",
        "Why hooks win here: LoRA's per-sample gradients are tiny (the adapter is low-rank), so materialising them "
        "costs little, while ghost clipping pays a second backward pass through the whole frozen network. This is "
        "why `dp.grad_sample_mode = \"hooks\"` is the default; ghost clipping stays available for large trainable "
        "layers (e.g. a big head or full fine-tuning).",
        "",
    ]


def simulation_single(record: Record) -> list[str]:
    """The standalone simulation-efficiency run: ratios (a) to (c) from the record."""
    data = record.data
    w, s = data["workload"], data["summary"]
    memory = s["peak_memory_mb"]
    many, few = data["runs"]["fedtune-1000"]["registered"], data["runs"]["fedtune"]["registered"]
    reload = s["b_reload_over_fedtune"]
    return [
        "### Simulation efficiency",
        "",
        f"`python benchmarks/simulation_efficiency.py --rounds {w['rounds']} --json {record.path}` runs "
        f"{len(data['runs'])} `fedtune simulate` processes one after another on the same workload ({w['dataset']}, "
        f"{w['model']}, DP-SGD epsilon {w['dp_epsilon']:g}, seq {w['max_seq_len']}, batch {w['batch_size']}, "
        f"{w['rows_per_client']} rows per client, {w['clients_per_round']} clients sampled per round, same seed: same "
        "clients, same Poisson batches; clients run one at a time so parallelism hides nothing). Machine: "
        f"{_machine(record)}.",
        "",
        "| ratio | measured | goal |",
        "|---|---|---|",
        f"| (a) round wall time (without evaluation) / summed bare local training of the round's clients, rounds "
        f"2-{w['rounds']} | **{s['a_round_over_bare_training']:.3f}** | <= {GOALS['simulation_round'][1]:.2f}: "
        f"{verdict('simulation_round', s['a_round_over_bare_training'])} |",
        f"| (a') the same for round 1 (Ray start, first model load per worker) | {s['a_round1_over_bare_training']:.3f} | - |",
        f"| (b) FlowerTune pattern (fresh base model every ClientApp call) / fedtune, rounds 2-{w['rounds']} | "
        f"**{reload:.3f}x** | speed-up reported |",
        f"| (c) peak resident memory (server + Ray workers), {many:,} vs {few:,} registered clients | "
        f"**{s['c_peak_memory_1000_over_10']:.3f}** ({memory['fedtune-1000']:,.0f} vs {memory['fedtune']:,.0f} MB) | "
        f"<= {GOALS['memory'][1]:g}: {verdict('memory', s['c_peak_memory_1000_over_10'])} |",
        "",
        f"Reading (b) honestly: on this workload reloading a fresh base model (from local files) in every call costs "
        f"{(reload - 1) * 100:.0f}% of a round. The gap is the model-load time per call, so it grows with the base "
        "model: a larger model takes far longer to load, while the small encoder here is what this CPU machine can "
        "train. Memory stays flat with registered clients because a client's state is a ledger file on disk and "
        "partitions are materialised only when a client is sampled.",
    ]


SECTIONS = (intro, default_run, population, pfl_steady, full_run, remeasured, llm, secagg, distributed, one_command, earlier_quick, gpu, single_runs)


def render(root: Path = ROOT) -> str:
    """The whole page from the records under `root`, as text; writes nothing."""
    records = load_all(root)
    lines = [line for section in SECTIONS for line in section(records)]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the page (or, with --check, compare it); a bad record is one line and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root holding docs/ (default: this checkout)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if docs/benchmarks.md differs")
    args = parser.parse_args(argv)
    try:
        text = render(args.root)
    except RecordError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    page = args.root / PAGE
    if args.check:
        current = page.read_text(encoding="utf-8") if page.exists() else ""
        if current != text:
            print(f"{PAGE} is not what its records give: run python -m benchmarks.report", file=sys.stderr)
            return 1
        print(f"{PAGE} matches its records")
        return 0
    page.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE} from {len(RECORDS)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
