"""Experiment tracking (`--log-to`): each tracker's files, read back with that library's
own reader, hold exactly the numbers of the round records metrics.jsonl holds."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from fedtune.errors import ConfigError
from fedtune.reporting.tracking import Trackers, parse_log_to, scalars

RECORDS = [  # the shape FederationServer appends to metrics.jsonl
    {"round": r, "evaluation": "central", "loss": 0.7 - r / 10, "accuracy": 0.5 + r / 10, "train_loss": None,
     "clients_accepted": [11, 12, 13][:r], "clients_rejected": [], "clients_refused": [[14, "policy-refused"]],
     "epsilon_max": 1.5 * r, "epsilon_mean": 1.2 * r, "user_epsilon": None, "noise": "noise seeded from OS entropy",
     "cohort": {"method": "poisson", "registered": 1000, "sampled": 10, "rate": 0.01, "accounted_rate": 0.01},
     "bytes_sent": 1000 * r, "bytes_received": 900 * r, "seconds": 2.5, "evaluation_seconds": 0.5,
     "train_seconds_sum": 1.75, "resident_mb": 700.0}
    for r in (1, 2, 3)]


def read_tensorboard(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def read_mlflow(database: Path) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{database.resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedtune").experiment_id])
    return {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)} for key in run.data.metrics}


def wandb_records(path: Path):
    """The records of a W&B offline transaction log (`run-*.wandb`), decoded with wandb's
    own protobuf schema (`wandb_internal_pb2.Record`). wandb 0.31 has no Python reader for
    offline runs (its `wandb sync` replays them through the Go core), so the framing, a
    LevelDB log (32 KiB blocks of [crc32c:4][length:2][type:1] chunks) after W&B's 7-byte
    header, is unpacked here."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    position, block, pending = 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: one record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_wandb(folder: Path) -> dict[str, dict[int, float]]:
    import json

    history: dict[str, dict[int, float]] = {}
    for path in sorted(folder.glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            step = int(row.pop("_step"))
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, {})[step] = value
    return history


def expected(records) -> dict[str, dict[int, float]]:
    table: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in scalars(record).items():
            table.setdefault(key, {})[record["round"]] = value
    return table


def test_the_numbers_logged_are_the_records_numbers_flat():
    values = scalars(RECORDS[1])
    assert values["accuracy"] == 0.7 and values["epsilon_max"] == 3.0 and values["clients_accepted"] == 2.0
    assert values["clients_refused"] == 1.0 and values["cohort_registered"] == 1000.0
    assert "train_loss" not in values and "noise" not in values and "user_epsilon" not in values and "round" not in values
    assert scalars({"round": 1, "epsilon_max": math.inf})["epsilon_max"] == math.inf  # non-private: shown, not hidden


def test_all_three_trackers_write_what_their_readers_read_back(tmp_path):
    from fedtune.config import Config
    from fedtune.reporting.tracking import config_params

    trackers = Trackers(("tensorboard", "mlflow", "wandb"), tmp_path, config_params(Config()))
    for record in RECORDS:
        trackers.log(record)
    trackers.close()
    want = expected(RECORDS)
    tensorboard = read_tensorboard(tmp_path / "tensorboard")
    assert tensorboard.keys() == want.keys()
    for key, steps in want.items():
        assert tensorboard[key] == pytest.approx(steps, rel=1e-6), key  # float32 on disk
    assert read_mlflow(tmp_path / "mlflow.db") == want
    assert read_wandb(tmp_path / "wandb") == want


def test_a_resumed_run_continues_the_same_runs(tmp_path):
    first = Trackers(("mlflow", "wandb"), tmp_path, {"training.rounds": 3})
    first.log(RECORDS[0])
    first.close()
    second = Trackers(("mlflow", "wandb"), tmp_path, {"training.rounds": 3})
    for record in RECORDS[1:]:
        second.log(record)
    second.close()
    assert read_mlflow(tmp_path / "mlflow.db")["accuracy"] == expected(RECORDS)["accuracy"]  # one run, three steps
    run_id = (tmp_path / "wandb-run-id").read_text().strip()
    folders = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f"-{run_id}" in folder.name for folder in folders)  # one W&B run, resumed
    assert read_wandb(tmp_path / "wandb")["accuracy"] == expected(RECORDS)["accuracy"]


@pytest.mark.parametrize("text, message", [
    ("tensorbord", "--log-to = 'tensorbord': expected a comma-separated subset of tensorboard, mlflow, wandb"),
    ("mlflow,comet", "expected a comma-separated subset"),
])
def test_unknown_trackers_are_one_line_errors(text, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_log_to(text)
    assert "\n" not in str(error.value)


def test_no_tracker_is_the_default():
    assert parse_log_to("") == () and parse_log_to(None) == ()
    assert parse_log_to(" TensorBoard , mlflow,tensorboard") == ("tensorboard", "mlflow")


@pytest.mark.parametrize("command", ["simulate", "sweep"])
def test_the_commands_refuse_a_bad_tracker_before_anything_runs(tmp_path, command):
    import subprocess
    import sys

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "fedtune", command, "--log-to", "neptune", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "neptune" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
