"""Run a federation of virtual clients on this host with Flower's simulation engine (Ray).

Every virtual client is a real Flower ClientApp (`clients.client_app.app`); each keeps
its ledger in `RUN_DIR/clients/client-NNNNN/`, exactly as a deployed node keeps its
`state-dir`, so privacy state persists across the ephemeral ClientApps.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from fedtune.atomic import atomic_write_json
from fedtune.config import Config
from fedtune.data import LabelMap, load_table, subsample
from fedtune.errors import ConfigError


def with_labels(config: Config) -> Config:
    """Fix the federation's label set from the whole dataset when not configured."""
    if not config.task_is_classification or config.data.labels:
        return config
    table = subsample(load_table(config.data, config.model.task), config.data.max_examples, config.training.seed)
    labels = tuple(str(x) for x in LabelMap.from_labels(table.labels, source=table.source).labels)
    return config.replace(data=dataclasses.replace(config.data, labels=labels))


def simulate(config: Config, run_dir: str | Path, num_cpus_per_client: float = 1.0, num_gpus_per_client: float = 0.0) -> Path:
    from flwr.simulation import run_simulation

    from clients.client_app import app as client_app
    from server.server_app import make_server_app
    from simulations.partition import partition_report

    if config.data.path == "" and not config.data.dataset:
        raise ConfigError("data.dataset: a simulation needs a dataset to partition")
    run_dir = Path(run_dir)
    config = with_labels(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "partitions.json", partition_report(config))
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray-"))
    backend = {"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
               "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1}}
    run_simulation(server_app=make_server_app(config, run_dir), client_app=client_app,
                   num_supernodes=config.federation.num_clients, backend_config=backend)
    return run_dir
