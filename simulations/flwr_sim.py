"""The simulation as Flower apps, for `flwr run simulations/flwr_app` (Flower's own CLI on
its local simulation engine). The harness wraps the deployment apps: the ServerApp runs
the same federation as `fedtune simulate` (the run config's `config`, or the built-in
default) with every `--run-config` value applied (`fedtune.run_config`), and each virtual node's ClientApp gets its policy, rows and state dir from the
run config the researcher wrote, injected here, never from a server message."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.client_app import make_client_app
from fedtune.run_config import RUN_DIR_KEY, log_to_of
from server.server_app import run_federation
from simulations.partition import held_out_table
from simulations.run import flwr_run_config, flwr_run_setup

clientapp = make_client_app(flwr_run_setup)
serverapp = ServerApp()


@serverapp.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config = flwr_run_config(run_config)
    run_federation(grid, config, run_config.get(RUN_DIR_KEY) or "runs/flwr-simulation", eval_table=held_out_table(config),
                   log_to=log_to_of(run_config))
