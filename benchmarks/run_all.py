"""Every fedtune benchmark in one command: a markdown table of ratios plus the raw JSON.

Runs, on the same machine in one go (each ratio measured side by side, interleaved):

  DP cost              DP-SGD step / non-private step, Opacus hooks and ghost clipping
                       (dp_overhead.py: same batches, modes rotated every step)
  hardware efficiency  achieved training FLOP/s / measured matrix-multiply peak
                       (hardware_efficiency.py, from the DP benchmark's step times)
  simulation           round time / bare local training; the FlowerTune reload pattern;
                       memory with 1,000 vs 10 registered clients; bytes per client per round
                       vs the full model (LoRA, FFA-LoRA); round time vs clients per round
                       (simulation_efficiency.py: `fedtune simulate` variants, ABBA order)
  cross-device         1,000 clients x 20 rows, 10 per round: fedtune vs the FlowerTune reload
                       pattern, in-process vs Ray, round time vs cohort size and vs registered
                       clients (cross_device.py)
  pfl-research         fedtune vs pfl on an identical FedAvg + central-DP workload: wall time,
                       round time, final accuracy (pfl_compare.py; needs
                       `pip install --no-deps pfl==0.6.0 prv-accountant==0.2.0`)

    python benchmarks/run_all.py --quick          # under 15 minutes on a 2-core CPU
    python benchmarks/run_all.py                  # the full run (about 30 minutes there)
    python benchmarks/run_all.py --out DIR        # where RUN.md / RUN.json go (default runs/benchmarks)
    python -m benchmarks.report                   # no runs: docs/benchmarks.md from the committed records

The machine (CPU, cores, GPU, library versions) heads both files: a ratio means little
without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fedtune.system.atomic import atomic_write_json, atomic_write_text  # noqa: E402
from fedtune.system.machine import machine, machine_description  # noqa: E402

PLANS = {
    "quick": {"dp_steps": 6, "sim_rounds": 3, "sim_repeats": 1, "cohorts": (5, 20), "pfl": "QUICK", "pfl_repeats": 1,
              "xdev_rounds": 3, "xdev_repeats": 1},
    "full": {"dp_steps": 12, "sim_rounds": 4, "sim_repeats": 2, "cohorts": (5, 20), "pfl": "FULL", "pfl_repeats": 2,
             "xdev_rounds": 4, "xdev_repeats": 2},
}
SECTIONS = ("dp", "simulation", "cross-device", "pfl")

# What each checked ratio is held to: (comparison, threshold). One table, so that the
# ratio table here and the reading in docs/benchmarks.md (benchmarks/report.py) judge a
# figure against the same goal.
GOALS = {
    "dp_hooks": ("<=", 1.10),
    "simulation_round": ("<=", 1.15),
    "reload": (">=", 1.0),
    "memory": ("<=", 1.1),
    "cross_device": (">=", 2.0),
    "pfl_wall": ("<=", 1.0),
    "pfl_round": ("<=", 1.0),
    "population_memory": ("<=", 1.1),
    "population_startup": ("<=", 1.2),
    "population_round": ("<=", 1.2),
}


def _met(value: float, goal: float, lower_is_better: bool = True) -> str:
    return "met" if (value <= goal if lower_is_better else value >= goal) else "**not met**"


def verdict(name: str, value: float) -> str:
    """'met' or '**not met**' for a ratio against its goal in GOALS."""
    comparison, threshold = GOALS[name]
    return _met(value, threshold, comparison == "<=")


def cohort_size(name: str, per_round: int) -> int:
    """The clients per round of a simulation variant: 'cohort-5' -> 5; the base variant runs the workload's own."""
    return int(name.split("-")[1]) if name.startswith("cohort-") else per_round


def table(results: dict) -> list[str]:
    """One row per ratio: what it is, the figure, the goal and whether it is met."""
    rows = []
    dp = results.get("dp_cost")
    if dp:
        rows.append(("DP cost: DP-SGD (Opacus hooks) step / non-private step", f"{dp['ratio_hooks']:.3f}x",
                     f"<= {GOALS['dp_hooks'][1]:.2f}x: {verdict('dp_hooks', dp['ratio_hooks'])}"))
        rows.append(("DP cost: DP-SGD (ghost clipping) step / non-private step", f"{dp['ratio_ghost']:.3f}x", "reported"))
    hw = results.get("hardware_efficiency")
    if hw:
        for mode in ("non-private", "hooks"):
            rows.append((f"Hardware: achieved training FLOP/s / matmul peak ({mode})",
                         f"{hw['fraction_of_peak'][mode]:.2f} ({hw['achieved_flops'][mode] / 1e9:.0f} / "
                         f"{hw['matmul_peak_flops'] / 1e9:.0f} GFLOP/s)", "reported"))
    sim = results.get("simulation")
    if sim:
        s = sim["summary"]
        per_round = sim["workload"]["clients_per_round"]
        rows.append(("Simulation: round wall time / summed bare local training (rounds 2+)",
                     f"{s['a_round_over_bare_training']:.3f}",
                     f"<= {GOALS['simulation_round'][1]:.2f}: {verdict('simulation_round', s['a_round_over_bare_training'])}"))
        rows.append(("Simulation: the same, round 1 (Ray start, first model load)", f"{s['a_round1_over_bare_training']:.3f}", "reported"))
        rows.append(("FlowerTune pattern (model reloaded every call) / fedtune round time",
                     f"{s['b_reload_over_fedtune']:.3f}x",
                     f">= {GOALS['reload'][1]:g} (fedtune faster): {verdict('reload', s['b_reload_over_fedtune'])}"))
        comm = s["d_communication"]
        for label, name in (("lora", "LoRA"), ("ffa_lora", "FFA-LoRA")):
            c = comm[label]
            rows.append((f"Communication, {name}: bytes per client per round / full-model bytes (up; down)",
                         f"{c['up_over_full_model']:.5f}; {c['down_over_full_model']:.5f} "
                         f"({c['up_bytes'] / 1e3:.0f} kB; {c['down_bytes'] / 1e3:.0f} kB of {comm['full_model_bytes'] / 1e6:.1f} MB)",
                         "reported"))
        rows.append(("Scale: peak resident memory, 1,000 vs 10 registered clients", f"{s['c_peak_memory_1000_over_10']:.3f}",
                     f"<= {GOALS['memory'][1]:g}: {verdict('memory', s['c_peak_memory_1000_over_10'])}"))
        relative = s["e_per_client_relative_to_cohort_10"]
        cohorts = sorted(relative, key=lambda name: cohort_size(name, per_round))
        rows.append((f"Scale: round time per client vs clients per round (relative to {per_round} per round)",
                     ", ".join(f"{cohort_size(name, per_round)}: {relative[name]:.2f}" for name in cohorts),
                     "~1.0 = linear in the cohort"))
    xdev = results.get("cross_device")
    if xdev:
        x, w = xdev["summary"], xdev["workload"]
        rows.append((f"Cross-device ({w['registered']:,} clients x {w['rows_per_client']} rows, {w['clients_per_round']} per round): "
                     "FlowerTune pattern / fedtune round time", f"{x['flowertune_over_fedtune_round']:.2f}x",
                     f">= {GOALS['cross_device'][1]:g}: {verdict('cross_device', x['flowertune_over_fedtune_round'])}"))
        rows.append(("Cross-device: FlowerTune pattern / fedtune whole process", f"{x['flowertune_over_fedtune_process']:.2f}x",
                     "reported"))
        rows.append(("Cross-device: fedtune on Ray / fedtune in-process round time", f"{x['ray_over_in_process_round']:.2f}x",
                     "reported"))
        rows.append((f"Cross-device: round time (s) vs clients per round ({w['registered']:,} registered)",
                     ", ".join(f"{c['clients_per_round']}: {c['round_seconds']:.2f}" for c in x["by_cohort"]), "reported"))
        rows.append((f"Cross-device: round time (s) vs registered clients ({w['clients_per_round']} per round)",
                     ", ".join(f"{c['registered']:,}: {c['round_seconds']:.2f}" for c in x["by_registered"]), "reported"))
    pfl = results.get("pfl")
    if pfl and "skipped" not in pfl:
        acc = pfl["final_accuracy"]
        rows.append(("fedtune / pfl-research wall time (whole process, identical workload)", f"{pfl['fedtune_over_pfl_wall']:.3f}x",
                     f"<= {GOALS['pfl_wall'][1]:g}: {verdict('pfl_wall', pfl['fedtune_over_pfl_wall'])}"))
        rows.append(("fedtune / pfl-research round time (rounds 2+)", f"{pfl['fedtune_over_pfl_round']:.3f}x",
                     f"<= {GOALS['pfl_round'][1]:.1f}: {verdict('pfl_round', pfl['fedtune_over_pfl_round'])}"))
        rows.append(("Final held-out accuracy, fedtune vs pfl", f"{', '.join(f'{a:.3f}' for a in acc['fedtune'])} vs "
                     f"{', '.join(f'{a:.3f}' for a in acc['pfl'])}", "same workload, same evaluation code"))
    elif pfl:
        rows.append(("fedtune vs pfl-research", "skipped", pfl["skipped"]))
    lines = ["| ratio | measured | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return lines


def workloads(results: dict) -> list[str]:
    """One bullet per measured section: the workload behind its ratios, from the results."""
    lines = []
    if "dp_cost" in results:
        lines.append(f"- DP cost and hardware: {results['dp_cost']['workload']}.")
    if "simulation" in results:
        w = results["simulation"]["workload"]
        lines.append(f"- Simulation: `fedtune simulate` on {w['dataset']}, {w['model']}, DP-SGD epsilon {w['dp_epsilon']}, "
                     f"{w['rows_per_client']} rows per client, {w['clients_per_round']} clients per round, {w['rounds']} rounds, "
                     f"seq {w['max_seq_len']}, batch {w['batch_size']}, {w['repeats']} repeat(s) per variant in ABBA order.")
    if "cross_device" in results:
        w = results["cross_device"]["workload"]
        lines.append(f"- Cross-device: `fedtune simulate` on {w['dataset']}, {w['model']}, {w['registered']:,} clients x "
                     f"{w['rows_per_client']} rows, {w['clients_per_round']} per round, DP-SGD epsilon {w['dp_epsilon']}, "
                     f"seq {w['max_seq_len']}, batch {w['batch_size']}, {w['held_out']} held-out rows, {w['rounds']} rounds "
                     f"(round 1 left out), {w['repeats']} repeat(s) per variant in ABBA order.")
    if "pfl" in results and "workload" in results["pfl"]:
        lines.append(f"- pfl-research: {results['pfl']['workload']}; {results['pfl']['repeats']} run(s) per side, ABBA order.")
    return lines


def render(results: dict) -> str:
    lines = [f"# fedtune benchmarks ({results['plan']} run)", "",
             f"Machine: {machine_description(results['machine'])}.", "",
             f"Command: `{results['command']}`; took {results['seconds'] / 60:.1f} min.", ""]
    lines += table(results)
    lines += ["", "Workloads:", ""] + workloads(results)
    lines += ["", "Section times: " + ", ".join(f"{k} {v:.0f} s" for k, v in results["section_seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads, one repeat (< 15 min on 2 cores)")
    parser.add_argument("--out", default="runs/benchmarks", help="folder for quick|full.md and .json (default runs/benchmarks)")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    plan_name = "quick" if args.quick else "full"
    plan = PLANS[plan_name]
    wanted = set(SECTIONS) if not args.only else {s.strip() for s in args.only.split(",")}
    unknown = wanted - set(SECTIONS)
    if unknown:
        print(f"error: --only = {args.only!r}: expected names from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {"plan": plan_name, "machine": machine(), "command": "python benchmarks/run_all.py"
                     + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else ""), "section_seconds": {}}

    def section(name: str, run) -> None:
        began = time.perf_counter()
        print(f"[run_all] {name} ...", flush=True)
        results[name] = run()
        results["section_seconds"][name] = time.perf_counter() - began

    if "dp" in wanted:
        from dp_overhead import measure as dp_measure
        from hardware_efficiency import efficiency

        section("dp_cost", lambda: dp_measure(steps=plan["dp_steps"]))
        section("hardware_efficiency", lambda: efficiency(results["dp_cost"]))
    if "simulation" in wanted:
        from simulation_efficiency import measure as sim_measure

        section("simulation", lambda: sim_measure(plan["sim_rounds"], plan["sim_repeats"], plan["cohorts"]))
    if "cross-device" in wanted:
        from cross_device import measure as xdev_measure

        section("cross_device", lambda: xdev_measure(plan["xdev_rounds"], plan["xdev_repeats"]))
    if "pfl" in wanted:
        if importlib.util.find_spec("pfl") is None:
            results["pfl"] = {"skipped": "pfl is not installed: pip install --no-deps pfl==0.6.0 prv-accountant==0.2.0"}
        else:
            import pfl_compare

            section("pfl", lambda: pfl_compare.compare(getattr(pfl_compare, plan["pfl"]), plan["pfl_repeats"]))
    results["seconds"] = time.perf_counter() - started
    atomic_write_json(out / f"{plan_name}.json", results)
    text = render(results)
    atomic_write_text(out / f"{plan_name}.md", text)
    print(text)
    print(f"wrote {out / (plan_name + '.md')} and {out / (plan_name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
