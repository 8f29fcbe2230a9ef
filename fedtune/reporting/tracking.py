"""Experiment tracking: TensorBoard, MLflow and Weights & Biases (offline), fed from the
very records the server appends to `metrics.jsonl`, one step per round.

None of the three is needed for a default install (`pip install -e ".[tracking]"` adds
them); asking for one that is not installed is a one-line error before anything runs.
Everything is written inside the run directory, nothing leaves the machine:

    tensorboard   RUN_DIR/tensorboard/   event files   (tensorboard --logdir RUN_DIR/tensorboard)
    mlflow        RUN_DIR/mlflow.db      a SQLite store (mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db)
    wandb         RUN_DIR/wandb/         an offline run (wandb sync RUN_DIR/wandb/offline-run-*)

A resumed run continues the same MLflow and W&B runs (their ids are kept in the run
directory). MLflow stores an infinite epsilon (a non-private round) as the largest float.
What is logged: every number in a round's record (accuracy, loss, epsilon_max,
user_epsilon, seconds, bytes, ...), client lists as counts, the cohort's numbers as
`cohort_*`; the run's config once, as parameters. Nothing a node did not release.
"""

from __future__ import annotations

import importlib.util
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from fedtune.errors import ConfigError
from fedtune.reporting.frames import flat_record

PROJECT = "fedtune"
MLFLOW_DB = "mlflow.db"  # MLflow 3 keeps runs in a database; its file store is in maintenance mode


def parse_log_to(text: str | None, source: str = "--log-to") -> tuple[str, ...]:
    """`"tensorboard,mlflow"` -> ("tensorboard", "mlflow"), each known and installed."""
    names = tuple(dict.fromkeys(part.strip().lower() for part in (text or "").split(",") if part.strip()))
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{source} = {text!r}: expected a comma-separated subset of {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name].package) is None:
            raise ConfigError(f"{source}: {name} is not installed (pip install {TRACKERS[name].package}, or "
                              "pip install -e \".[tracking]\" for all three)")
    return names


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one round's record, flat (`fedtune.reporting.frames.flat_record`): what
    every tracker logs at step = round. An infinite epsilon (non-private) is logged as inf."""
    return {key: float(value) for key, value in flat_record(record).items()
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)}


def config_params(config) -> dict[str, Any]:
    """A config as flat `section.key` parameters (lists as comma-separated text)."""
    return {f"{section}.{key}": ",".join(map(str, value)) if isinstance(value, list) else value
            for section, values in config.to_dict().items() for key, value in values.items()}


def _kept_id(path: Path, new) -> str:
    """The id a resumed run continues with (written on first use)."""
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_id = str(new())
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


class _TensorBoard:
    def __init__(self, run_dir: Path, params: Mapping[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in params.items()), 0)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a crashed run keeps its finished rounds

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, params: Mapping[str, Any]):
        import logging

        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # the store's schema set-up is not the run's news
            logging.getLogger(name).setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=f"sqlite:///{(run_dir / MLFLOW_DB).resolve()}")
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        id_file = run_dir / "mlflow-run-id"
        fresh = not id_file.is_file()
        self.run_id = _kept_id(id_file, lambda: self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id)
        if fresh:
            for key, value in params.items():
                self.client.log_param(self.run_id, key, value)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, run_dir: Path, params: Mapping[str, Any]):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        run_id = _kept_id(run_dir / "wandb-run-id", lambda: secrets.token_hex(4))
        self.run = wandb.init(mode="offline", dir=str(run_dir), project=PROJECT, name=run_dir.name, id=run_id,
                              resume="allow", config=dict(params),
                              settings=wandb.Settings(console="off", x_disable_stats=True, x_disable_machine_info=True))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker(NamedTuple):
    package: str  # what must be installed (found without importing it)
    open: type    # (run_dir, params) -> an object with log(step, values) and close()


# The one registry: a new tracker is a class above and one entry here.
TRACKERS: dict[str, Tracker] = {
    "tensorboard": Tracker("tensorboard", _TensorBoard),
    "mlflow": Tracker("mlflow", _MLflow),
    "wandb": Tracker("wandb", _Wandb),
}


class Trackers:
    """The trackers a run asked for, fed one round record at a time."""

    def __init__(self, names: tuple[str, ...], run_dir: str | Path, params: Mapping[str, Any]):
        run_dir = Path(run_dir)
        self._open = [TRACKERS[name].open(run_dir, params) for name in names]

    def log(self, record: Mapping[str, Any]) -> None:
        values = scalars(record)
        for tracker in self._open:
            tracker.log(int(record["round"]), values)

    def close(self) -> None:
        for tracker in self._open:
            tracker.close()
        self._open = []
