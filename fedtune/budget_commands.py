"""`fedtune budget`: a node's privacy budgets, for the person who answers for them.

A budget folder names each ledger by a fingerprint of its rows; a privacy officer needs the
data it protects, what it has spent, what its cap leaves and what was charged last.
`fedtune budget` lists every ledger of the budget folder (or of each --dir: a budget
folder, or a simulation's run directory, whose virtual clients keep theirs below
`clients/`); `fedtune budget show LEDGER` prints one ledger's whole history. Both only read
(`fedtune.privacy.budget_listing`): they take no lock and create nothing, so they are safe
beside a node that is training.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

DESCRIPTION = (
    "List the privacy budgets of this machine's nodes: one row per ledger with the data it protects (as its "
    "operator named it when the budget began), the rows it protects, epsilon spent, the cap, what remains, the "
    "last charge, the accountant and delta. Reads the budget folder ($FEDTUNE_HOME/budgets, default "
    "~/.fedtune/budgets) and every folder fedtune noted in $FEDTUNE_HOME/budget-folders.txt (simulation runs, "
    "nodes' and train-local runs' own --budget-dir), unless --dir names others. Read-only: safe while a node "
    "trains.")


def _add_reading_flags(parser, dirs: str, as_json: str) -> None:
    parser.add_argument("--dir", dest=dirs, action="append", metavar="DIR",
                        help="a budget folder, or a run directory whose budget folders lie below it (a simulation "
                             "keeps each virtual client's in clients/client-NNNNN); repeatable (default: "
                             "$FEDTUNE_HOME/budgets and the folders noted in $FEDTUNE_HOME/budget-folders.txt)")
    parser.add_argument("--json", dest=as_json, action="store_true", help="print JSON instead of a table")


def add_budget_parser(subparsers) -> None:
    """`fedtune budget [--dir DIR ...] [--json]` and `fedtune budget show LEDGER`. The two
    parsers keep their flags under different names: argparse lets a subcommand's defaults
    overwrite the parent's values, so `--dir` works on either side of `show`."""
    parser = subparsers.add_parser("budget", help="list the privacy budgets: data protected, epsilon spent, cap, "
                                   "remaining, last charge", description=DESCRIPTION)
    _add_reading_flags(parser, "dirs", "json")
    sub = parser.add_subparsers(dest="budget_command", metavar="{show}")
    show = sub.add_parser("show", help="one ledger's history: each charge, its label and time, epsilon after it",
                          description="Print one ledger's history: every call with its time and label, what it "
                          "charged (or changed: a cap set, delta lowered, ledgers merged) and the epsilon after it.")
    show.add_argument("ledger", help="a ledger id as `fedtune budget` lists it (a prefix is enough) or a ledger file")
    _add_reading_flags(show, "show_dirs", "show_json")
    parser.set_defaults(run=run_budget)


def run_budget(args) -> int:
    from fedtune.privacy.budget import default_budget_dir, remembered_budget_folders
    from fedtune.privacy.budget_listing import budget_folders

    directories = ([*(args.dirs or []), *(getattr(args, "show_dirs", None) or [])]
                   or [default_budget_dir(), *remembered_budget_folders()])
    as_json = args.json or getattr(args, "show_json", False)
    folders, missing = budget_folders(directories)
    if args.budget_command == "show":
        return _show(args.ledger, folders, directories, as_json)
    return _list(directories, folders, missing, as_json)


# -- the list ------------------------------------------------------------------------------
def _list(directories, folders, missing, as_json: bool) -> int:
    from fedtune.privacy.budget_listing import list_budgets

    summaries = list_budgets(folders)
    if as_json:
        print(json.dumps({"budgets": [s.to_dict() for s in summaries], "folders": [str(f.path) for f in folders],
                          "missing": [str(path) for path in missing]}, indent=2))
        return 0
    for path in missing:
        print(f"no budgets: {path} does not exist")
    present = [d for d in directories if Path(d) not in missing]
    if not summaries:
        if present:
            print(f"no budgets in {', '.join(map(str, present))}")
        return 0
    roots = {f.root for f in folders}
    where = (f"{len(folders)} folders under {', '.join(map(str, present))}" if len(folders) > 1
             else str(folders[0].path))
    print(f"{len(summaries)} budget{'s' if len(summaries) != 1 else ''} in {where} "
          "(epsilon at each ledger's delta)")
    head = ["ledger", "rows", "spent", "cap", "remaining", "last charge", "accountant", "delta", "folder", "source"]
    body = [_row(s, full_folder=len(roots) > 1) for s in summaries]
    if len(folders) == 1:  # the header names the one folder
        head, body = [c for i, c in enumerate(head) if i != 8], [[c for i, c in enumerate(r) if i != 8] for r in body]
    for line in table(head, body, right={1, 2, 3, 4, 7}):
        print(line)
    for s in summaries:
        if s.problem:
            print(f"ledger {s.ledger_id}: {s.problem}")
    return 0


def _row(s, full_folder: bool = False) -> list[str]:
    """One ledger's cells; the folder (relative to the --dir it was found under, unless
    several were given) sits before the source, which is last because it is the longest."""
    last = s.last_charge
    folder = str(s.folder.path) if full_folder else (str(s.folder.path.relative_to(s.folder.root)) or ".")
    return [s.ledger_id[:12], "?" if s.rows is None else str(s.rows), _epsilon(s.spent),
            "none" if s.cap is None else f"{s.cap:g}", "-" if s.remaining is None else _epsilon(s.remaining),
            f"{_when(last.get('time'))} {last.get('label', '')}".strip() if last else "none",
            s.accountant or "?", "?" if s.delta is None else f"{s.delta:g}", folder,
            s.source or "(not recorded)"]


# -- one ledger ----------------------------------------------------------------------------
def _show(spec: str, folders, directories, as_json: bool) -> int:
    from fedtune.privacy.budget_listing import (BudgetFolder, find_ledger, index_counts, ledger_history,
                                                read_summary)

    path = find_ledger(spec, folders, directories)
    folder = BudgetFolder(path.parent, path.parent)
    summary = read_summary(path, folder, index_counts(path.parent))
    ledger, calls = ledger_history(path)  # raises the ledger's own one-line error when it is not one
    if as_json:
        print(json.dumps({**summary.to_dict(), "calls": calls}, indent=2))
        return 0
    first = f" (first seen {_when(summary.first_seen, seconds=True)})" if summary.first_seen else ""
    print(f"ledger {summary.ledger_id}: {path}")
    print(f"source: {summary.source or '(not recorded)'}{first}")
    print(f"rows protected: {'unknown (no record index beside it)' if summary.rows is None else summary.rows}")
    cap = "no cap" if ledger.max_epsilon is None else \
        f"cap {ledger.max_epsilon:g} (remaining {_epsilon(summary.remaining)})"
    print(f"epsilon spent {_epsilon(summary.spent)}, {cap}, at delta {ledger.delta:g} ({ledger.accountant}); "
          f"{summary.charges} charge{'s' if summary.charges != 1 else ''}")
    if not calls:
        print("no calls yet")
        return 0
    print()
    body = [[_when(c["time"], seconds=True), c["label"], c["charged"],
             _epsilon(c["epsilon_after"]) if c["epsilon_after"] is not None else "-"] for c in calls]
    for line in table(["time", "label", "charged", "epsilon after"], body, right={3}):
        print(line)
    return 0


# -- text ----------------------------------------------------------------------------------
def table(head: list[str], body: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    """A plain aligned text table: numbers (the columns in `right`) right-aligned."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def line(cells):
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(head), *(line(row) for row in body)]


def _epsilon(value) -> str:
    if value is None:
        return "?"
    return "inf" if math.isinf(value) else f"{value:.3f}"


def _when(stamp, seconds: bool = False) -> str:
    if not isinstance(stamp, (int, float)):
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M", time.localtime(stamp))
