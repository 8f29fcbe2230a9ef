"""The empirical audit of one distributed discrete Gaussian step (`simulations.distributed_audit`),
through the real encoding, OpenDP noise shares, modular sum and decoding: the honest
mechanism passes, and each control (noise off, dropped shares, no canary) comes out as it
must. The design is smaller than the default (500 canaries, 100 guesses, d = 8192) with
t = 20 so that it keeps the power: a dropped share leaves a bound above 2.1 in 99.9% of
simulated audits, the honest bound stays below 1.2 in 99.9%."""

from __future__ import annotations

import json

import pytest

from simulations import distributed_audit as audit

SMALL = dict(canaries=500, guesses=100, contributors=20)
SMALL_FLAGS = ["--canaries", "500", "--guesses", "100", "--contributors", "20"]


@pytest.fixture(scope="module")
def design():
    return audit.Design(**SMALL)


@pytest.fixture(scope="module")
def calibrated(design):
    return audit.calibrate(design)


@pytest.fixture(scope="module")
def rows(design, calibrated):
    return {control: audit.run_audit(design, control, calibrated) for control in audit.CONTROLS}


def test_calibration_meets_the_claim_and_the_dimension_keeps_canaries_apart(design, calibrated):
    spec, claimed = calibrated
    assert spec.dim == 8192 and spec.contributors == 20  # 16 x 500 rounded up to a power of two
    assert 1.99 < claimed <= 2.0
    assert spec.granularity == pytest.approx(spec.clip / 1000)  # the server's choice, far from wrapping


def test_the_honest_mechanism_passes_and_its_noise_measures_as_planned(rows, calibrated):
    row = rows["honest"]
    spec, claimed = calibrated
    assert row["shares"] == 20 and row["included"] > 200
    assert row["verdict"] == "PASS" and row["as_expected"], row["why"]
    assert row["lower_bound"] <= claimed
    # every share added: the scores' spread is the planned noise multiplier (plus a little crosstalk)
    assert 0.85 * spec.noise_multiplier < row["score_spread"] < 1.2 * spec.noise_multiplier
    assert row["wrapped"] == 0.0


def test_noise_off_is_caught(rows):
    row = rows["noise-off"]
    assert row["shares"] == 0 and row["epsilon_as_run"] is None
    assert row["lower_bound"] > row["claimed_epsilon"], row
    assert row["verdict"] == "FAIL" and row["as_expected"], row["why"]
    assert row["score_spread"] < 0.4  # crosstalk between canaries only


def test_dropped_noise_is_caught(rows):
    row = rows["dropped-noise"]
    assert row["shares"] == 1
    assert row["epsilon_as_run"] > 5 * row["claimed_epsilon"]  # what one share of 20 really gives
    assert row["lower_bound"] > row["claimed_epsilon"], row
    assert row["verdict"] == "FAIL" and row["as_expected"], row["why"]


def test_no_canary_gives_a_bound_near_zero(rows):
    row = rows["no-canary"]
    assert row["included"] == 0 and row["shares"] == 20
    assert row["lower_bound"] < audit.ABOUT_ZERO, row
    assert abs(row["v"] - row["r"] / 2) < 0.2 * row["r"]  # guesses at chance
    assert row["verdict"] == "PASS" and row["as_expected"], row["why"]


def test_the_verdict_fails_a_mechanism_that_breaks_its_claim():
    base = {"claimed_epsilon": 2.0}
    assert not audit.verdict({**base, "control": "honest", "lower_bound": 2.5})[0]
    assert not audit.verdict({**base, "control": "noise-off", "lower_bound": 1.0})[0]
    assert not audit.verdict({**base, "control": "dropped-noise", "lower_bound": 2.0})[0]
    assert not audit.verdict({**base, "control": "no-canary", "lower_bound": 0.8})[0]


def test_report_only_regenerates_the_markdown_from_the_record(tmp_path, design, rows, capsys):
    record = audit.record_of(design, list(rows.values()))
    record_file, report_file = tmp_path / "records" / "audit.json", tmp_path / "audit.md"
    audit.write_record(record, record_file)
    assert audit.main(["--report-only", "--record-file", str(record_file), "--report-file", str(report_file)]) == 0
    text = report_file.read_text()
    assert text == audit.audit_markdown(json.loads(record_file.read_text()), heading="#")
    assert text.startswith("# Privacy audit of distributed DP")
    for row in rows.values():
        assert f"| {row['lower_bound']:.3f} | {row['claimed_epsilon']:.3f} |" in text
    assert "only 1 of 20 nodes adds its share" in text and "| NO |" not in text
    section = audit.audit_markdown(record)
    assert section.startswith("## ") and section.count("| yes |") == 4
    assert section.count("| FAIL | FAIL (caught) | yes |") == 2


def test_report_only_without_a_record_is_a_one_line_error(tmp_path, capsys):
    code = audit.main(["--report-only", "--record-file", str(tmp_path / "none.json"),
                       "--report-file", str(tmp_path / "x.md")])
    assert code == 2 and not (tmp_path / "x.md").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags", [["--control", "bogus"], ["--guesses", "2000"], ["--shares-kept", "16"],
                                   ["--record"], ["--epsilon", "-1"], ["--canaries", "x"]])
def test_bad_flags_are_one_line_errors(flags, capsys):
    try:
        code = audit.main(flags)
    except SystemExit as stop:
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("distributed audit: error:"), err


def test_the_command_exits_non_zero_when_a_control_is_not_caught(capsys):
    # a claim of 5 is beyond what 100 guesses can refute (at most ~3.5): noise off goes unnoticed
    assert audit.main(SMALL_FLAGS + ["--control", "noise-off", "--epsilon", "5"]) == 1
    assert "control FAILED" in capsys.readouterr().out
    assert audit.main(SMALL_FLAGS + ["--control", "noise-off"]) == 0
