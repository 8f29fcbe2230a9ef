"""`flwr run simulations/flwr_app`: each virtual node's privacy policy comes from the node
side of the simulation (`FEDTUNE_SIMULATION_POLICY`, else the built-in default), never from
the run config, which is the server side's. What the run config asks reaches the nodes only
as each round's request, which their policy refuses where it goes outside it."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedtune.errors import ConfigError
from fedtune.privacy.policy import NodePolicy, PolicyRefusal, server_request
from simulations.run import POLICY_ENV, SimulationNodes, flwr_run_config, flwr_run_setup, prepare_simulation
from tests.conftest import make_texts, write_csv

APP = Path(__file__).resolve().parents[1] / "simulations" / "flwr_app" / "pyproject.toml"
NUM_PARTITIONS = 2


@pytest.fixture(autouse=True)
def _no_policy_file(monkeypatch):
    """Every test starts from the built-in default unless it names a policy file."""
    monkeypatch.delenv(POLICY_ENV, raising=False)


@pytest.fixture
def sim(tmp_path):
    """A simulation config (the run's `config` TOML): 40 rows over 2 virtual nodes."""
    data = write_csv(tmp_path / "rows.csv", make_texts(40, seed=2))
    path = tmp_path / "sim.toml"
    path.write_text(f'[model]\nmax_seq_len = 16\n[data]\npath = "{data}"\n'
                    '[federation]\nclients_per_round = 2\nmin_clients = 2\n[simulation]\nnum_clients = 2\n')
    return path


def _run_config(text: str) -> dict:
    """What the apps' context.run_config holds after `flwr run simulations/flwr_app
    --run-config TEXT`: Flower's own parser over the app's declared keys."""
    declared = flatten_dict(tomllib.loads(APP.read_text())["tool"]["flwr"]["app"]["config"])
    return fuse_dicts(declared, parse_config_args([text]))


def _node(run_config: dict, partition: int = 0):
    """A virtual node's setup, as the ClientApp builds it inside the simulation engine."""
    context = Context(run_id=1, node_id=7, node_config={"partition-id": partition, "num-partitions": NUM_PARTITIONS},
                      state=RecordDict(), run_config=run_config)
    return flwr_run_setup(context)


def _request(run_config: dict) -> dict:
    """What the ServerApp asks every node each round."""
    return server_request(flwr_run_config(run_config))


def test_run_config_dp_enabled_false_is_a_request_the_nodes_refuse(sim, tmp_path):
    """`--run-config dp.enabled=false` used to make every virtual node's policy allow
    non-private training; now the nodes keep the default policy and refuse the request."""
    # Prepare
    run_config = _run_config(f'config="{sim}" run-dir="{tmp_path / "run"}" dp.enabled=false')
    # Execute
    setup = _node(run_config)
    request = _request(run_config)
    # Assert
    assert request["dp"]["enabled"] is False  # the server side still asks
    assert not setup.policy.allow_non_private and setup.policy.own.dp.enabled
    with pytest.raises(PolicyRefusal) as refusal:
        setup.policy.config_for(request)
    assert refusal.value.field == "dp.enabled"


def test_run_config_target_and_delta_do_not_move_the_nodes_cap_or_delta(sim, tmp_path):
    """The cap used to be the run config's target (node.max_epsilon = 0), and the node's own
    delta the run config's: a request for epsilon 1000 or a large delta is now refused."""
    run_config = _run_config(f'config="{sim}" run-dir="{tmp_path / "run"}" dp.target-epsilon=1000 dp.delta=0.01')
    setup = _node(run_config)
    assert setup.policy.max_epsilon == 8.0 and setup.policy.own.dp.delta == 0.0  # simulations/default.toml
    with pytest.raises(PolicyRefusal) as refusal:
        setup.policy.config_for(_request(run_config))
    assert refusal.value.field == "dp.target_epsilon"
    asked = setup.policy.own.replace(dp=dataclasses.replace(setup.policy.own.dp, delta=0.01))
    with pytest.raises(PolicyRefusal, match="dp.delta"):
        setup.policy.delta_for(asked, records=20)  # 1 / (10 n) = 0.005 is the node's


@pytest.mark.parametrize("section, line, field", [("dp", "noise_seed = 3", "dp.noise_seed"),
                                                  ("node", "max_epsilon = 1000", "node.max_epsilon"),
                                                  ("dp", 'accountant = "prv"', "dp.accountant"),
                                                  ("node", 'release_train_loss = "dp"', "node.release_train_loss")])
def test_a_config_file_cannot_set_the_nodes_policy(sim, tmp_path, section, line, field):
    """A `config=` TOML's node-owned fields used to become every virtual node's policy (a
    noise seed anyone holding the file can replay, a cap of 1000): the run now stops at the
    start, in one line naming the field and where to set it."""
    text = sim.read_text().replace(f"[{section}]\n", "") + f"[{section}]\n{line}\n"
    sim.write_text(text)
    run_config = _run_config(f'config="{sim}" run-dir="{tmp_path / "run"}"')
    for build in (flwr_run_config, _node):  # the ServerApp at the start; a node (node-error) if it ever got there
        with pytest.raises(ConfigError) as error:
            build(run_config)
        message = str(error.value)
        assert f"sets {field} = " in message and POLICY_ENV in message and "\n" not in message


@pytest.mark.parametrize("setting, where", [("node.max-epsilon=1000", POLICY_ENV),
                                            ("training.physical-batch-size=4", "`config` TOML")])
def test_a_node_owned_run_config_key_names_where_to_set_it(sim, tmp_path, setting, where):
    """The policy's fields belong in the nodes' policy file; what a virtual node holds (its
    rows, model, device, memory) in the simulation's own `config` TOML."""
    run_config = _run_config(f'config="{sim}" run-dir="{tmp_path / "run"}" {setting}')
    with pytest.raises(ConfigError) as error:
        flwr_run_config(run_config)
    message = str(error.value)
    key, value = setting.split("=")
    assert message.startswith(f"run config: {key} = {value}") and where in message and "\n" not in message


def test_the_node_side_file_sets_the_policy(sim, tmp_path, monkeypatch):
    """FEDTUNE_SIMULATION_POLICY names the nodes' side: its cap, seed, accountant and
    non-private allowance are what every virtual node enforces; the rows, model and state
    dir stay the simulation's."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[dp]\nnoise_seed = 5\naccountant = "prv"\n[node]\nmax_epsilon = 3\n')
    monkeypatch.setenv(POLICY_ENV, str(policy_file))
    run_config = _run_config(f'config="{sim}" run-dir="{tmp_path / "run"}" dp.target-epsilon=2')
    setup = _node(run_config, partition=1)
    own = setup.policy.own
    assert setup.policy.max_epsilon == 3 and own.dp.target_epsilon == 3  # a cap with no target targets the cap
    assert own.dp.noise_seed == 5 and own.dp.accountant == "prv" and not setup.policy.allow_non_private
    assert len(setup.table) == 20 and setup.state_dir == (tmp_path / "run" / "clients" / "client-00001").resolve()
    assert own.node.budget_dir == str(setup.state_dir) and own.data.labels == ("neg", "pos")
    trained = setup.policy.config_for(_request(run_config))  # within the policy: target 2 <= cap 3
    assert trained.dp.target_epsilon == 2 and trained.dp.noise_seed == 5
    allow_file = tmp_path / "allow.toml"
    allow_file.write_text("[dp]\nenabled = false\n")  # a node side that allows non-private training
    monkeypatch.setenv(POLICY_ENV, str(allow_file))
    allowing = _node(_run_config(f'config="{sim}" run-dir="{tmp_path / "run"}" dp.enabled=false'))
    assert allowing.policy.allow_non_private
    assert not allowing.policy.config_for(_request(_run_config(f'config="{sim}" dp.enabled=false'))).dp.enabled


def test_a_config_file_that_agrees_with_the_node_side_is_accepted(sim, tmp_path, monkeypatch):
    """One researcher's TOML for both sides: `FEDTUNE_SIMULATION_POLICY=sim.toml flwr run
    ... config=sim.toml` runs (the server side takes its seed for its own sampling)."""
    sim.write_text(sim.read_text() + "[dp]\nnoise_seed = 3\n")
    monkeypatch.setenv(POLICY_ENV, str(sim))
    run_config = _run_config(f'config="{sim}" run-dir="{tmp_path / "run"}"')
    assert flwr_run_config(run_config).dp.noise_seed == 3
    assert _node(run_config).policy.own.dp.noise_seed == 3


@pytest.mark.parametrize("value, expected", [("policy.toml", "absolute path"), ("/nonexistent/policy.toml", "not found")])
def test_a_bad_policy_file_is_a_one_line_error(sim, tmp_path, monkeypatch, value, expected):
    monkeypatch.setenv(POLICY_ENV, value)
    with pytest.raises(ConfigError, match=expected) as error:
        flwr_run_config(_run_config(f'config="{sim}" run-dir="{tmp_path / "run"}"'))
    assert str(error.value).startswith(POLICY_ENV) and "\n" not in str(error.value)


def test_fedtune_simulate_keeps_one_config_for_both_sides(sim, tmp_path):
    """`fedtune simulate` (and `fedtune.simulate`): the researcher's own config is both the
    server's and every virtual node's, non-private allowance and seed included."""
    from fedtune.config import load_config

    config = prepare_simulation(load_config(sim, [("dp", "enabled", False), ("dp", "noise_seed", 4)]))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": NUM_PARTITIONS},
                      state=RecordDict(), run_config={})
    policy = SimulationNodes(config, str(tmp_path / "run"))(context).policy
    assert isinstance(policy, NodePolicy) and policy.allow_non_private and policy.own.dp.noise_seed == 4
