"""The simulation harness's [simulation] table (`simulations.settings`): its fields, checks
and flags live in the harness; the core carries the table and never reads it."""

from __future__ import annotations

import dataclasses

import pytest

from fedtune.config import build_config, config_from_toml_text
from fedtune.errors import ConfigError
from simulations.settings import (RUN_CONFIG_FIELDS, SimulationSettings, settings_table, simulation_flags,
                                  simulation_settings, with_simulation)
from tests.test_layers import _imported_after


def test_the_settings_come_from_the_table_with_the_defaults_for_the_rest():
    config = config_from_toml_text('[federation]\nclients_per_round = 2\n[simulation]\nnum_clients = 6\n'
                                   'partitioner = "dirichlet"\ndirichlet_alpha = 1\n')
    settings = simulation_settings(config)
    assert (settings.num_clients, settings.partitioner, settings.dirichlet_alpha) == (6, "dirichlet", 1.0)
    assert settings.rows_per_client == 0 and settings.central_holdout == 0.0  # the defaults
    assert simulation_settings(build_config({})) == SimulationSettings()


def test_fewer_clients_than_a_round_samples_is_refused_naming_the_simulation_key():
    config = build_config({"federation": {"clients_per_round": 5}, "simulation": {"num_clients": 4}})
    with pytest.raises(ConfigError) as error:
        simulation_settings(config)
    assert str(error.value) == "simulation.num_clients = 4: expected at least federation.clients_per_round = 5"
    assert error.value.key == "simulation.num_clients"


@pytest.mark.parametrize("table, message", [
    ({"num_clientz": 5}, "unknown key simulation.num_clientz (known: num_clients, partitioner, dirichlet_alpha, "),
    ({"num_clients": "five"}, "simulation.num_clients = 'five': expected a whole number"),
    ({"num_clients": 2.5}, "simulation.num_clients = 2.5: expected a whole number"),
    ({"dirichlet_alpha": 0}, "simulation.dirichlet_alpha = 0.0: expected a number > 0"),
    ({"partitioner": "random"}, "simulation.partitioner = 'random': expected one of iid, dirichlet, natural, files"),
    ({"partitioner": "files"}, "simulation.client_files = '': expected a folder of per-client files"),
    ({"central_holdout": 1}, "simulation.central_holdout = 1.0: expected a number in [0, 1)"),
    ({"rows_per_client": -1}, "simulation.rows_per_client = -1: expected a whole number >= 0"),
])
def test_every_mistake_in_the_table_is_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError) as error:
        simulation_settings(build_config({"simulation": table}))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_with_simulation_writes_the_whole_table_validated():
    """What a run records: every setting, defaults included, so a report or a resume reads
    what ran; a change is checked as the table is."""
    config = with_simulation(build_config({"simulation": {"num_clients": 4}}), partitioner="dirichlet",
                             dirichlet_alpha=2)
    assert config.simulation == settings_table(SimulationSettings(num_clients=4, partitioner="dirichlet",
                                                                  dirichlet_alpha=2.0))
    assert list(config.simulation) == [f.name for f in dataclasses.fields(SimulationSettings)]
    assert config_from_toml_text(config.to_toml()) == config
    with pytest.raises(ConfigError, match="simulation.num_clients = 2: expected at least"):
        with_simulation(config, num_clients=2)
    with pytest.raises(ConfigError, match="unknown key simulation.clients"):
        with_simulation(config, clients=2)


def test_a_prepared_simulation_holds_the_resolved_table(tmp_path):
    from simulations.run import prepare_simulation
    from tests.conftest import make_texts, write_csv

    data = write_csv(tmp_path / "rows.csv", make_texts(40, seed=2))
    config = prepare_simulation(build_config({"data": {"path": str(data)}, "simulation": {"num_clients": 4}}))
    assert config.simulation == settings_table(SimulationSettings(num_clients=4))
    assert config.federation.population == 4  # the simulation's clients, when the operator declares none


def test_the_flags_come_from_the_settings_and_map_to_the_table():
    flags = simulation_flags()
    assert {name: key for name, (key, _, _) in flags.items()} == {
        "num_clients": "simulation.num_clients", "partitioner": "simulation.partitioner",
        "alpha": "simulation.dirichlet_alpha", "rows_per_client": "simulation.rows_per_client"}
    assert "(simulation.num_clients; default 3)" in flags["num_clients"][1]
    from fedtune.cli import NODE_SECTIONS, config_flags

    assert not set(flags) & set(config_flags(NODE_SECTIONS + ("federation",)))  # no flag shadows a core one
    assert set(RUN_CONFIG_FIELDS) == {f"simulation.{f.name}" for f in dataclasses.fields(SimulationSettings)}


def test_simulate_flags_land_in_the_table():
    from fedtune.cli import build_parser, config_from_args

    args = build_parser().parse_args(["simulate", "--num-clients", "7", "--partitioner", "dirichlet", "--alpha", "0.2",
                                      "--rows-per-client", "30", "--set", "simulation.central_holdout=0.1"])
    config = config_from_args(args)
    assert config.simulation == {"num_clients": 7, "partitioner": "dirichlet", "dirichlet_alpha": 0.2,
                                 "rows_per_client": 30, "central_holdout": 0.1}


def test_simulate_help_lists_the_simulation_flags(capsys):
    from fedtune.cli import main

    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--num-clients", "--partitioner", "--alpha", "--rows-per-client"):
        assert flag in out


def test_too_few_clients_on_the_command_line_is_one_line_before_torch_or_flower_load():
    code = ("import contextlib, io\nfrom fedtune.cli import main\nerr = io.StringIO()\n"
            "with contextlib.redirect_stderr(err):\n    rc = main(['simulate', '--num-clients', '1'])\n"
            "assert rc == 2, rc\nlines = err.getvalue().strip().splitlines()\n"
            "assert len(lines) == 1 and 'simulation.num_clients = 1: expected at least federation.clients_per_round' "
            "in lines[0], lines\n")
    imported = _imported_after(code)
    assert not imported & {"torch", "flwr", "ray", "transformers"}, imported & {"torch", "flwr", "ray", "transformers"}


def test_the_run_report_shows_the_table_as_recorded_and_nothing_without_one(tmp_path):
    from fedtune.reporting.run_report import write_report
    from tests.test_report import _fake_run

    for name, config in (("sim", with_simulation(build_config({"simulation": {"num_clients": 5}}))),
                         ("deployment", build_config({}))):
        run = tmp_path / name
        _fake_run(run)
        (run / "config.toml").write_text(config.to_toml())
        write_report(run)
        summary = (run / "summary.md").read_text()
        assert "clients per round, 3 of 1 rounds done" in summary
        shown = [line for line in summary.splitlines() if line.startswith("- simulation:")]
        if name == "sim":
            assert shown == ['- simulation: num_clients = 5, partitioner = "iid", dirichlet_alpha = 0.5, '
                             'partition_column = "", client_files = "", ray_address = "", central_holdout = 0.0, '
                             'rows_per_client = 0']
        else:
            assert shown == []


def test_a_server_request_never_carries_the_table_and_a_node_refuses_one():
    from fedtune.privacy.policy import NodePolicy, PolicyRefusal, server_request

    config = with_simulation(build_config({"dp": {"target_epsilon": 3.0}}), num_clients=5)
    request = server_request(config)
    assert "simulation" not in request
    policy = NodePolicy.from_config(config)
    with pytest.raises(PolicyRefusal) as refusal:
        policy.config_for({**request, "simulation": {"num_clients": 2}})
    assert refusal.value.field == "simulation"
