"""The distributed-DP reports in docs/ are exactly what their committed records give: a
report edited by hand, or records changed without regenerating it, fail here."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_distributed_results_report_is_its_records():
    from simulations import distributed_study

    records = distributed_study._records()
    assert records, "docs/results/records/distributed/ holds no records"
    assert (ROOT / "docs" / "results-distributed.md").read_text(encoding="utf-8") == distributed_study.report(records)


def test_the_distributed_audit_report_is_its_record():
    import json

    from simulations import distributed_audit

    record = json.loads(distributed_audit.RECORD.read_text(encoding="utf-8"))
    committed = distributed_audit.REPORT.read_text(encoding="utf-8")
    assert committed == distributed_audit.audit_markdown(record, heading="#")
