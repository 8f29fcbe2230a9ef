"""`flwr run ... --run-config "dp.target-epsilon=3 ..."`: every fedtune field maps onto the
config with the CLI's validation; node-owned fields are refused; both apps declare every key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedtune.errors import ConfigError
from fedtune.privacy.policy import NODE, OWNERS
from fedtune.config import load_config
from fedtune.run_config import config_from_run_config, declaration_toml, declared_keys, flower_key, overrides

ROOT = Path(__file__).resolve().parents[1]
APPS = {ROOT / "pyproject.toml": "runs/federation", ROOT / "simulations" / "flwr_app" / "pyproject.toml": "runs/flwr-simulation"}
SIMULATION_APP = ROOT / "simulations" / "flwr_app" / "pyproject.toml"
DEFAULT_FEDERATION = ROOT / "simulations" / "default.toml"


def _declared(pyproject: Path) -> dict:
    return flatten_dict(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"])


def _as_flower_passes_it(text: str, pyproject: Path = ROOT / "pyproject.toml") -> dict:
    """What a ServerApp's context.run_config holds after `flwr run --run-config TEXT`:
    Flower's own parser, fused over the app's declared keys (unknown keys raise there)."""
    return fuse_dicts(_declared(pyproject), parse_config_args([text]))


@pytest.mark.parametrize("pyproject", list(APPS), ids=lambda p: p.parent.name)
def test_each_app_declares_every_field_it_takes(pyproject):
    """The deployment app: every core field, the server's with the default federation's real
    values (simulations/default.toml), the node's unset. The simulation app: every core field
    and the harness's [simulation] fields (`extra`), all unset: its `config` TOML decides."""
    from simulations.settings import RUN_CONFIG_FIELDS

    extra = RUN_CONFIG_FIELDS if pyproject == SIMULATION_APP else None
    declared = _declared(pyproject)
    assert set(declared) == {"config", "run-dir", "log-to", *declared_keys(extra)}
    assert declared["run-dir"] == APPS[pyproject]
    assert len(declared_keys()) == len(OWNERS)
    assert any(key.startswith("simulation.") for key in declared) == (extra is not None)
    if extra is not None:
        assert all(declared[key] == "" for key in declared_keys(extra))
        return
    generated = declaration_toml("runs/federation", defaults=load_config(DEFAULT_FEDERATION),
                                 generator="python -m fedtune.run_config runs/federation simulations/default.toml")
    assert flatten_dict(tomllib.loads(generated)["tool"]["flwr"]["app"]["config"]) == declared
    node_keys = {flower_key(name) for name, (owner, _) in OWNERS.items() if owner == NODE}
    assert all(declared[key] == "" for key in node_keys)
    assert sum(declared[key] != "" for key in declared_keys()) > 40  # real values, not placeholders


def test_flwr_run_dot_runs_the_default_federation_with_no_extra_file():
    """`flwr run .`: pyproject.toml's values are the default federation's server side, the
    one `fedtune simulate` runs (its rows and split are the nodes' and the harness's)."""
    deployed = config_from_run_config(_as_flower_passes_it(""), typed=[]).to_dict()
    default = load_config(DEFAULT_FEDERATION).to_dict()
    for name, (owner, _) in OWNERS.items():
        section, key = name.split(".")
        if owner != NODE:
            assert deployed[section][key] == default[section][key], name
    assert (deployed["training"]["rounds"], deployed["dp"]["target_epsilon"], deployed["model"]["max_seq_len"]) == (5, 8, 64)
    edited = config_from_run_config(_as_flower_passes_it("training.rounds=2 dp.target-epsilon=3"),
                                    typed=["training.rounds", "dp.target-epsilon"])
    assert (edited.training.rounds, edited.dp.target_epsilon, edited.training.learning_rate) == (2, 3.0, 0.01)


def test_precedence_defaults_pyproject_toml_then_typed_values(tmp_path):
    """`flwr run . FED --run-config 'config="/abs/fed.toml" ...'` beside pyproject.toml's real
    values: the TOML wins over pyproject values nobody typed, a typed value over the TOML
    (Flower's Run.override_config says which keys were typed), pyproject fills the rest."""
    base = tmp_path / "federation.toml"
    base.write_text('[training]\nrounds = 4\n[lora]\nrank = 4\n[dp]\ntarget_epsilon = 8.0\n')
    typed = parse_config_args([f'config="{base}" dp.target-epsilon=3 training.epochs=2 training.rounds=6'])
    config = config_from_run_config(fuse_dicts(_declared(ROOT / "pyproject.toml"), typed), typed=typed.keys())
    assert (config.training.rounds, config.dp.target_epsilon, config.training.epochs) == (6, 3.0, 2)  # typed
    assert config.lora.rank == 4                                                                      # the TOML
    assert (config.training.learning_rate, config.model.max_seq_len) == (0.01, 64)                    # pyproject
    plain = config_from_run_config(_as_flower_passes_it(f'config="{base}"'), typed=["config"])
    assert (plain.training.rounds, plain.lora.rank, plain.federation.clients_per_round) == (4, 4, 5)


def test_run_config_values_override_the_toml(tmp_path):
    """The simulation app, whose keys are all "": a value set on the command line wins."""
    base = tmp_path / "federation.toml"
    base.write_text('[training]\nrounds = 4\nlearning_rate = 0.002\n[dp]\ntarget_epsilon = 8.0\n')
    run_config = _as_flower_passes_it(f'config="{base}" dp.target-epsilon=3 training.rounds=10 '
                                      'lora.target-modules="query,key,value" federation.secure-aggregation=true federation.min-clients=3 '
                                      'data.labels="neg,pos"', SIMULATION_APP)
    config = config_from_run_config(run_config)
    assert config.dp.target_epsilon == 3.0 and config.training.rounds == 10
    assert config.training.learning_rate == 0.002  # not in the run config: the TOML's
    assert config.lora.target_modules == ("query", "key", "value") and config.data.labels == ("neg", "pos")
    assert config.federation.secure_aggregation is True


def test_no_toml_means_the_given_default_then_the_built_in_defaults(tmp_path):
    default = tmp_path / "default.toml"
    default.write_text("[training]\nrounds = 7\n")
    unset = _as_flower_passes_it("training.epochs=2", SIMULATION_APP)
    assert config_from_run_config(unset, default).training.rounds == 7
    assert config_from_run_config(unset).training.epochs == 2


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
