"""The simulation as Flower apps, for `flwr run simulations/flwr_app` (Flower's own CLI on
its local simulation engine). The harness wraps the deployment apps: the ServerApp runs
the same federation as `fedtune simulate` (the run config's `config`, or the built-in
default), and each virtual node's ClientApp gets its policy, rows and state dir from the
run config the researcher wrote, injected here, never from a server message."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.client_app import make_client_app
from fedtune.config import load_config
from server.server_app import run_federation
from simulations.partition import held_out_table
from simulations.run import default_config_path, flwr_run_setup, prepare_simulation

clientapp = make_client_app(flwr_run_setup)
serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config = prepare_simulation(load_config(str(run_config.get("config") or default_config_path())))
    run_federation(grid, config, run_config.get("run-dir", "runs/federation"), eval_table=held_out_table(config))
