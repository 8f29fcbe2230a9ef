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


def test_every_distributed_cells_epsilon_is_recomputed_from_its_logged_parameters():
    """The ledgers a distributed record carries: each epsilon is what the accountant gives
    from the logged (z, tau, d, q, steps) alone, within the site's cap."""
    from fedtune.privacy import ddgauss_accounting
    from simulations import distributed_study

    cells = [r for r in distributed_study._records() if r["method"] == "distributed"]
    assert cells
    for record in cells:
        for ledger in record["ledgers"]:
            entries = [tuple(e) for e in ledger["distributed"]]
            recomputed = ddgauss_accounting.epsilon(entries, ledger["delta"], [tuple(h) for h in ledger["history"]])
            assert abs(recomputed - ledger["epsilon"]) <= 1e-9 * max(1.0, recomputed)
            assert recomputed <= record["epsilon"] * (1 + 1e-9)
