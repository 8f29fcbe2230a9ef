"""The simulation harness's own settings: the [simulation] table of a fedtune config.

    [simulation]
    num_clients = 10          # --num-clients, --set simulation.num_clients=10
    partitioner = "dirichlet" # --partitioner
    dirichlet_alpha = 0.3     # --alpha
    central_holdout = 0.15

How many virtual clients there are, how one dataset is cut among them, which Ray runs them
and what share the server keeps back to score on mean nothing to a deployed federation, so
they are not fields of the core's `Config`: the core keeps the table as written
(`fedtune.config.HARNESS_TABLES`) so that it travels with a config (a run directory's
config.toml, a sweep cell, a `flwr run` run config), and this module owns its fields, their
defaults and their checks. Read it with `simulation_settings(config)`, change it with
`with_simulation(config, ...)`; both validate, with the core's one-line errors
(`fedtune.config.coerce_value`, `config_error`). The table is never part of a node's policy
or of a server's request: nodes are sent the core's sections only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from fedtune.config import Config, coerce_value, config_error
from fedtune.errors import ConfigError

TABLE = "simulation"  # the config table these settings live in (one of fedtune.config.HARNESS_TABLES)
PARTITIONERS = ("iid", "dirichlet", "natural", "files", "sampled")


def setting(default: Any, help: str, flag: str | None = None) -> Any:
    """A simulation setting with its help and, optionally, its `fedtune simulate` / `sweep`
    flag, declared once as the core's fields declare theirs (`fedtune.config.opt`): the
    flags and their help are generated from it. No owner: nodes never see these."""
    return field(default=default, metadata={"help": help, "flag": flag})


@dataclass(frozen=True)
class SimulationSettings:
    num_clients: int = setting(3, "Simulation: virtual clients and how the dataset is split among them.",
                               flag="num_clients")
    partitioner: str = setting(
        "iid", "\"iid\", \"dirichlet\" (over labels, alpha below), \"natural\" (one client per value of "
        "partition_column, e.g. a hospital id), \"files\" (one client per file in client_files) or \"sampled\" (each "
        "client holds rows_per_client rows drawn from the pool by a seed of its own, made when the client is first "
        "sampled: a cross-device population larger than the data, whose clients may share rows). With natural and "
        "files the number of clients is the number of values / files.", flag="partitioner")
    dirichlet_alpha: float = setting(0.5, "Dirichlet concentration over labels: small = skewed clients.", flag="alpha")
    partition_column: str = setting("", "The column whose values make the clients of the \"natural\" partitioner.")
    client_files: str = setting(
        "", "A folder of per-client data files (.csv / .jsonl / .parquet), taken in name order.")
    ray_address: str = setting(
        "", "Ray: \"\" starts a local Ray for the simulation; \"auto\" or \"HOST:PORT\" attaches to a running Ray "
        "cluster (its workers must have fedtune installed).")
    central_holdout: float = setting(
        0.0, "Central evaluation: this share of the dataset kept back before partitioning, on which the server scores "
        "each new global adapter (federation.central_eval_path names a file instead). With neither, evaluation is "
        "federated (sampled clients' validation splits).")
    rows_per_client: int = setting(
        0, "Simulation, IID or Dirichlet: give each client this many training rows (a seeded sample of the pool left "
        "after the held-out share), 0 = split the whole pool; \"sampled\": each client's rows, drawn for it alone. The held-out set does not depend on it, so runs that "
        "differ only here are scored on the same rows: a data-per-client curve.", flag="rows_per_client")

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise config_error(f"{TABLE}.num_clients", self.num_clients, "a whole number > 0")
        if self.partitioner not in PARTITIONERS:
            raise config_error(f"{TABLE}.partitioner", self.partitioner, f"one of {', '.join(PARTITIONERS)}")
        if self.partitioner == "natural" and not self.partition_column:
            raise config_error(f"{TABLE}.partition_column", self.partition_column,
                               "a column name when partitioner = 'natural'")
        if self.partitioner == "files" and not self.client_files:
            raise config_error(f"{TABLE}.client_files", self.client_files,
                               "a folder of per-client files when partitioner = 'files'")
        if not self.dirichlet_alpha > 0:
            raise config_error(f"{TABLE}.dirichlet_alpha", self.dirichlet_alpha, "a number > 0")
        if not 0 <= self.central_holdout < 1:
            raise config_error(f"{TABLE}.central_holdout", self.central_holdout, "a number in [0, 1) (0 = none)")
        if self.rows_per_client < 0:
            raise config_error(f"{TABLE}.rows_per_client", self.rows_per_client,
                               "a whole number >= 0 (0 = split the whole pool)")
        if self.partitioner == "sampled" and not self.rows_per_client:
            raise config_error(f"{TABLE}.rows_per_client", self.rows_per_client,
                               "a whole number > 0 with partitioner = 'sampled' (each client's rows)")
        if self.rows_per_client and self.partitioner in ("natural", "files"):
            raise config_error(f"{TABLE}.rows_per_client", self.rows_per_client,
                               f"0 with partitioner = {self.partitioner!r} (its clients' sizes are the data's)")

    def check_against(self, config: Config) -> None:
        """What the settings and the core config must agree on: a round samples its cohort
        from the virtual clients, so there must be at least that many."""
        if self.num_clients < config.federation.clients_per_round:
            raise config_error(f"{TABLE}.num_clients", self.num_clients,
                               f"at least federation.clients_per_round = {config.federation.clients_per_round}")


_HINTS: dict[str, Any] = get_type_hints(SimulationSettings)

# The table's fields as the core's Flower run config takes them (`fedtune.run_config`'s
# `extra`): the simulation app declares them (simulation.num-clients, ...), the deployment
# app does not.
RUN_CONFIG_FIELDS: dict[str, Any] = {f"{TABLE}.{name}": hint for name, hint in _HINTS.items()}


def simulation_settings(config: Config) -> SimulationSettings:
    """The validated settings of `config`'s [simulation] table (defaults for what it does not
    set), checked against the core config. An unknown key, a value of the wrong type or out
    of range is a one-line `ConfigError` naming `simulation.<key>`."""
    table = getattr(config, TABLE)
    for key in table:
        if key not in _HINTS:
            raise ConfigError(f"unknown key {TABLE}.{key} (known: {', '.join(_HINTS)})")
    settings = SimulationSettings(**{key: coerce_value(f"{TABLE}.{key}", value, _HINTS[key])
                                     for key, value in table.items()})
    settings.check_against(config)
    return settings


def settings_table(settings: SimulationSettings) -> dict[str, Any]:
    """Every field of `settings`, defaults included: the table a run records, so a report or
    a resume reads what ran rather than what the defaults were at the time."""
    return dataclasses.asdict(settings)


def with_simulation(config: Config, **changes: Any) -> Config:
    """`config` with its [simulation] table resolved (every field written, defaults included)
    and `changes` applied, validated as `simulation_settings` validates. With no changes:
    the table a run saves in its config.toml."""
    changed = config.replace(**{TABLE: {**getattr(config, TABLE), **changes}})
    return config.replace(**{TABLE: settings_table(simulation_settings(changed))})


def moved_from_federation(raw: dict[str, Any]) -> dict[str, Any]:
    """A config written before these settings left [federation] (a finished sweep cell's
    cell.toml), as it reads today: its simulation keys moved into [simulation]. Only for
    what the harness itself recorded; a user's TOML with them is refused by the core."""
    federation = raw.get("federation")
    if not isinstance(federation, dict) or not set(federation) & set(_HINTS):
        return raw
    moved = {name: dict(values) if isinstance(values, dict) else values for name, values in raw.items()}
    table = moved.setdefault(TABLE, {})
    for key in [key for key in federation if key in _HINTS]:
        table.setdefault(key, moved["federation"].pop(key))
    return moved


def simulation_flags() -> dict[str, tuple[str, str, type]]:
    """The `fedtune simulate` / `sweep` flags of the settings that name one (--num-clients,
    --partitioner, --alpha, --rows-per-client), as the core makes its own
    (`fedtune.cli.section_flags`): each becomes a `simulation.<name>` override."""
    from fedtune.cli import section_flags

    return section_flags(TABLE, SimulationSettings)


def main(argv: list[str] | None = None) -> int:
    """Print the simulation app's run-config declaration block (to paste into
    simulations/flwr_app/pyproject.toml): the core's fields and this table's."""
    import sys

    from fedtune.run_config import declaration_toml

    args = sys.argv[1:] if argv is None else argv
    print(declaration_toml(args[0] if args else "runs/flwr-simulation", RUN_CONFIG_FIELDS,
                           generator="python -m simulations.settings RUN_DIR"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
