"""The in-process simulation engine: Flower's engine with `InProcessBackend` in place of
Ray, chosen when Ray would run one client at a time."""

from __future__ import annotations

import json
import os

import pytest

from fedtune.errors import ConfigError
from fedtune.privacy import PrivacyLedger
from simulations.run import choose_engine, ray_backend
from tests.conftest import make_texts, tiny_config, write_csv


def _config(tiny_bert, tmp_path, **simulation):
    data = write_csv(tmp_path / "rows.csv", make_texts(90, seed=4))
    return tiny_config(tiny_bert, data, training={"rounds": 2, "epochs": 1, "batch_size": 8},
                       federation={"clients_per_round": 3, "min_clients": 3},
                       simulation={"num_clients": 3, **simulation})


@pytest.mark.parametrize("cpus_per_client, gpus, devices, address, engine, chosen, at_once", [
    (None, 0.0, 0, "", "auto", "in-process", 1),   # every core per client: one at a time
    (1.0, 0.0, 0, "", "auto", "ray", 2),           # several at once on the CPU (on 2+ cores): Ray's workers
    (1.0, 0.25, 1, "", "auto", "in-process", 4),   # a quarter of the host's one GPU each: four streams here
    (1.0, 0.25, 2, "", "auto", "ray", 2),          # several GPUs are Ray's
    (1.0, 1.0, 1, "", "auto", "ray", 2),           # a whole GPU per client: nothing to share
    (None, 0.0, 0, "auto", "auto", "ray", 1),      # a cluster is Ray's
    (1.0, 0.0, 0, "", "in-process", "in-process", 2),  # asked for: two threads here, a core each
    (None, 0.0, 0, "", "ray", "ray", 1),
])
def test_auto_picks_in_process_when_clients_run_one_at_a_time_or_share_one_gpu(tiny_bert, tmp_path, cpus_per_client,
                                                                               gpus, devices, address, engine, chosen,
                                                                               at_once):
    from simulations.run import clients_at_once

    config = _config(tiny_bert, tmp_path, ray_address=address)
    backend = ray_backend(config, cpus_per_client or 2, gpus)
    backend["init_args"]["num_cpus"] = 2  # a 2-core host's worker counts, whatever runs the test
    assert choose_engine(engine, config, backend, gpus=devices) == chosen
    assert clients_at_once(chosen, backend) == at_once


def test_engine_mistakes_are_one_line_errors(tiny_bert, tmp_path):
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0}, "init_args": {"num_cpus": 2}}
    with pytest.raises(ConfigError, match="--engine = 'threads': expected one of auto, in-process, ray"):
        choose_engine("threads", _config(tiny_bert, tmp_path), backend)
    with pytest.raises(ConfigError, match="names a Ray cluster"):
        choose_engine("in-process", _config(tiny_bert, tmp_path, ray_address="10.0.0.1:6379"), backend)


def test_an_in_process_simulation_runs_every_client_here_without_ray(tiny_bert, tmp_path):
    """No Ray is started; the virtual clients run in this process (its model cache loads
    one base model for all of them); rounds, replies and ledgers are those of a Ray run."""
    import ray

    from fedtune.training.model_cache import MODELS
    from simulations.run import simulate

    MODELS.clear()  # an earlier test may have left this very model cached
    loads = MODELS.loads
    lines = []
    run = simulate(_config(tiny_bert, tmp_path), tmp_path / "run", num_cpus_per_client=os.cpu_count() or 1,
                   log=lines.append)
    assert not ray.is_initialized()
    assert MODELS.loads == loads + 1
    assert "simulation engine: in-process (one client at a time, in this process)" in lines
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and all(len(r["clients_accepted"]) == 3 for r in records)
    ledgers = [PrivacyLedger.load(p) for p in sorted((run / "clients").glob("client-*/ledger-*.json"))]
    assert len(ledgers) == 3 and all(len([c for c in ledger.calls if "steps" in c]) == 2 for ledger in ledgers)
    assert records[-1]["epsilon_max"] == pytest.approx(max(ledger.epsilon() for ledger in ledgers))
    from fedtune.config import load_config
    from simulations.settings import SimulationSettings, settings_table

    # the run records its [simulation] table resolved: every setting, defaults included
    assert load_config(run / "config.toml").simulation == settings_table(SimulationSettings(num_clients=3))
    from flwr.server.superlink.fleet.vce.backend import raybackend

    assert raybackend.RayBackend.__name__ == "RayBackend"  # Flower's own backend is back in its place


def test_the_compute_thread_runs_work_in_order_on_one_thread_and_passes_errors_back():
    import threading

    from simulations.in_process import ComputeSlots

    compute = ComputeSlots()
    try:
        threads = {compute(lambda: threading.get_ident()) for _ in range(5)}
        assert len(threads) == 1 and threading.get_ident() not in threads
        assert compute(lambda: 6 * 7) == 42
        with pytest.raises(ZeroDivisionError):
            compute(lambda: 1 / 0)
        assert compute(lambda: "still serving") == "still serving"
    finally:
        compute.close()


def test_a_client_app_that_raises_becomes_an_error_reply_not_a_crash():
    """As under Ray: the engine turns the exception into an error Message for the server."""
    from flwr.clientapp import ClientApp

    from simulations.in_process import ClientAppError, InProcessBackend, in_process_engine
    from tests.conftest import delivered, node_context

    app = ClientApp()

    @app.train()
    def train(msg, context):
        raise RuntimeError("out of memory on the node")

    with in_process_engine():
        backend = InProcessBackend({})
        backend.build(lambda: app)
        with pytest.raises(ClientAppError, match="RuntimeError: out of memory on the node"):
            backend.process_message(delivered("train", 1, "", {}), node_context({}))


def test_the_default_run_picks_the_engine_measured_faster_on_a_cpu_host(tiny_bert, tmp_path):
    """`fedtune simulate` with no --cpus-per-client gives every core to each client, so
    `auto` runs them one at a time in this process on a CPU-only host; a GPU share keeps one
    core per client so that several share the GPU on Ray."""
    from fedtune.cli import build_parser
    from simulations.run import cpus_per_client

    args = build_parser().parse_args(["simulate"])
    assert args.cpus_per_client is None
    cores = float(os.cpu_count() or 1)
    assert cpus_per_client(None, 0.0) == cores and cpus_per_client(None, 0.25) == 1.0
    assert cpus_per_client(3.0, 0.0) == 3.0
    with pytest.raises(ConfigError, match="--cpus-per-client = 0"):
        cpus_per_client(0.0, 0.0)
    config = _config(tiny_bert, tmp_path)
    assert choose_engine("auto", config, ray_backend(config, cpus_per_client(None, 0.0), 0.0)) == "in-process"
