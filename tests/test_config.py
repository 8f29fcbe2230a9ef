"""Config: TOML + overrides, and one-line rejection naming the key and value."""

import pytest

from fedtune.config import build_config, check_against_data, load_config, parse_override
from fedtune.errors import ConfigError


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[dp]\ntarget_epsilon = 3\n[lora]\nrank = 4\ntarget_modules = ["query"]\n')
    config = load_config(path, [parse_override("lora.rank=16"), parse_override("data.dataset=tweets")])
    assert config.dp.target_epsilon == 3.0 and config.lora.rank == 16
    assert config.lora.target_modules == ("query",) and config.data.dataset == "tweets"
    assert build_config(_reparse(config.to_toml())) == config  # the saved config reloads identically


def _reparse(text):
    import tomllib

    return tomllib.loads(text)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"dp": {"target_epsilon": 0}}, "dp.target_epsilon = 0"),
        ({"dp": {"target_epsilon": -2.5}}, "dp.target_epsilon = -2.5"),
        ({"lora": {"rank": 0}}, "lora.rank = 0"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate = 0"),
        ({"training": {"batch_size": -1}}, "training.batch_size = -1"),
        ({"dp": {"accountant": "gdp"}}, "dp.accountant = 'gdp'"),
        ({"lora": {"rnk": 8}}, "unknown key lora.rnk"),
        ({"loraa": {"rank": 8}}, "unknown section \\[loraa\\]"),
        ({"lora": {"rank": "eight"}}, "lora.rank = 'eight': expected a whole number"),
        ({"model": {"task": "translation"}}, "model.task = 'translation'"),
    ],
)
def test_bad_values_name_key_and_value(raw, message):
    with pytest.raises(ConfigError, match=message):
        build_config(raw)


def test_checks_against_the_data():
    with pytest.raises(ConfigError, match="dp.delta = 0.01: expected less than 1/n"):
        check_against_data(build_config({"dp": {"delta": 0.01}}), 200)
    with pytest.raises(ConfigError, match="training.batch_size = 64: expected at most the 50"):
        check_against_data(build_config({"training": {"batch_size": 64}}), 50)


def test_bad_toml_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[dp\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_every_field_carries_its_help_and_the_flags_come_from_it():
    import dataclasses

    from fedtune.cli import config_flags
    from fedtune.config import SECTIONS, Config

    for section, kind in SECTIONS.items():
        for f in dataclasses.fields(kind):
            assert f.metadata.get("help"), f"{section}.{f.name} has no help"
    flags = config_flags(tuple(SECTIONS))
    defaults = Config().to_dict()
    for name, (key, text, _) in flags.items():
        section, field = key.split(".")
        assert f"default {defaults[section][field]!r}" in text, name  # help never drifts from the default
    assert flags["lora_alpha"][0] == "lora.alpha"
    assert all(not key.startswith("simulation.") for key, _, _ in flags.values())  # the harness adds its own


def test_a_simulation_setting_in_federation_is_refused_in_one_line_pointing_at_its_table():
    """[federation] num_clients = 5 was a core field; now it is the harness's, and the core
    says so without naming the harness's fields."""
    from fedtune.config import config_from_toml_text

    with pytest.raises(ConfigError) as error:
        config_from_toml_text("[federation]\nnum_clients = 5\n", source="sim.toml")
    message = str(error.value)
    assert message.startswith("sim.toml: unknown key federation.num_clients (known: clients_per_round, ")
    assert "live in [simulation]" in message and "\n" not in message


def test_the_simulation_table_is_kept_as_written_and_round_trips():
    """The core carries the harness's table (a run directory's config.toml reloads it) but
    holds no field of it: not a section, no flags, nothing a node is sent."""
    from fedtune.config import HARNESS_TABLES, SECTIONS, Config, config_from_toml_text
    from fedtune.privacy.policy import OWNERS, server_request

    text = ('[federation]\nclients_per_round = 2\n[simulation]\nnum_clients = 5\npartitioner = "dirichlet"\n'
            'dirichlet_alpha = 0.3\nnot_known_to_the_core = ["a", "b"]\n')
    config = config_from_toml_text(text)
    assert config.simulation == {"num_clients": 5, "partitioner": "dirichlet", "dirichlet_alpha": 0.3,
                                 "not_known_to_the_core": ("a", "b")}
    saved = config.to_toml()
    assert "[simulation]\nnum_clients = 5\npartitioner = \"dirichlet\"\n" in saved
    assert config_from_toml_text(saved) == config
    assert "simulation" in HARNESS_TABLES and "simulation" not in SECTIONS
    assert not any(name.startswith("simulation.") for name in OWNERS) and "simulation" not in server_request(config)
    assert "[simulation]" not in Config().to_toml()  # a deployment's config shows no empty table
    assert hash(config) == hash(config.replace(simulation={})) and config != config.replace(simulation={})


@pytest.mark.parametrize("text, message", [
    ("simulation = 5\n", "config: [simulation] must be a table of key = value"),
    ("[simulation]\nclients = {n = 5}\n", "simulation.clients = {'n': 5}: expected a string, number, true / false"),
])
def test_a_simulation_table_the_core_cannot_keep_is_a_one_line_error(text, message):
    from fedtune.config import config_from_toml_text

    with pytest.raises(ConfigError) as error:
        config_from_toml_text(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_core_never_reads_a_simulation_setting():
    """The core holds no simulation field by name: its source never spells one (the harness's
    fields, taken from the harness's own dataclass)."""
    import dataclasses
    from pathlib import Path

    from simulations.settings import SimulationSettings

    names = [f.name for f in dataclasses.fields(SimulationSettings)] + ["PARTITIONERS", "dirichlet"]
    core = Path(__file__).resolve().parents[1] / "fedtune"
    for path in sorted(core.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not [name for name in names if name in text], (path, [name for name in names if name in text])
