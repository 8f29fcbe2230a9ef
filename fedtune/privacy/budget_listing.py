"""A node's budgets as a person asks about them: which data each ledger protects, what it
has spent, what is left, and what was charged when (`fedtune budget`).

A budget folder names each ledger by a fingerprint of its rows (`ledger-<id>.json`), which
nobody recognises; this module puts the operator's own name for the data beside it. It
only reads: no lock is taken (a listing must work while a node trains and must never make
one wait), no folder or file is created, and the record index is opened read-only. It reads
JSON and does not recompute an epsilon the ledger already stores (every save writes it), so
hundreds of ledgers list in a fraction of a second.

Where each column comes from:

    spent, cap, accountant, delta, calls  the ledger file (`PrivacyLedger.to_dict`)
    source, first seen                    the first line of the ledger's journal, written when it began
    rows                                  the record index: how many record digests point at the ledger now
"""

from __future__ import annotations

import json
import math
import sqlite3
import urllib.parse
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from fedtune.errors import ConfigError, FedtuneError
from fedtune.privacy.ledger import PrivacyLedger
from fedtune.privacy.record_index import INDEX_FILE

LEDGER_GLOB = "ledger-*.json"


@dataclass(frozen=True)
class BudgetFolder:
    """A folder that holds ledgers, and the folder the user named that led to it (a
    simulation's run directory holds one per virtual client, below `clients/`)."""

    path: Path
    root: Path


@dataclass(frozen=True)
class BudgetSummary:
    """One ledger as `fedtune budget` lists it. `spent` is None when the ledger cannot be
    read (then `problem` says why)."""

    ledger_id: str
    path: Path
    folder: BudgetFolder
    source: str = ""
    first_seen: float | None = None
    rows: int | None = None
    spent: float | None = None
    cap: float | None = None
    accountant: str = ""
    delta: float | None = None
    charges: int = 0
    last_charge: dict | None = None
    problem: str = ""

    @property
    def remaining(self) -> float | None:
        """What the cap still allows (0 once spent reaches it; None without a cap)."""
        if self.cap is None or self.spent is None:
            return None
        return max(0.0, self.cap - self.spent)

    def to_dict(self) -> dict:
        last = self.last_charge or {}
        return {"ledger": self.ledger_id, "path": str(self.path), "folder": str(self.folder.path),
                "source": self.source, "first_seen": self.first_seen, "rows": self.rows,
                "spent": _json_float(self.spent), "cap": self.cap, "remaining": _json_float(self.remaining),
                "accountant": self.accountant, "delta": self.delta, "charges": self.charges,
                "last_charge": {"time": last.get("time"), "label": last.get("label", "")} if last else None,
                "problem": self.problem}


def budget_folders(directories: Sequence[str | Path]) -> tuple[list[BudgetFolder], list[Path]]:
    """The budget folders at or below each of `directories`, and those of `directories`
    that do not exist. A folder is a budget folder when it holds a ledger or a record index."""
    found: list[BudgetFolder] = []
    missing: list[Path] = []
    for directory in map(Path, directories):
        if directory.is_file():
            raise ConfigError(f"--dir {directory}: a file, not a folder (give a budget folder or a run directory; "
                              "`fedtune budget show FILE` reads one ledger file)")
        if not directory.is_dir():
            missing.append(directory)
            continue
        holders = {path.parent for pattern in (LEDGER_GLOB, INDEX_FILE) for path in directory.rglob(pattern)}
        known = {folder.path.resolve() for folder in found}  # --dir given twice, or one inside another
        found.extend(BudgetFolder(path, directory) for path in sorted(holders) if path.resolve() not in known)
    return found, missing


def list_budgets(folders: Iterable[BudgetFolder]) -> list[BudgetSummary]:
    """Every ledger of every folder, and every ledger the record index names whose file is
    gone (the case an officer most needs to see: its spend can no longer be known)."""
    summaries = []
    for folder in folders:
        rows = index_counts(folder.path)
        files = sorted(folder.path.glob(LEDGER_GLOB))
        seen = set()
        for path in files:
            summary = read_summary(path, folder, rows)
            seen.add(summary.ledger_id)
            summaries.append(summary)
        for ledger_id in sorted(set(rows or {}) - seen):
            summaries.append(BudgetSummary(ledger_id, folder.path / f"ledger-{ledger_id}.json", folder,
                                           rows=rows[ledger_id], problem="ledger file missing: the record index "
                                           f"says it protects {rows[ledger_id]} rows, so what they spent is unknown"))
    return summaries


def read_summary(path: Path, folder: BudgetFolder, rows: dict[str, int] | None = None) -> BudgetSummary:
    """One ledger file as a summary; a file that is not a ledger is a summary with a problem,
    so one bad file does not hide the rest of the folder."""
    ledger_id = ledger_id_of(path)
    journal = journal_start(path)
    common = {"source": str(journal.get("source", "")), "first_seen": _number(journal.get("time")),
              "rows": (rows or {}).get(ledger_id)}
    try:
        data, ledger = _load(path)
    except FedtuneError as exc:
        return BudgetSummary(ledger_id, path, folder, **common, problem=str(exc))
    charges = [call for call in ledger.calls if is_charge(call)]
    return BudgetSummary(ledger_id, path, folder, **common, spent=stored_epsilon(data, ledger), cap=ledger.max_epsilon,
                         accountant=ledger.accountant, delta=ledger.delta, charges=len(charges),
                         last_charge=charges[-1] if charges else None)


def index_counts(folder: Path) -> dict[str, int] | None:
    """ledger id -> rows the folder's record index assigns it; None without a readable index.
    Opened read-only (`mode=ro`): nothing is created, and a writer mid-commit is waited for."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return None
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro"
    try:
        with closing(sqlite3.connect(uri, uri=True, timeout=5)) as connection:
            rows = connection.execute("SELECT ledger, COUNT(*) FROM records GROUP BY ledger").fetchall()
    except sqlite3.Error:
        return None
    return {str(ledger): int(count) for ledger, count in rows}


def journal_start(ledger_path: Path) -> dict:
    """The first line of a ledger's journal (when it began, and the data's source if the
    ledger was opened since sources are recorded); {} when there is none."""
    journal = ledger_path.with_name(ledger_path.name.removesuffix(".json") + ".journal.jsonl")
    try:
        with journal.open(encoding="utf-8", errors="replace") as handle:
            line = json.loads(handle.readline() or "{}")
    except (OSError, ValueError):
        return {}
    return line if isinstance(line, dict) else {}


def ledger_id_of(path: Path) -> str:
    """A budget folder's ledger id from its file name; another ledger file (a run's
    ledger.json) by the fingerprint it stores, else its name."""
    if path.name.startswith("ledger-") and path.name.endswith(".json"):
        return path.name[len("ledger-"):-len(".json")]
    try:
        return str(json.loads(path.read_text(encoding="utf-8")).get("data_fingerprint") or path.stem)
    except (OSError, ValueError, AttributeError):
        return path.stem


def stored_epsilon(data: dict, ledger: PrivacyLedger) -> float:
    """The epsilon the ledger wrote when it was saved; computed (cached accountants) only
    for a ledger written before it stored one."""
    value = _number(data.get("epsilon"))
    return value if value is not None else ledger.epsilon()


def is_charge(call: dict) -> bool:
    """A call that spent privacy (a cap set, a delta lowered or a merge is an event)."""
    return "event" not in call


def find_ledger(spec: str, folders: Sequence[BudgetFolder], searched: Sequence[str | Path]) -> Path:
    """The ledger `spec` names: a ledger file's path, or a prefix of one ledger's id in
    `folders` (found under `searched`, the folders the user named). Anything else is a
    one-line error that says what to give instead."""
    if Path(spec).is_file():
        return Path(spec)
    wanted = spec.strip().lower()
    if not wanted:
        raise ConfigError("give a ledger id (or a prefix of one) or a ledger file; `fedtune budget` lists them")
    where = ", ".join(f"{d}" if Path(d).is_dir() else f"{d} (no such folder)" for d in searched)
    matches = [path for folder in folders for path in sorted(folder.path.glob(LEDGER_GLOB))
               if ledger_id_of(path).lower().startswith(wanted)]
    if not matches:
        raise ConfigError(f"no ledger {spec!r} in {where}: give an id `fedtune budget` lists (or a prefix of one), "
                          "or a ledger file's path")
    if len(matches) > 1:
        raise ConfigError(f"ledger {spec!r} is ambiguous in {where}: {', '.join(str(p) for p in matches)}; give "
                          "more of the id or one of these paths")
    return matches[0]


def ledger_history(path: Path) -> tuple[PrivacyLedger, list[dict]]:
    """A ledger and each of its calls as a person reads it: time, label, what it charged
    (or changed), epsilon after it (None for an event that spends nothing)."""
    _, ledger = _load(path)
    lines = [{"time": _number(call.get("time")), "label": str(call.get("label", "")), "charged": describe_call(call),
              "epsilon_after": _number(call.get("epsilon_after")), "charge": is_charge(call)} for call in ledger.calls]
    return ledger, lines


def describe_call(call: dict) -> str:
    """What one call of a ledger charged, or what it changed, in words."""
    event = call.get("event")
    if event == "cap set":
        return f"cap set: {_g(call.get('from'))} -> {_g(call.get('to'))}"
    if event == "delta lowered":
        return f"delta lowered: {_g(call.get('from'))} -> {_g(call.get('to'))}"
    if event == "merged":
        return f"merged from ledgers {', '.join(str(f) for f in call.get('from', []))}"
    if event:
        return str(event)
    if call.get("non_private"):
        return f"{call.get('steps')} steps WITHOUT differential privacy"
    if call.get("sampling") == "without replacement":
        return (f"{call.get('rounds')} rounds, cohorts of {call.get('size')} of {call.get('registered')} users "
                f"without replacement, sigma {_g(call.get('noise_multiplier'))}")
    kind = "distributed DP steps" if call.get("mechanism") else "DP-SGD steps"
    return (f"{call.get('steps')} {kind}, sigma {_g(call.get('noise_multiplier'))}, "
            f"q {_g(call.get('sample_rate'))}")


def _load(path: Path) -> tuple[dict, PrivacyLedger]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedtuneError(f"{path}: no privacy ledger there") from None
    except (OSError, ValueError) as exc:
        raise FedtuneError(f"{path}: privacy ledger is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FedtuneError(f"{path}: not a fedtune privacy ledger (a JSON {type(data).__name__}, not an object)")
    return data, PrivacyLedger.from_dict(data, source=str(path))


def _number(value) -> float | None:
    """A JSON number, or "inf" as ledgers write it; None for anything else."""
    if value == "inf":
        return math.inf
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _json_float(value: float | None):
    return "inf" if value is not None and math.isinf(value) else value


def _g(value) -> str:
    if value is None:
        return "none"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
