"""`flwr run ... --run-config "dp.target-epsilon=3 ..."`: every fedtune field maps onto the
config with the CLI's validation; node-owned fields are refused; both apps declare every key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedtune.errors import ConfigError
from fedtune.privacy.policy import NODE, OWNERS
from fedtune.run_config import config_from_run_config, declared_keys, flower_key, overrides

ROOT = Path(__file__).resolve().parents[1]
APPS = {ROOT / "pyproject.toml": "runs/federation", ROOT / "simulations" / "flwr_app" / "pyproject.toml": "runs/flwr-simulation"}
SIMULATION_APP = ROOT / "simulations" / "flwr_app" / "pyproject.toml"


def _declared(pyproject: Path) -> dict:
    return flatten_dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


def _as_flower_passes_it(text: str, pyproject: Path = ROOT / "pyproject.toml") -> dict:
    """What a ServerApp's context.run_config holds after `flwr run --run-config TEXT`:
    Flower's own parser, fused over the app's declared keys (unknown keys raise there)."""
    return fuse_dicts(_declared(pyproject), parse_config_args([text]))


@pytest.mark.parametrize("pyproject", list(APPS), ids=lambda p: p.parent.name)
def test_each_app_declares_every_field_it_takes_unset(pyproject):
    """The deployment app: every core field. The simulation app: those and the fields of the
    harness's [simulation] table, which the harness hands the core (`extra`)."""
    from simulations.settings import RUN_CONFIG_FIELDS

    extra = RUN_CONFIG_FIELDS if pyproject == SIMULATION_APP else None
    declared = _declared(pyproject)
    assert set(declared) == {"config", "run-dir", "log-to", *declared_keys(extra)}
    assert declared["run-dir"] == APPS[pyproject]
    assert all(declared[key] == "" for key in declared_keys(extra))
    assert len(declared_keys()) == len(OWNERS)
    assert any(key.startswith("simulation.") for key in declared) == (extra is not None)


def test_simulation_settings_are_run_config_keys_of_the_simulation_app_only(tmp_path):
    """`flwr run simulations/flwr_app --run-config simulation.num-clients=4` lands in the
    config's [simulation] table, checked by the harness; the deployment app (and the core
    without the harness's fields) knows no such key."""
    from simulations.settings import RUN_CONFIG_FIELDS, simulation_settings

    base = tmp_path / "sim.toml"
    base.write_text('[federation]\nclients_per_round = 2\nmin_clients = 2\n')
    run_config = _as_flower_passes_it(f'config="{base}" simulation.num-clients=4 simulation.partitioner="dirichlet"',
                                      SIMULATION_APP)
    config = config_from_run_config(run_config, extra=RUN_CONFIG_FIELDS)
    assert config.simulation == {"num_clients": 4, "partitioner": "dirichlet"}
    assert simulation_settings(config).num_clients == 4
    too_few = config_from_run_config(_as_flower_passes_it("simulation.num-clients=1", SIMULATION_APP),
                                     extra=RUN_CONFIG_FIELDS)
    with pytest.raises(ConfigError, match="simulation.num_clients = 1: expected at least federation.clients_per_round"):
        simulation_settings(too_few)
    with pytest.raises(ValueError, match="not present"):
        _as_flower_passes_it("simulation.num-clients=4")  # the deployment app does not declare it
    with pytest.raises(ConfigError, match="unknown key 'simulation.num-clients'"):
        overrides({"simulation.num-clients": 4})  # nor does the core alone


def test_run_config_values_override_the_toml(tmp_path):
    base = tmp_path / "federation.toml"
    base.write_text('[training]\nrounds = 4\nlearning_rate = 0.002\n[dp]\ntarget_epsilon = 8.0\n')
    run_config = _as_flower_passes_it(f'config="{base}" dp.target-epsilon=3 training.rounds=10 '
                                      'lora.target-modules="query,key,value" federation.secure-aggregation=true federation.min-clients=3 '
                                      'data.labels="neg,pos"')
    config = config_from_run_config(run_config)
    assert config.dp.target_epsilon == 3.0 and config.training.rounds == 10
    assert config.training.learning_rate == 0.002  # not in the run config: the TOML's
    assert config.lora.target_modules == ("query", "key", "value") and config.data.labels == ("neg", "pos")
    assert config.federation.secure_aggregation is True


def test_no_toml_means_the_given_default_then_the_built_in_defaults(tmp_path):
    default = tmp_path / "default.toml"
    default.write_text("[training]\nrounds = 7\n")
    assert config_from_run_config(_as_flower_passes_it("training.epochs=2"), default).training.rounds == 7
    assert config_from_run_config(_as_flower_passes_it("training.epochs=2")).training.epochs == 2


@pytest.mark.parametrize("text, names", [
    ('training.rounds="ten"', "training.rounds = 'ten': expected a whole number"),
    ("training.rounds=2.5", "training.rounds = 2.5: expected a whole number"),
    ("dp.target-epsilon=-1", "dp.target_epsilon"),
    ("federation.clients-per-round=0", "federation.clients_per_round"),
    ('training.optimizer="adam"', "training.optimizer"),
])
def test_bad_values_get_the_clis_one_line_error(text, names):
    with pytest.raises(ConfigError) as error:
        config_from_run_config(_as_flower_passes_it(text))
    assert names in str(error.value) and "\n" not in str(error.value)


def test_unknown_keys_are_refused_by_flower_and_by_fedtune():
    with pytest.raises(ValueError, match="not present"):
        _as_flower_passes_it("dp.target_epsilonn=3")  # Flower: not a declared key
    with pytest.raises(ConfigError, match="unknown key 'dp.epsilon'"):
        overrides({"dp.epsilon": 3})  # a run config built some other way


@pytest.mark.parametrize("field", sorted(name for name, (owner, _) in OWNERS.items() if owner == NODE))
def test_node_owned_fields_are_refused(field):
    """The node's data, accountant, cap, noise seed, ...: a run config cannot set them, in
    either spelling, whatever the value."""
    for key in (flower_key(field), field):
        with pytest.raises(ConfigError) as error:
            overrides({"config": "", key: 1})
        assert "refused, each node decides this" in str(error.value) and "\n" not in str(error.value)


def test_the_simulation_app_applies_the_run_config_to_server_and_virtual_nodes(tiny_bert, tmp_path):
    """`flwr run simulations/flwr_app --run-config ...`: the ServerApp's config is the
    overridden config, and it reaches every virtual node as the request its policy (the
    node side's, here the built-in default) checks (tests/test_simulation_policy.py)."""
    from flwr.app import Context, RecordDict

    from fedtune.privacy.policy import server_request

    from simulations.run import flwr_run_config, flwr_run_setup
    from tests.conftest import make_texts, write_csv

    data = write_csv(tmp_path / "rows.csv", make_texts(40, seed=2))
    base = tmp_path / "sim.toml"
    base.write_text(f'[model]\npath = "{tiny_bert}"\nmax_seq_len = 16\n[data]\npath = "{data}"\n'
                    '[federation]\nclients_per_round = 2\nmin_clients = 2\n[simulation]\nnum_clients = 2\n')
    pyproject = ROOT / "simulations" / "flwr_app" / "pyproject.toml"
    run_config = _as_flower_passes_it(f'config="{base}" run-dir="{tmp_path / "run"}" training.rounds=3 '
                                      'dp.target-epsilon=2.5', pyproject)
    assert flwr_run_config(run_config).dp.target_epsilon == 2.5
    context = Context(run_id=1, node_id=9, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                      run_config=run_config)
    policy = flwr_run_setup(context).policy
    trained = policy.config_for(server_request(flwr_run_config(run_config)))
    assert trained.dp.target_epsilon == 2.5 and trained.training.rounds == 3 and policy.max_epsilon == 8.0
    with pytest.raises(ConfigError, match="dp.noise-seed = 7: refused"):
        flwr_run_config(_as_flower_passes_it(f'config="{base}" dp.noise-seed=7', pyproject))
