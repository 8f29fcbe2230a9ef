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
    assert flags["alpha"][0] == "federation.dirichlet_alpha" and flags["lora_alpha"][0] == "lora.alpha"
