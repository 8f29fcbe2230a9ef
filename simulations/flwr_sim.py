"""The simulation as Flower apps, for `flwr run simulations/flwr_app` (Flower's own CLI on
its local simulation engine). The harness wraps the deployment apps: the ServerApp runs
the same federation as `fedtune simulate` (the run config's `config`, or the built-in
default) with every `--run-config` value applied (`fedtune.run_config`), and each virtual node's ClientApp gets its policy, rows and state dir from the
run config the researcher wrote, injected here, never from a server message."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clients.client_app import make_client_app
from fedtune.run_config import LOG_TO_KEY, RUN_DIR_KEY
from fedtune.tracking import parse_log_to
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
                   log_to=parse_log_to(str(run_config.get(LOG_TO_KEY, "")), source=f"run config {LOG_TO_KEY}"))
