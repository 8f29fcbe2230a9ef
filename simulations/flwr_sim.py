"""The simulation as Flower apps, for `flwr run simulations/flwr_app` (Flower's own CLI on
its local simulation engine). The harness wraps the deployment apps.

The run config is the server side's, as an operator's is in deployment: the ServerApp runs
the federation its `config` TOML (or the built-in default) describes, with every
`--run-config` value applied (`fedtune.run_config`), and the simulation's data, partition
and model. Each virtual node's ClientApp gets its rows and state dir from the harness and
its privacy policy from the node side of the process that runs the simulation
(`FEDTUNE_SIMULATION_POLICY`, else the built-in default; `simulations.run`), never from the
run config or a server message. A node-owned field in the run config, or in its `config`
TOML where it differs from the nodes' policy, stops the run at the start in one line."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.client_app import make_client_app
from fedtune.privacy.budget import remember_budget_folder
from fedtune.run_config import RUN_DIR_KEY, log_to_of
from server.server_app import run_federation
from simulations.partition import held_out_table
from simulations.run import POLICY_ENV, flwr_run_config, flwr_run_setup, simulation_policy, simulation_policy_source

clientapp = make_client_app(flwr_run_setup)
serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config = flwr_run_config(run_config)
    source = simulation_policy_source()
    print(f"virtual nodes' {simulation_policy(config, source).describe()} ({POLICY_ENV}: {source})", flush=True)
    run_dir = run_config.get(RUN_DIR_KEY) or "runs/flwr-simulation"
    remember_budget_folder(run_dir)  # `fedtune budget` lists each virtual node's budget below it
    run_federation(grid, config, run_dir, eval_table=held_out_table(config), log_to=log_to_of(run_config))
