"""The results report and benchmark workloads: built from real sweep tables, bad input refused."""

import json
import math
import sys
from pathlib import Path

from fedtune.atomic import atomic_write_json
from fedtune.config import config_from_toml_text
from simulations.results import DATASETS, cells_for, main, write_report
from simulations.sweep import write_tables

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_grid_covers_every_budget_for_lora_and_both_partitions():
    cells = cells_for("0,1,2", all_ffa=False)
    lora = {(c.partition, c.epsilon) for c in cells if not c.ffa}
    assert lora == {(p, e) for p in ("iid", "dirichlet-0.3") for e in (math.inf, 8.0, 3.0, 1.0)}
    assert {c.seed for c in cells} == {0, 1, 2} and all(c.num_clients == 10 for c in cells)
    assert len(cells_for("0,1,2", all_ffa=True)) == 3 * 16


def test_every_dataset_plan_is_a_valid_config():
    for plan in DATASETS.values():
        config = config_from_toml_text(plan.base_toml())
        assert config.federation.num_clients == 10 and config.federation.central_holdout > 0


def _fake_sweep(folder: Path) -> None:
    cells = cells_for("0,1", all_ffa=False)[:4]  # non-private and epsilon 8, IID LoRA, two seeds
    rows = [{"cell": c.name, "target_epsilon": "inf" if math.isinf(c.epsilon) else c.epsilon, "num_clients": 10,
             "partition": c.partition, "ffa": c.ffa, "seed": c.seed, "accuracy": 0.8 - 0.1 * i, "macro_f1": 0.5,
             "loss": 1.0, "best_accuracy": 0.8, "epsilon_spent_max": math.inf if math.isinf(c.epsilon) else 7.99,
             "rounds": 3, "seconds": 60.0} for i, c in enumerate(cells)]
    baseline = {"accuracy": 0.9, "macro_f1": 0.88, "loss": 0.3, "majority_accuracy": 0.4, "seconds": 30.0}
    folder.mkdir(parents=True)
    write_tables(folder, cells, rows, baseline)
    atomic_write_json(folder / "baseline.json", baseline)
    atomic_write_json(folder / "plan.json", {"why": "a test plan", "learning_rate": 0.01})
    atomic_write_json(folder / "baseline-lr0.001.json", {**baseline, "accuracy": 0.95})


def test_report_is_written_from_the_sweep_tables(tmp_path):
    _fake_sweep(tmp_path / "runs" / "tweets")
    report = write_report(tmp_path / "runs", tmp_path / "docs" / "results.md")
    text = report.read_text()
    assert "| federated, IID, LoRA | 0.750 ± 0.071 | 0.550 ± 0.071 | - | - |" in text
    assert "| centralized, pooled, LoRA, lr 0.01 (reference, seed 0) | 0.900 |" in text
    assert "| centralized, pooled, LoRA, lr 0.001 (reference, seed 0) | 0.950 |" in text
    assert "7.990 at target 8" in text and "Machine:" in text
    assert (tmp_path / "docs" / "results" / "tweets.png").is_file()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    report = tmp_path / "results.md"
    assert main(["--datasets", "nope", "--out", str(tmp_path / "runs"), "--report", str(report)]) == 2
    assert main(["--report-only", "--out", str(tmp_path / "runs"), "--report", str(report)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "--datasets = 'nope'" in errors[0] and "no finished sweep" in errors[1]
    assert not report.exists()


def test_pfl_workload_is_central_dp_fedavg_without_local_dp():
    from pfl_compare import FULL, QUICK

    for workload in (QUICK, FULL):
        config = config_from_toml_text(workload.toml())
        assert not config.dp.enabled
        assert config.federation.user_dp_clip == workload.clip and config.federation.user_dp_noise == workload.noise_multiplier
        assert config.federation.clients_per_round == workload.cohort < config.federation.num_clients
        held_out = round(config.federation.central_holdout * config.data.max_examples)
        assert held_out == 500


def test_run_all_table_names_every_goal(tmp_path):
    import run_all

    results = json.loads((Path(__file__).parent / "data" / "run_all_sample.json").read_text())
    text = run_all.render(results)
    for phrase in ("Opacus hooks", "matmul peak", "bare local training", "FlowerTune", "FFA-LoRA",
                   "1,000 vs 10", "clients per round", "pfl-research", "Machine:"):
        assert phrase in text, phrase


def test_a_finished_cell_is_matched_by_value_not_by_text(tmp_path):
    """A field added to the config later (with its default) must not re-run a finished cell;
    a changed value must."""
    from simulations.sweep import _ran_with

    config = config_from_toml_text(DATASETS["tweets"].base_toml())
    path = tmp_path / "cell.toml"
    path.write_text(config.to_toml().replace('precision = "fp32"\n', ""))
    assert _ran_with(path) == config
    path.write_text(config.to_toml().replace("rounds = 3", "rounds = 4"))
    assert _ran_with(path) != config
