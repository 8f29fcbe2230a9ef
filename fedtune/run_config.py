"""`flwr run ... --run-config "dp.target-epsilon=3 training.rounds=10"`: Flower run-config
keys onto a fedtune `Config`, with the CLI's validation and one-line errors.

Flower only accepts `--run-config` keys that the app's `pyproject.toml` declares under
`[tool.flwr.app.config]`, so each app declares every field it takes, spelled the Flower way
(`section.key-with-hyphens`). The deployment app (the repository's `pyproject.toml`) holds
real values there, the default federation's, for every field the server decides
(`declaration_toml(..., defaults=...)`; a Flower user edits them in place), and `""` for
the fields each node decides. The simulation app (`simulations/flwr_app/pyproject.toml`)
declares every core field and the fields of the harness's own table as `""`: not set, the
TOML named by `config` (or the harness's default) decides; the harness passes its fields in
as `extra` (field name -> type annotation, "simulation.<field>" -> int, say): the core never
names them, and stores their values in the config's harness table
(`fedtune.config.HARNESS_TABLES`) for the harness to validate. Tests keep both blocks equal
to what `declaration_toml` prints.

Precedence: defaults < the app's pyproject values < the `config` TOML < values typed with
`--run-config` (Flower fuses pyproject and typed values; the deployment ServerApp passes the
typed keys, `Run.override_config`, so a TOML is not overridden by values nobody typed).

Fields a node decides (`fedtune.privacy.policy.OWNERS`: its data, its accountant, its cap,
its noise seed, ...) are refused here with a one-line error: a run config is the operator's,
and even in a simulation the nodes' own settings come from the nodes' side
(`FEDTUNE_SIMULATION_POLICY` in a `flwr run` simulation), never from the run config or the
`config` TOML it names. Lists (`lora.target-modules`,
`data.labels`) travel as comma-separated text, because Flower's run config holds only
scalars.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Collection, Mapping, get_origin, get_type_hints

from fedtune.config import HARNESS_TABLES, SECTIONS, Config, load_config, load_toml, toml_value
from fedtune.errors import ConfigError
from fedtune.privacy.policy import NODE, OWNERS

CONFIG_KEY = "config"    # path of the fedtune TOML (the base the run config overrides)
RUN_DIR_KEY = "run-dir"  # where the run writes
LOG_TO_KEY = "log-to"    # experiment trackers (fedtune.reporting.tracking), e.g. "tensorboard,mlflow"
RESERVED = (CONFIG_KEY, RUN_DIR_KEY, LOG_TO_KEY)
UNSET = ""               # a declared key left at this value sets nothing


def flower_key(field: str) -> str:
    """`dp.target_epsilon` -> `dp.target-epsilon` (Flower's spelling of config keys)."""
    section, name = field.split(".", 1)
    return f"{section}.{name.replace('_', '-')}"


def _fields() -> list[tuple[str, Any]]:
    return [(f"{section}.{f.name}", get_type_hints(kind)[f.name])
            for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)]


FIELD_OF_KEY: dict[str, str] = {flower_key(name): name for name, _ in _fields()}
_LIST_FIELDS = {name for name, hint in _fields() if get_origin(hint) is tuple}
GENERATOR = "python -m fedtune.run_config"  # prints the deployment app's block


def _extra_fields(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """A harness's table fields (`table.field` -> annotation), checked to name a harness
    table of the core (`fedtune.config.HARNESS_TABLES`) and no core field: a bug otherwise."""
    extra = dict(extra or {})
    for name in extra:
        if name.split(".", 1)[0] not in HARNESS_TABLES or "." not in name:
            raise ValueError(f"extra run-config field {name!r}: expected table.field of a harness table "
                             f"({', '.join(HARNESS_TABLES)})")
    return extra


def declared_keys(extra: Mapping[str, Any] | None = None) -> list[str]:
    """Every run-config key an app declares: one per fedtune field, in config order, then
    one per `extra` field (a harness table's, for the app of that harness)."""
    return [flower_key(name) for name, _ in _fields()] + [flower_key(name) for name in _extra_fields(extra)]


def declaration_toml(run_dir: str, extra: Mapping[str, Any] | None = None, generator: str = GENERATOR,
                     defaults: Config | None = None) -> str:
    """The `[tool.flwr.app.config]` block of an app's pyproject file (`extra`: as for
    `declared_keys`; `generator`: the command that prints it, named in the block).

    With `defaults` (the deployment app: the default federation), every field the server
    decides holds its real value, to be edited in `pyproject.toml` or overridden with
    `--run-config` as Flower users do; node-owned fields stay `""` (a value there is
    refused). Without, every field is `""`: the `config` TOML (else the app's default) decides."""
    lines = ["[tool.flwr.app.config]", f'{CONFIG_KEY} = ""', f'{RUN_DIR_KEY} = "{run_dir}"', f'{LOG_TO_KEY} = ""']
    if defaults is None:
        lines.append(f"# every fedtune field, \"\" = not set (the `config` TOML decides); generated by `{generator}`")
        return "\n".join(lines + [f'{key} = ""' for key in declared_keys(extra)]) + "\n"
    values = defaults.to_dict()
    lines.append(f"# what the server decides, edit here or --run-config; generated by `{generator}`")
    decided, node_owned = [], []
    for name, _ in _fields():
        section, field = name.split(".", 1)
        if OWNERS[name][0] == NODE:
            node_owned.append(f'{flower_key(name)} = ""')
        else:
            value = values[section][field]
            text = toml_value(",".join(map(str, value)) if isinstance(value, (list, tuple)) else value)
            decided.append(f"{flower_key(name)} = {text}")
    lines += decided + ["# decided by each node (its policy file, `fedtune client`): a value here is refused"]
    return "\n".join(lines + node_owned) + "\n"


def overrides(run_config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> list[tuple[str, str, Any]]:
    """(section, key, value) for every run-config key that is set, checked: unknown keys
    and node-owned fields are refused, in one line each. `extra` fields (a harness table's)
    are taken as they are, for the harness to validate: a node never receives them."""
    extra = _extra_fields(extra)
    extra_of_key = {flower_key(name): name for name in extra}
    result = []
    for key, value in run_config.items():
        if key in RESERVED or (isinstance(value, str) and value == UNSET):
            continue
        field = FIELD_OF_KEY.get(key) or extra_of_key.get(key) or (key if key in OWNERS or key in extra else None)
        if field is None:
            raise ConfigError(f"run config: unknown key {key!r} (expected section.key as in the config, e.g. "
                              "dp.target-epsilon=3 or training.rounds=10)")
        if field in extra:
            listed = get_origin(extra[field]) is tuple
        else:
            owner, why = OWNERS[field]
            if owner == NODE:
                raise ConfigError(f"run config: {key} = {value!r}: refused, each node decides this ({why}); set it "
                                  "in the node's own config, never in the run config")
            listed = field in _LIST_FIELDS
        if listed and isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        section, name = field.split(".", 1)
        result.append((section, name, value))
    return result


def config_from_run_config(run_config: Mapping[str, Any], default_path: str | Path | None = None,
                           extra: Mapping[str, Any] | None = None, typed: Collection[str] | None = None) -> Config:
    """The run's config: the `config` TOML (else `default_path`, else the built-in
    defaults), then every run-config value that is set, validated as the CLI validates
    (`extra`: as for `overrides`; their values land in the config's harness table).

    `typed` (the deployment app, whose pyproject.toml holds real values): the keys given with
    `flwr run --run-config` (Flower's `Run.override_config`). Flower hands the app its
    pyproject values and those fused; with `typed` the precedence is built-in defaults <
    pyproject.toml < the `config` TOML < `--run-config`, so a named TOML is not overridden
    by values nobody typed."""
    base = str(run_config.get(CONFIG_KEY) or "") or (str(default_path) if default_path else None)
    changes = overrides(run_config, extra)
    if typed is None or not run_config.get(CONFIG_KEY):
        return load_config(base, changes)
    written, typed = load_toml(base), set(typed)

    def in_toml(section: str, name: str) -> bool:
        return isinstance(written.get(section), dict) and name in written[section]

    def was_typed(section: str, name: str) -> bool:
        return f"{section}.{name}" in typed or flower_key(f"{section}.{name}") in typed

    shipped = [c for c in changes if not was_typed(c[0], c[1]) and not in_toml(c[0], c[1])]
    return load_config(base, shipped + [c for c in changes if was_typed(c[0], c[1])])


def log_to_of(run_config: Mapping[str, Any]) -> tuple[str, ...]:
    """The run config's `log-to` trackers, checked (`fedtune.reporting.tracking.parse_log_to`)."""
    from fedtune.reporting.tracking import parse_log_to

    return parse_log_to(str(run_config.get(LOG_TO_KEY, "")), source=f"run config {LOG_TO_KEY}")


def main(argv: list[str] | None = None) -> int:
    """Print the deployment app's declaration block (to paste into the repository's
    pyproject.toml): `RUN_DIR [DEFAULTS_TOML]`, the server's values from DEFAULTS_TOML (the
    repository's is simulations/default.toml, the default federation);
    `python -m simulations.settings RUN_DIR` prints the simulation app's."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    defaults = load_config(args[1]) if len(args) > 1 else None
    print(declaration_toml(args[0] if args else "runs/federation", defaults=defaults,
                           generator=f"{GENERATOR} {' '.join(args)}"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
