"""`fedtune simulate` and `fedtune sweep`: the simulation harness's commands, registered
with the core CLI through the `fedtune.commands` entry points (pyproject.toml)."""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.cli import NODE_SECTIONS, add_config_flags, config_flags, config_from_args
from fedtune.reporting.tracking import parse_log_to
from simulations.defaults import default_config_path
from simulations.settings import simulation_flags, simulation_settings

# the nodes' and the federation's fields, and the harness's own [simulation] table (--num-clients, ...)
SIMULATE_FLAGS = {**config_flags(NODE_SECTIONS + ("federation",)), **simulation_flags()}
DEFAULT_TEXT = ("simulations/default.toml (BBC News, 5 clients, all 5 every round, 5 rounds, epsilon 8); with "
                "--task instruct, simulations/instruct.toml (SmolLM2-135M-Instruct on tweets-instruct, 5 clients)")


def register_simulate(subparsers) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="federated fine-tuning of virtual clients on this host (Flower simulation engine)",
        description=f"Run a federation of virtual clients with Flower's simulation engine. With no arguments: {DEFAULT_TEXT}.",
    )
    add_config_flags(parser, SIMULATE_FLAGS, "TOML config (default: simulations/default.toml, or "
                     "simulations/instruct.toml with --task instruct)")
    parser.add_argument("--cpus-per-client", type=float, default=None,
                        help="Ray CPUs per virtual client (default: every core, so clients run one at a time in this "
                             "process, the faster engine measured on a small CPU host; 1 with a GPU share)")
    parser.add_argument("--gpus-per-client", type=float, default=None,
                        help="Ray GPU fraction per virtual client (default: 0.25 when CUDA is present, so four "
                             "clients share each GPU; 0 without one)")
    parser.add_argument("--out", help="run directory (default: runs/simulate-<time>)")
    add_run_flags(parser)
    parser.set_defaults(run=run_simulate)


def add_run_flags(parser) -> None:
    """How a simulation runs and what it reports to (`simulate`, and each `sweep` cell)."""
    parser.add_argument("--engine", default="auto", choices=("auto", "in-process", "ray"),
                        help="where virtual clients run: in this process, one at a time (no Ray), or on Flower's Ray "
                             "backend (parallel workers, GPU shares, clusters); auto = in-process when Ray would run "
                             "one client at a time (--cpus-per-client >= the cores, no GPU share, no cluster)")
    parser.add_argument("--log-to", default="", metavar="TRACKERS",
                        help="experiment trackers fed each round's record, written inside the run directory: "
                             "tensorboard, mlflow, wandb (offline), comma-separated (pip install -e \".[tracking]\")")


def run_simulate(args) -> int:
    config = config_from_args(args, default_file=default_config_path(args.task))  # before torch and Flower load
    simulation_settings(config)  # so is a mistake in [simulation]
    log_to = parse_log_to(args.log_to)
    from simulations.run import simulate

    out = Path(args.out) if args.out else Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    simulate(config, out, args.cpus_per_client, args.gpus_per_client, log_to=log_to, engine=args.engine)
    return 0


def register_sweep(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="utility-vs-privacy grid of simulations (resumable) with a centralized baseline",
        description="Run one simulation per cell of the grid (epsilon x clients x partition x FFA x seed) "
        "on top of a base config; a re-run skips finished cells. Before any cell runs it prints how many cells "
        "there are, how many are finished and an estimate of the time left, from the mean time of the finished "
        "cells (--dry-run prints only that, with the grid). Writes results.csv, results.md and "
        "results.png with the centralized non-private baseline as the reference row.",
    )
    add_config_flags(parser, SIMULATE_FLAGS, "base TOML config (default: simulations/default.toml)")
    parser.add_argument("--epsilons", default="1,3,8,inf", help="target epsilons; inf = non-private (default 1,3,8,inf)")
    parser.add_argument("--clients", help="numbers of clients (default: the base config's)")
    parser.add_argument("--partitions", default="iid", help="iid and/or Dirichlet alphas, e.g. iid,0.3 (default iid)")
    parser.add_argument("--ffa-modes", dest="ffa_modes", default="off", help="FFA-LoRA off and/or on (default off)")
    parser.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2 (default 0)")
    parser.add_argument("--out", default="runs/sweep", help="sweep directory (default runs/sweep)")
    parser.add_argument("--cpus-per-client", type=float, default=None,
                        help="Ray CPUs per virtual client, in every cell (default as for simulate)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the grid (each cell done or to run) and the time estimate; run and write nothing")
    add_run_flags(parser)
    parser.set_defaults(run=run_sweep)


def run_sweep(args) -> int:
    config = config_from_args(args, default_file=default_config_path())
    settings = simulation_settings(config)
    from simulations.sweep import grid, plan_sweep, sweep

    log_to = parse_log_to(args.log_to)  # before any cell runs
    cells = grid(args.epsilons, args.clients or str(settings.num_clients), args.partitions,
                 args.ffa_modes, args.seeds)
    if args.dry_run:
        plan = plan_sweep(config, cells, args.out)
        print(f"[sweep] dry run: {len(cells)} cells into {args.out}; nothing runs and nothing is written")
        print("\n".join(plan.grid_lines()))
        print(plan.summary())
        return 0
    cpus = ("--cpus-per-client", str(args.cpus_per_client)) if args.cpus_per_client is not None else ()
    sweep(config, cells, args.out, simulate_args=(*cpus, "--engine", args.engine,
                                                  *(("--log-to", ",".join(log_to)) if log_to else ())))
    return 0
