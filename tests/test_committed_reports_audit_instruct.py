"""docs/audit.md and docs/results-instruct.md are exactly what their committed records give: a
report edited by hand, or records changed without regenerating it, fail here. Also the
instruct study's macro-F1, and the one-line error a damaged record gives."""

import json
import shutil

import pytest

from fedtune.errors import FedtuneError
from simulations import audit_table, federated_audit_table, instruct_results


def test_the_audit_report_is_its_records():
    records = audit_table.load_records()
    assert records, "docs/results/records/audit/ holds no records"
    assert audit_table.REPORT.read_text(encoding="utf-8") == audit_table.report(records)


def test_the_user_level_audit_report_is_its_records():
    records = federated_audit_table.load_records()
    assert {r["control"] for r in records} == set(federated_audit_table.RUNS), "a user-level audit run has no record"
    assert federated_audit_table.REPORT.read_text(encoding="utf-8") == federated_audit_table.report(records)
    audit = next(r for r in records if r["control"] == "none")
    assert audit["users"] == 1000 and float(audit["delta"]) <= 1e-4  # a delta that is not vacuous at this population


def test_the_instruct_report_is_its_records():
    records = instruct_results.load_records()
    assert records["trained"]["dp-eps8"], "docs/results/records/instruct/ holds no DP record"
    assert instruct_results.REPORT.read_text(encoding="utf-8") == instruct_results.report(records)


def test_recovered_records_say_so_in_the_reports():
    """A number recovered from an earlier report is not a measurement of this code: both
    reports say where such records came from and which command replaces them."""
    audit = audit_table.REPORT.read_text(encoding="utf-8")
    instruct = instruct_results.REPORT.read_text(encoding="utf-8")
    recovered = [r for r in audit_table.load_records() if "provenance" in r]
    assert ("recovered from the committed docs/audit.md" in audit) == bool(recovered)
    assert "recovered from the committed docs/results-instruct.md" in instruct
    assert "(n = 1, one seed only)" in instruct


def test_macro_f1_by_hand():
    # a: TP 1, FN 1 -> 2/3; b: TP 1, FP 1 -> 2/3; c: its only row answered "maybe" (outside the
    # classes): FN 1 and no class's false positive -> 0. Mean 4/9.
    assert instruct_results.macro_f1(["a", "a", "b", "c"], ["a", "b", "b", "maybe"]) == pytest.approx(4 / 9)
    # the out-of-label answer costs its own class only: a stays perfect
    assert instruct_results.macro_f1(["a", "b"], ["a", "maybe"]) == pytest.approx(0.5)
    assert instruct_results.macro_f1(["a", "a"], ["a", "a"], labels=["a", "b"]) == pytest.approx(0.5)


def test_the_majority_reference_comes_from_the_held_out_labels():
    reference = instruct_results.majority("tweets-instruct")
    assert reference["answer"] == "negative" and reference["accuracy"] == pytest.approx(135 / 300)
    assert reference["macro_f1"] == pytest.approx(270 / 435 / 3)  # negative's F1 2*135 / (2*135 + 165); others 0


def _damaged(tmp_path, source, name, damage):
    folder = tmp_path / "records"
    shutil.copytree(source, folder)
    path = folder / name
    record = json.loads(path.read_text(encoding="utf-8"))
    damage(record)
    path.write_text(json.dumps(record), encoding="utf-8")
    return folder


@pytest.mark.parametrize("module, name, damage, field", [
    (audit_table, "eps3-none.json", lambda r: r.pop("noise"), "noise"),
    (audit_table, "eps3-none.json", lambda r: r["findings"][1].pop("correct"), "findings[1].correct"),
    (instruct_results, "dp-eps8-seed0.json", lambda r: r.pop("macro_f1"), "macro_f1"),
    (instruct_results, "dp-eps8-seed0.json", lambda r: r["rounds"][0].pop("loss"), "rounds[0].loss"),
])
def test_a_record_missing_a_field_is_a_one_line_error(tmp_path, module, name, damage, field):
    folder = _damaged(tmp_path, module.RECORD_DIR, name, damage)
    with pytest.raises(FedtuneError) as raised:
        module.load_records(folder)
    message = str(raised.value)
    assert name in message and repr(field) in message and "\n" not in message


def test_infinities_are_written_as_plain_json():
    assert audit_table.plain_json({"a": [float("inf"), float("nan"), 1.5]}) == {"a": ["inf", None, 1.5]}
