"""One owner of the budget ritual (open, set the cap, lower delta, plan, persist, check the
fit): the node's rounds and evaluations, train-local, the audit and the federated audit go through
`fedtune.privacy.spending.spend`, so a cap the operator lowers binds every one of them.
Before, `fedtune audit` opened the budget without setting the cap and spent past it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedtune.cli import main
from tests.conftest import make_texts, write_csv

ROOT = Path(__file__).resolve().parents[1]


def test_the_audit_obeys_the_operators_current_cap(tiny_bert, tmp_path, capsys):
    data = write_csv(tmp_path / "rows.csv", make_texts(64, seed=3))
    common = ["--model", str(tiny_bert), "--data", str(data), "--max-seq-len", "16", "--batch-size", "16",
              "--epochs", "2", "--epsilon", "1", "--no-progress"]
    assert main(["train-local", *common, "--max-epsilon", "8", "--out", str(tmp_path / "run")]) == 0
    spent = json.loads((tmp_path / "run" / "ledger.json").read_text())["epsilon"]
    assert 0.9 < spent <= 1.0  # the ledger's stored cap is 8
    capsys.readouterr()
    audit = ["audit", *[a for a in common if a != "--no-progress"], "--canaries", "50", "--guesses", "20"]
    code = main([*audit, "--max-epsilon", "1.1", "--out", str(tmp_path / "audit")])
    err = capsys.readouterr().err
    assert code == 2 and "above their cap 1.1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "audit").exists()
    # with room under the cap, the same audit runs and is charged
    assert main([*audit, "--max-epsilon", "3", "--out", str(tmp_path / "audit-2")]) in (0, 1)
    assert json.loads((tmp_path / "audit-2" / "audit.json").read_text())["results"]


def test_every_budget_is_opened_through_the_one_ritual():
    """No module but the ritual opens a BudgetStore, and every charging path calls `spend`."""
    opened = [path.relative_to(ROOT) for folder in ("fedtune", "clients", "server", "simulations")
              for path in (ROOT / folder).rglob("*.py") if re.search(r"BudgetStore\(", path.read_text())]
    assert [str(p) for p in opened] == ["fedtune/privacy/spending.py"]
    for module in ("clients/node.py", "fedtune/training/local.py", "fedtune/audit/node_audit.py", "simulations/federated_audit.py"):
        assert "spend(" in (ROOT / module).read_text(), module
