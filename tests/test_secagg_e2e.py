"""SecAgg+ on real Flower simulations (Ray): the server never holds a node's update, the
unmasked mean equals the plain one within the quantization error, nodes that drop after
masking are recovered from the others' Shamir shares, and below the threshold the round
fails with its reason recorded. Dropouts are injected by a wrapper around the real
ClientApp (a node that stops answering at a given stage)."""

import json
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from flwr.app import Message
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedtune.federation.checkpoint import load_checkpoint
from fedtune.config import build_config
from simulations.settings import simulation_settings
from tests.conftest import make_texts, write_csv

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the wrappers below travel to Ray workers by value
STAGE_RECORD = "secaggplus_configs"


def _config(tiny_bert, data, nodes, secure, rounds=1, **federation):
    return build_config({
        "model": {"path": str(tiny_bert), "max_seq_len": 16}, "data": {"path": str(data)},
        "training": {"epochs": 1, "rounds": rounds, "batch_size": 8}, "dp": {"noise_seed": 5},
        "federation": {"clients_per_round": nodes, "min_clients": 3, "secure_aggregation": secure, **federation},
        "simulation": {"num_clients": nodes, "central_holdout": 0.2},
    })


class RecordingGrid:
    """The server's grid, keeping every reply it hands the server (what the server sees)."""

    def __init__(self, grid):
        self._grid, self.replies = grid, []

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies

    def pull_messages(self, message_ids):
        replies = list(self._grid.pull_messages(message_ids))
        self.replies += replies
        return replies


class DropAt:
    """The real ClientApp; the nodes of partitions `drop` stop answering at `stage`."""

    def __init__(self, app, stage: str, drop: set[int]):
        self.app, self.stage, self.drop = app, stage, drop

    def __call__(self, msg: Message, context) -> Message:
        configs = msg.content.config_records.get(STAGE_RECORD, {})
        stage = configs.get("stage", "plain")  # "plain": a training message of a round without SecAgg+
        if stage == self.stage and int(context.node_config["partition-id"]) in self.drop:
            raise RuntimeError(f"node drops out at {self.stage}")
        return self.app(msg, context)


def _simulate(config, run_dir, drop_stage=None, drop=()):
    """A real simulation with the harness's nodes; returns what the server's grid saw."""
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from server.server_app import run_federation
    from simulations.partition import held_out_table
    from simulations.run import SimulationNodes, prepare_simulation, ray_backend

    config = prepare_simulation(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    seen = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        recording = seen["grid"] = RecordingGrid(grid)
        try:
            run_federation(recording, config, run_dir, eval_table=held_out_table(config), log=lambda *_: None)
        except Exception as exc:  # the round failure is what some tests look for
            seen["error"] = exc

    inner = make_client_app(SimulationNodes(config, str(run_dir)))
    client_app = inner
    if drop:
        wrapper = DropAt(inner, drop_stage, set(drop))
        client_app = ClientApp()
        client_app.train()(lambda msg, context: wrapper(msg, context))
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=simulation_settings(config).num_clients,
                   backend_config=ray_backend(config, 1.0, 0.0))
    return seen


def _adapter(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoint.safetensors").adapter


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("secagg") / "rows.csv", make_texts(200, seed=8))


def test_the_server_holds_only_masked_vectors_and_the_mean_matches_the_plain_run(tiny_bert, data, tmp_path):
    """A full 2-round simulation, node-level DP-SGD and user-level DP-FedAvg on, same seeds:
    with SecAgg+ the server never holds a node's tensors, and the run ends where the plain
    run ends, within 1e-3 per coordinate (quantization: about 4e-6 per node and round)."""
    user_dp = {"user_dp_clip": 2.0, "user_dp_noise": 0.3}
    seen = _simulate(_config(tiny_bert, data, 3, True, rounds=2, **user_dp), tmp_path / "secure")
    assert "error" not in seen, seen.get("error")
    masked = [m for m in seen["grid"].replies if not m.has_error()
              and "masked_params" in m.content.config_records.get(STAGE_RECORD, {})]
    assert len(masked) == 6  # 3 nodes x 2 rounds
    from flwr.common import bytes_to_ndarray

    for reply in masked:
        assert all(len(record) == 0 for record in reply.content.array_records.values())  # no tensor left unmasked
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in
                                 reply.content.config_records[STAGE_RECORD]["masked_params"]]).astype(np.float64)
        # an unmasked quantized update lies in [0, 2^22 + 1]; masked, the values fill [0, 2^32) uniformly
        assert np.mean(values > 2**23) > 0.9 and abs(values.mean() / 2**32 - 0.5) < 0.1
    _simulate(_config(tiny_bert, data, 3, False, rounds=2, **user_dp), tmp_path / "plain")
    _close_and_moved(tmp_path, _config(tiny_bert, data, 3, False))
    record = json.loads((tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["secure_aggregation"] is True and len(record["clients_accepted"]) == 3


def _close_and_moved(tmp_path, config):
    """The secure run ends where the plain run ends, much closer than either moved from the
    initial adapter (so a wrong or zero mean could not pass)."""
    from fedtune.models.adapter_io import adapter_state
    from fedtune.training.model_cache import MODELS
    from simulations.run import prepare_simulation

    initial = adapter_state(MODELS.get(prepare_simulation(config), 2)[0])
    secure, plain = _adapter(tmp_path / "secure"), _adapter(tmp_path / "plain")
    moved = max(float(np.max(np.abs(plain[k] - initial[k]))) for k in plain)
    apart = max(float(np.max(np.abs(secure[k] - plain[k]))) for k in plain)
    assert moved > 1e-2 and apart < moved / 100, (moved, apart)
    return apart, moved


def test_two_of_five_nodes_dropping_after_masking_still_give_the_right_mean(tiny_bert, data, tmp_path):
    seen = _simulate(_config(tiny_bert, data, 5, True), tmp_path / "secure", drop_stage="unmask", drop={3, 4})
    assert "error" not in seen, seen.get("error")
    assert sum(m.has_error() for m in seen["grid"].replies) == 2  # the two really dropped, after masking
    _simulate(_config(tiny_bert, data, 5, False, weight_cap=0.0, adaptive_norm_bound=0.0), tmp_path / "plain")
    _close_and_moved(tmp_path, _config(tiny_bert, data, 5, False))
    secure, plain = _adapter(tmp_path / "secure"), _adapter(tmp_path / "plain")
    from simulations.partition import partition_report
    from simulations.run import prepare_simulation

    sizes = partition_report(prepare_simulation(_config(tiny_bert, data, 5, False)))
    assert len({p["examples"] for p in sizes}) == 1  # equal partitions: uniform and example weights agree
    for key in plain:
        assert np.allclose(secure[key], plain[key], atol=1e-4), key


def test_a_node_lost_before_masking_leaves_the_mean_of_the_others(tiny_bert, data, tmp_path):
    """One of five refuses in the collect stage: its pairwise masks are rebuilt from the
    others' shares and the mean is that of the four, as in a plain round without it."""
    seen = _simulate(_config(tiny_bert, data, 5, True), tmp_path / "secure", drop_stage="collect_masked_vectors",
                     drop={4})
    assert "error" not in seen, seen.get("error")
    record = json.loads((tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()[0])
    assert len(record["clients_accepted"]) == 4 and len(record["clients_refused"]) == 1
    _simulate(_config(tiny_bert, data, 5, False, weight_cap=0.0, adaptive_norm_bound=0.0), tmp_path / "plain",
              drop_stage="plain", drop={4})
    _close_and_moved(tmp_path, _config(tiny_bert, data, 5, False))


def test_below_the_threshold_the_round_fails_and_says_why(tiny_bert, data, tmp_path):
    seen = _simulate(_config(tiny_bert, data, 5, True), tmp_path / "secure", drop_stage="collect_masked_vectors",
                     drop={2, 3, 4})
    assert "secure aggregation halted" in str(seen.get("error"))
    failure = json.loads((tmp_path / "secure" / "failures.jsonl").read_text().splitlines()[0])
    assert failure["round"] == 1 and "fewer than the threshold" in failure["reason"]
    assert not (tmp_path / "secure" / "metrics.jsonl").exists()
