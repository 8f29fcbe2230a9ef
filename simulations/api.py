"""`fedtune.simulate(...)`: a simulation from a notebook, returning its tables.

    import fedtune
    result = fedtune.simulate({"dp.target_epsilon": 3, "training.rounds": 2, "simulation.num_clients": 5})
    result.metrics[["round", "accuracy", "epsilon_max"]]    # one row per round
    result.ledger.groupby("client").epsilon_after.max()     # every client's own ledger
    result.run_dir                                          # config.toml, adapter/, summary.md

The same run as `fedtune simulate`: the same defaults (`simulations/default.toml`), the
same validation (a bad key or value raises `fedtune.errors.ConfigError` with the CLI's one
line), the same run directory. Registered with the core through the `fedtune.api` entry
point, so the core never imports the harness.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from fedtune.config import Config, build_config, load_config, merge_overrides
from fedtune.errors import ConfigError
from fedtune.reporting.frames import RunResult, load_run
from simulations.defaults import default_config_path
from simulations.settings import simulation_settings


def _override_list(overrides: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """`{"dp.target_epsilon": 3}` or `{"dp": {"target_epsilon": 3}}` (hyphens allowed, as
    in a Flower run config) -> (section, key, value) triples."""
    result = []
    for name, value in overrides.items():
        if isinstance(value, Mapping):
            result += [(str(name), str(key).replace("-", "_"), v) for key, v in value.items()]
            continue
        section, dot, key = str(name).partition(".")
        if not dot or not key:
            raise ConfigError(f"overrides: {name!r}: expected section.key (e.g. \"dp.target_epsilon\") or a "
                              "{section: {key: value}} table")
        result.append((section, key.replace("-", "_"), value))
    return result


def resolve_config(config: Config | str | Path | Mapping | None = None,
                   overrides: Mapping[str, Any] | None = None) -> Config:
    """A Config from what a notebook passes: nothing (the default simulation), a TOML path,
    a Config, or a mapping of overrides (on the default); `overrides` go on top."""
    if isinstance(config, Mapping):
        config, overrides = None, {**config, **(overrides or {})}
    extra = _override_list(overrides or {})
    if isinstance(config, Config):
        resolved = build_config(merge_overrides(config.to_dict(), extra), source="overrides")
    elif config is not None and not isinstance(config, (str, Path)):
        raise ConfigError(f"config = {type(config).__name__}: expected a TOML path, a fedtune Config, "
                          "or a mapping of overrides")
    else:
        resolved = load_config(config or default_config_path(), extra)
    simulation_settings(resolved)  # a mistake in [simulation] ("simulation.num_clients": 0) raises here too
    return resolved


def simulate(config: Config | str | Path | Mapping | None = None, overrides: Mapping[str, Any] | None = None, *,
             out: str | Path | None = None, cpus_per_client: float | None = None, gpus_per_client: float | None = None,
             log_to: str | tuple[str, ...] = (), engine: str = "auto", log=print) -> RunResult:
    """Run a federation of virtual clients on this host and return its tables
    (`fedtune.reporting.frames.RunResult`: metrics, ledger, clients DataFrames and the run dir).
    `log_to`: "tensorboard,mlflow,wandb" or a tuple of them (`fedtune.reporting.tracking`); `engine`:
    "auto", "in-process" or "ray" (as `fedtune simulate --engine`)."""
    from simulations.run import simulate as run_simulation

    resolved = resolve_config(config, overrides)
    run_dir = Path(out) if out else Path("runs") / time.strftime("simulate-%Y%m%d-%H%M%S")
    run_simulation(resolved, run_dir, cpus_per_client, gpus_per_client, log=log,
                   log_to=log_to, engine=engine)
    return load_run(run_dir)
