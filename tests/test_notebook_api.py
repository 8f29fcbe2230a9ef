"""`fedtune.simulate(...)` / `fedtune.load_run(...)`: what a notebook passes, and the
frames it gets back (columns documented in `fedtune.reporting.frames`). The real simulation
through this API runs in tests/test_simulation_e2e.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fedtune
from fedtune.config import Config
from fedtune.errors import ConfigError
from fedtune.privacy import PrivacyLedger
from fedtune.reporting.frames import LEDGER_COLUMNS, METRICS_COLUMNS
from simulations.api import resolve_config
from tests.test_tracking import RECORDS


def test_overrides_on_the_default_simulation_in_every_spelling():
    default = resolve_config()
    assert default.data.dataset == "bbc-news"
    flat = resolve_config({"dp.target_epsilon": 3, "training.rounds": 2})
    nested = resolve_config({"dp": {"target_epsilon": 3}, "training": {"rounds": 2}})
    flower = resolve_config({"dp.target-epsilon": 3, "training.rounds": 2})
    assert flat == nested == flower and flat.dp.target_epsilon == 3.0 and flat.training.rounds == 2
    assert flat.replace(dp=default.dp, training=default.training) == default


def test_a_config_or_a_toml_path_with_overrides_on_top(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[training]\nrounds = 7\n")
    assert resolve_config(path, {"training.epochs": 2}).training.rounds == 7
    assert resolve_config(str(path), {"training.epochs": 2}).training.epochs == 2
    base = Config()
    assert resolve_config(base, {"lora.rank": 4}).lora.rank == 4 and resolve_config(base) == base


@pytest.mark.parametrize("given, message", [
    ({"training.rounds": "ten"}, "training.rounds = 'ten': expected a whole number"),
    ({"dp.epsilon": 3}, "unknown key dp.epsilon"),
    ({"rounds": 3}, "'rounds': expected section.key"),
    (42, "config = int: expected a TOML path"),
])
def test_bad_input_is_the_clis_one_line_error(given, message):
    with pytest.raises(ConfigError, match=message) as error:
        resolve_config(given)
    assert "\n" not in str(error.value)


def test_fedtune_simulate_reaches_the_harness_and_fails_before_any_run(tmp_path):
    """Found through the `fedtune.api` entry point (the core never imports the harness):
    a bad override stops it before a run directory exists."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="federation.clients_per_round"):
        fedtune.simulate({"federation.clients_per_round": 0}, out=out)
    assert not out.exists()


def _run_dir(tmp_path: Path) -> Path:
    """A run directory as a simulation leaves it: records, config, each client's ledger."""
    run = tmp_path / "run"
    for client, rates in ((0, (0.1, 0.1)), (3, (0.2,))):
        ledger = PrivacyLedger("rdp", 1e-4, 8.0)
        for number, rate in enumerate(rates, start=1):
            ledger.charge(1.1, rate, 10, label=f"round {number}")
        ledger.charge_non_private(0, label="evaluation round 1")
        folder = run / "clients" / f"client-{client:05d}"
        folder.mkdir(parents=True)
        ledger.save(folder / "ledger-abc.json")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (run / "config.toml").write_text(Config().to_toml())
    return run


def test_load_run_gives_the_documented_frames(tmp_path):
    result = fedtune.load_run(_run_dir(tmp_path))
    assert list(result.metrics.columns[:len(METRICS_COLUMNS)]) == list(METRICS_COLUMNS)
    assert result.metrics["round"].tolist() == [1, 2, 3] and result.metrics["clients_accepted"].tolist() == [1, 2, 3]
    assert result.metrics["cohort_registered"].tolist() == [1000] * 3 and "noise" in result.metrics
    assert list(result.ledger.columns) == list(LEDGER_COLUMNS)
    charges = result.ledger[result.ledger["event"] == "charge"]
    assert charges["client"].tolist() == [0, 0, 3] and charges["round"].tolist() == [1, 2, 1]
    assert charges["sample_rate"].tolist() == [0.1, 0.1, 0.2] and (charges["accountant"] == "rdp").all()
    first, second = charges["epsilon_after"].tolist()[:2]
    assert 0 < first < second <= 8.0  # the ledger composes: the frame shows it call by call
    assert result.ledger[result.ledger["event"] == "non-private"]["label"].tolist() == ["evaluation round 1"] * 2
    assert result.clients["client"].tolist() == ["client-00000", "client-00003"]
    assert result.config == Config()
