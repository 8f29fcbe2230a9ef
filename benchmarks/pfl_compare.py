"""fedtune vs pfl-research (`pfl`) on one identical workload, measured side by side.

The workload: the same all-MiniLM-L6-v2 + LoRA model (same seeded initial adapter), the
same clients holding the same tweets (fedtune's seeded IID partition, handed to pfl as its
users), the same cohort per round, the same local steps (one epoch of fixed-size shuffled
batches, AdamW), FedAvg with **central Gaussian DP** (each client update clipped to S,
Gaussian noise of std sigma*S on the sum, divided by the cohort size: McMahan et al. 2018;
pfl's `GaussianMechanism` applied centrally, fedtune's `federation.user_dp_clip/noise`),
and the held-out set scored by the same evaluation code after every round.

Each side runs as its own process, timed end to end from the outside (imports, model load,
Ray for fedtune, everything), in ABBA order when repeated so drift hits both alike:

  fedtune  `fedtune simulate`: Flower simulation engine, Ray, a ClientApp per client call
  pfl      pfl's `FederatedAveraging` on its `SimulatedBackend`, in one process

    python benchmarks/pfl_compare.py [--quick] [--repeats 1] [--json out.json]
    pip install --no-deps pfl==0.6.0 prv-accountant==0.2.0   # what this benchmark adds
    (--no-deps: pfl 0.6.0 pins dp-accounting < 0.6, fedtune needs 0.6; the parts of pfl used
    here, FedAvg on its simulated backend and its Gaussian mechanism, run with 0.6)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Workload:
    clients: int
    cohort: int
    rows_per_client: int
    rounds: int
    batch_size: int = 8
    max_seq_len: int = 32
    learning_rate: float = 0.01
    clip: float = 0.5
    noise_multiplier: float = 0.3

    def toml(self) -> str:
        return f"""
[data]
dataset = "tweets"
max_examples = {self.clients * self.rows_per_client + 500}
[model]
max_seq_len = {self.max_seq_len}
[training]
rounds = {self.rounds}
epochs = 1
batch_size = {self.batch_size}
learning_rate = {self.learning_rate}
[dp]
enabled = false
[federation]
clients_per_round = {self.cohort}
min_clients = {self.cohort}
user_dp_clip = {self.clip}
user_dp_noise = {self.noise_multiplier}
[simulation]
num_clients = {self.clients}
central_holdout = {500 / (self.clients * self.rows_per_client + 500):.6f}
"""

    def describe(self) -> str:
        return (f"tweets, {self.clients} clients x {self.rows_per_client} rows, cohort {self.cohort}, {self.rounds} rounds, "
                f"1 local epoch (batch {self.batch_size}, AdamW lr {self.learning_rate}), seq {self.max_seq_len}, "
                f"all-MiniLM-L6-v2 + LoRA r8, central Gaussian DP (clip {self.clip}, noise multiplier "
                f"{self.noise_multiplier}), 500 held-out tweets scored every round")


QUICK = Workload(clients=20, cohort=5, rows_per_client=40, rounds=3)
FULL = Workload(clients=50, cohort=10, rows_per_client=60, rounds=5)


# ---------------------------------------------------------------- the pfl side (child process)


def run_pfl(config_path: Path, out: Path) -> None:
    """pfl's FedAvg + central Gaussian DP on fedtune's partitions; writes out/pfl.json."""
    import numpy as np
    import torch
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel
    from pfl.privacy import CentrallyAppliedPrivacyMechanism, GaussianMechanism

    from fedtune.models.adapter_io import adapter_state
    from fedtune.federation.central_eval import CentralEvaluator
    from fedtune.config import load_config
    from fedtune.training.losses import trim_batch
    from fedtune.training.local import build_model, prepare_data
    from fedtune.training.losses import PerExampleLoss
    from fedtune.models.base import load_tokenizer, resolve_model_path
    from simulations.partition import client_table, held_out_table
    from simulations.run import prepare_simulation
    from simulations.settings import simulation_settings

    config = prepare_simulation(load_config(config_path))
    fed, training = config.federation, config.training
    clients = simulation_settings(config).num_clients
    torch.manual_seed(training.seed)
    np.random.seed(training.seed)
    tokenizer = load_tokenizer(resolve_model_path(config.model))
    users = {}
    for cid in range(clients):
        data = prepare_data(config, tokenizer, table=client_table(config, cid), validation=False)
        users[cid] = [t.numpy() for t in data.train.tensors]
    peft_model = build_model(config, tokenizer, len(config.data.labels))
    criterion = PerExampleLoss(config.model.task)

    class Classifier(torch.nn.Module):
        """pfl's model contract (loss and metrics methods) around the same peft model."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def _logits(self, input_ids, attention_mask, labels):
            # pfl hands batches over as float tensors: restore the integer dtypes
            input_ids, attention_mask, labels = trim_batch(input_ids.long(), attention_mask.long(), labels.long(),
                                                           config.model.task)
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits, labels

        def loss(self, input_ids, attention_mask, labels):
            self.train()
            logits, labels = self._logits(input_ids, attention_mask, labels)
            return criterion(logits, labels).mean()

        @torch.no_grad()
        def metrics(self, input_ids, attention_mask, labels, eval=False):
            self.eval()
            logits, labels = self._logits(input_ids, attention_mask, labels)
            correct = float((logits.argmax(-1) == labels).sum())
            return {"accuracy": Weighted(correct, len(labels))}

    classifier = Classifier(peft_model)
    evaluator = CentralEvaluator(config, peft_model, tokenizer, held_out_table(config))
    rounds: list[dict] = []

    class CentralEvaluation(TrainingProcessCallback):
        """The same held-out scoring fedtune's server runs after each round."""

        def __init__(self):
            self.last = time.perf_counter()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            trained = time.perf_counter()
            scores = evaluator(adapter_state(peft_model))
            now = time.perf_counter()
            rounds.append({"round": central_iteration + 1, "accuracy": scores["accuracy"], "loss": scores["loss"],
                           "seconds": now - self.last, "evaluation_seconds": now - trained})
            self.last = now
            return False, Metrics()

    model = PyTorchModel(
        model=classifier,
        local_optimizer_create=lambda params, lr: torch.optim.AdamW(
            [p for p in params if p.requires_grad], lr=lr, weight_decay=training.weight_decay),
        central_optimizer=torch.optim.SGD([p for p in classifier.parameters() if p.requires_grad], lr=1.0))
    mechanism = GaussianMechanism(clipping_bound=fed.user_dp_clip, relative_noise_stddev=fed.user_dp_noise)
    user_ids = list(users)
    training_data = FederatedDataset(lambda uid: Dataset(users[uid], user_id=uid), get_user_sampler("minimize_reuse", user_ids))
    backend = SimulatedBackend(training_data=training_data, val_data=training_data,
                               postprocessors=[CentrallyAppliedPrivacyMechanism(mechanism)])
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=training.rounds, evaluation_frequency=training.rounds + 1,
                                           train_cohort_size=fed.clients_per_round, val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=training.learning_rate, local_num_epochs=training.epochs,
                                              local_batch_size=training.batch_size, local_max_grad_norm=None),
        model_eval_params=NNEvalHyperParams(local_batch_size=64),
        callbacks=[CentralEvaluation()], send_metrics_to_platform=False)
    (out / "pfl.json").write_text(json.dumps({"rounds": rounds}, indent=2) + "\n")


# ---------------------------------------------------------------- the parent: both sides, timed


def _timed(command: list[str], env_extra: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TQDM_DISABLE": "1", **(env_extra or {})})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{' '.join(command[:4])} ... failed:\n{result.stderr[-3000:]}")
    return seconds


def run_side(side: str, config_path: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if side == "fedtune":
        cpus = str(os.cpu_count() or 1)  # one client at a time with every core, as pfl trains users
        wall = _timed([sys.executable, "-m", "fedtune", "simulate", "--config", str(config_path), "--out", str(out),
                       "--cpus-per-client", cpus])
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    else:
        wall = _timed([sys.executable, str(Path(__file__).resolve()), "--side", "pfl", "--config", str(config_path),
                       "--out", str(out)])
        rounds = json.loads((out / "pfl.json").read_text())["rounds"]
    steady = rounds[1:] or rounds
    return {"side": side, "wall_seconds": round(wall, 2), "final_accuracy": rounds[-1]["accuracy"],
            "round_seconds_steady": round(statistics.mean(r["seconds"] for r in steady), 3),
            "rounds": [{k: r.get(k) for k in ("round", "accuracy", "loss", "seconds", "evaluation_seconds")} for r in rounds]}


def compare(workload: Workload, repeats: int = 1, log=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedtune-pfl-") as tmp:
        tmp = Path(tmp)
        config_path = tmp / "workload.toml"
        config_path.write_text(workload.toml())
        order = []
        for repeat in range(repeats):
            order += ["fedtune", "pfl"] if repeat % 2 == 0 else ["pfl", "fedtune"]  # ABBA
        runs: dict[str, list[dict]] = {"fedtune": [], "pfl": []}
        for index, side in enumerate(order):
            log(f"[pfl-compare] {side} run {len(runs[side]) + 1} ...")
            runs[side].append(run_side(side, config_path, tmp / f"{side}-{index}"))
    wall = {side: statistics.median(r["wall_seconds"] for r in rs) for side, rs in runs.items()}
    steady = {side: statistics.median(r["round_seconds_steady"] for r in rs) for side, rs in runs.items()}
    return {
        "workload": workload.describe(),
        "repeats": repeats,
        "wall_seconds": wall,
        "round_seconds_steady": steady,
        "fedtune_over_pfl_wall": round(wall["fedtune"] / wall["pfl"], 3),
        "fedtune_over_pfl_round": round(steady["fedtune"] / steady["pfl"], 3),
        "final_accuracy": {side: [r["final_accuracy"] for r in rs] for side, rs in runs.items()},
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smaller workload")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, in ABBA order")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--side", choices=["pfl"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "pfl":
        from fedtune.system.quiet import quiet_libraries

        quiet_libraries()
        run_pfl(Path(args.config), Path(args.out))
        return
    from fedtune.system.machine import machine

    result = {"benchmark": "pfl_compare", "machine": machine(), **compare(QUICK if args.quick else FULL, args.repeats)}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
