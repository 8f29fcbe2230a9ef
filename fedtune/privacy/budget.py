"""A node's privacy budget on disk: ledgers that follow the records, locked, journaled, never reset.

The budget belongs to the records it protects, not to a run folder, a state directory or
a file. A budget folder (`node.budget_dir`, default `$FEDTUNE_HOME/budgets`, i.e.
`~/.fedtune/budgets`) holds:

    records.sqlite               which ledger protects each record ever charged (its digest)
    ledger-<id>.json             a ledger (privacy.PrivacyLedger), replaced atomically
    ledger-<id>.journal.jsonl    one fsynced line per charge: steps and epsilon after it; the
                                 first also names the data as its operator gave it
    ledger-<id>.lock             held (flock) by the one process using this ledger

Opening a budget for some rows (`BudgetStore.open`) looks each row's digest up:

* no row was ever charged: a new ledger, and every row is registered to it;
* every charged row belongs to one ledger: that ledger continues, and the rows it did not
  know yet (an appended week of data) join it, so they start from its spend (an
  over-count, never an under-count). Re-exported, shuffled, deduplicated or subset copies of
  the same rows land here too;
* the rows come from several ledgers (two files merged): a new ledger starts with the
  composition of all their histories (each row has spent at most that), and the rows
  move to it; the old ledgers keep protecting the rows that did not move.

So a second `train-local --out elsewhere`, a node restarted with a new state dir, or a node
whose file grew continues the same charges. What cannot happen by accident:

* two processes spending one ledger at once: the second gets `StateLockedError`;
* a lost ledger: if the journal, the record index or the caller's own record (a node's
  `node.json`) shows charges the ledger does not hold (file deleted, emptied, truncated,
  replaced by an older copy), the budget refuses to open with `LedgerLostError`;
* a ledger file swapped for another one: its stored id must match its name.

A crash keeps the write-ahead guarantee: a ledger is written and fsynced before the index
points at it and before any training step, and the journal line follows it, so neither the
index nor the journal ever runs ahead of a ledger that reached the disk. Deliberately
deleting ledgers, journals, the index and every record together is an operator's decision
fedtune cannot prevent; it is never something a command does for you.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from fedtune.system.atomic import append_jsonl
from fedtune.errors import FedtuneError
from fedtune.privacy import PrivacyLedger
from fedtune.privacy.record_index import RecordIndex

LEDGER_ID_LENGTH = 16  # hex digits of a ledger's id in its file names


class StateLockedError(FedtuneError):
    """Another process holds this node's state or budget."""


class LedgerLostError(FedtuneError):
    """A ledger is missing or shorter than the records of what was charged."""


def fedtune_home() -> Path:
    """`$FEDTUNE_HOME`, default `~/.fedtune`: where a machine keeps its nodes' budgets."""
    return Path(os.environ.get("FEDTUNE_HOME") or Path.home() / ".fedtune")


def default_budget_dir() -> Path:
    return fedtune_home() / "budgets"


# Folders outside the default one that hold budgets, one absolute path a line, so that
# `fedtune budget` with no --dir lists every budget this machine's fedtune made: a
# simulation's run directory (each virtual node's budget lies below it), a node's or a
# train-local run's own --budget-dir. Appended once per run, never per charge.
KNOWN_FOLDERS_FILE = "budget-folders.txt"


def remember_budget_folder(folder: str | Path) -> None:
    """Note `folder` in $FEDTUNE_HOME/budget-folders.txt (once; the default folder needs no note)."""
    folder = Path(folder).resolve()
    if folder == default_budget_dir().resolve() or folder in remembered_budget_folders(existing=False):
        return
    path = fedtune_home() / KNOWN_FOLDERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:  # one short line: an append is atomic
        handle.write(f"{folder}\n")


def remembered_budget_folders(existing: bool = True) -> list[Path]:
    """The folders noted by `remember_budget_folder`, in order, once each (`existing`: only
    those still on disk: a deleted simulation run is no budget to list)."""
    try:
        lines = (fedtune_home() / KNOWN_FOLDERS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    folders = list(dict.fromkeys(Path(line) for line in lines if line.strip()))
    return [f for f in folders if f.is_dir()] if existing else folders


def record_digest(text: str) -> bytes:
    """A record's identity in the budget: SHA-256 of its text (for instruct data, prompt and
    response together). Nothing a server may request (the task, the label column) changes it."""
    return hashlib.sha256(str(text).encode("utf-8")).digest()


@dataclass(frozen=True)
class RecordSet:
    """The records a budget protects: the data set's fingerprint (which names a new ledger)
    and each distinct record's digest (which finds the ledgers that already protect it)."""

    fingerprint: str
    digests: frozenset[bytes]

    @classmethod
    def of(cls, texts: Sequence[str]) -> "RecordSet":
        rows = sorted(record_digest(text) for text in texts)
        digest = hashlib.sha256(b"fedtune-records-v2")
        for row in rows:
            digest.update(row)
        return cls(digest.hexdigest(), frozenset(rows))

    def __len__(self) -> int:
        return len(self.digests)


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` for the block, or refuse at once.

    The kernel drops the lock when the holder exits, kill -9 included, so a crash never
    leaves a node locked out. The holder's pid is written into the file for the message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise StateLockedError(f"{what} is in use by another fedtune process (pid {holder}); one process "
                                   f"at a time may hold a node's budget: wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


class Budget:
    """An open, locked budget: the ledger and where every charge must be recorded."""

    def __init__(self, ledger: PrivacyLedger, ledger_path: Path, journal_path: Path):
        self.ledger = ledger
        self.ledger_path = ledger_path
        self.journal_path = journal_path

    def persist(self, ledger: PrivacyLedger | None = None, source: str = "") -> None:
        """Write the ledger durably, then journal it (`train_call`'s write-ahead hook).
        `source` goes into the line only when a ledger is first written: the data as its
        operator named it, so a person reading the folder later knows what the budget is for."""
        ledger = ledger or self.ledger
        ledger.save(self.ledger_path)
        last = ledger.calls[-1] if ledger.calls else {}
        line = {"time": time.time(), "steps": ledger.steps, "epsilon": _json_number(ledger.epsilon()),
                "label": last.get("label", ""), "entries": len(ledger.history)}
        append_jsonl(self.journal_path, {**line, "source": source} if source else line, private=True)


class BudgetStore:
    """The budget folder of one node: its ledgers and the index of the records they protect."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.index = RecordIndex(self.directory)

    def paths(self, ledger_id: str) -> tuple[Path, Path, Path]:
        stem = f"ledger-{ledger_id[:LEDGER_ID_LENGTH]}"
        return (self.directory / f"{stem}.json", self.directory / f"{stem}.journal.jsonl",
                self.directory / f"{stem}.lock")

    def ledger_path(self, ledger_id: str) -> Path:
        return self.paths(ledger_id)[0]

    @contextmanager
    def open(self, records: RecordSet, new_ledger: Callable[[], PrivacyLedger],
             recorded_steps: Callable[[str], tuple[int, str]] | None = None, source: str = "") -> Iterator[Budget]:
        """Lock the ledger that protects `records` and yield it (see the module docstring for
        which one that is). `recorded_steps(ledger_id)` is the caller's own record of steps
        charged to that ledger and where it keeps it (a node's node.json), checked like the
        journal. `source` describes the records for people (a file path, a dataset name,
        never their contents); a new ledger's first journal line keeps it."""
        recorded_steps = recorded_steps or (lambda _: (0, ""))
        with contextlib.ExitStack() as held:
            with exclusive_lock(self.directory / "records.lock", f"the record index of {self.directory}"):
                owners = self.index.owners(records.digests)
                if len(owners) <= 1:
                    ledger_id = next(iter(owners), records.fingerprint[:LEDGER_ID_LENGTH])
                    held.enter_context(self._lock(ledger_id))
                    ledger = self._load(ledger_id, recorded_steps, known=bool(owners))
                    fresh = ledger is None
                    if fresh:
                        ledger = new_ledger()
                        ledger.data_fingerprint = ledger_id
                else:  # rows from several ledgers: a new one carries all their charges
                    sources = sorted(owners)
                    ledger_id = hashlib.sha256("\n".join([records.fingerprint, *sources]).encode()).hexdigest()[
                        :LEDGER_ID_LENGTH]
                    held.enter_context(self._lock(ledger_id))
                    ledger = self._load(ledger_id, recorded_steps, known=False)
                    fresh = ledger is None
                    if fresh:
                        parts = []
                        for source in sources:
                            with self._lock(source):
                                parts.append(self._load(source, recorded_steps, known=True))
                        ledger = PrivacyLedger.merged(parts, ledger_id, label=f"records of ledgers {', '.join(sources)}")
                ledger_path, journal_path, _ = self.paths(ledger_id)
                budget = Budget(ledger, ledger_path, journal_path)
                if fresh:
                    budget.persist(source=source)  # on disk before the index points at it
                if set(owners) != {ledger_id} or owners[ledger_id] != len(records):
                    self.index.assign(records.digests, ledger_id)
            yield budget

    def _lock(self, ledger_id: str):
        ledger_path, _, lock_path = self.paths(ledger_id)
        return exclusive_lock(lock_path, f"the privacy budget {ledger_path}")

    def _load(self, ledger_id: str, recorded_steps, known: bool) -> PrivacyLedger | None:
        """The ledger `ledger_id` as on disk, checked against every record of its charges;
        None when nothing was ever charged to it."""
        ledger_path, journal_path, _ = self.paths(ledger_id)
        ledger = None
        if ledger_path.exists():
            ledger = PrivacyLedger.load(ledger_path)
            if ledger.data_fingerprint and ledger.data_fingerprint[:LEDGER_ID_LENGTH] != ledger_id[:LEDGER_ID_LENGTH]:
                raise FedtuneError(f"{ledger_path}: this file holds ledger {ledger.data_fingerprint[:LEDGER_ID_LENGTH]}, "
                                   f"not {ledger_id}; refusing to mix budgets (restore the right file from a backup)")
            ledger.data_fingerprint = ledger.data_fingerprint or ledger_id
        recorded, record_source = recorded_steps(ledger_id)
        for steps, source in ((_journaled_steps(journal_path), str(journal_path)), (recorded, record_source)):
            held = ledger.steps if ledger is not None else 0
            if steps > held:
                state = "is missing" if ledger is None else f"holds only {held} steps"
                raise LedgerLostError(
                    f"{ledger_path} {state} but {source} records {steps} steps charged on these records: the budget "
                    f"spent cannot be known, so nothing will train; restore the ledger from a backup (fedtune never "
                    f"starts a record's budget again)")
        if ledger is None and known:
            raise LedgerLostError(f"{ledger_path} is missing but {self.index.path} records it as the budget of these "
                                  f"records: the budget spent cannot be known, so nothing will train; restore the "
                                  f"ledger from a backup (fedtune never starts a record's budget again)")
        return ledger


def _journaled_steps(path: Path) -> int:
    """The most steps any journal line records (0 without a journal). A torn last line
    (a crash mid-append) is skipped: its ledger write came first."""
    if not path.exists():
        return 0
    most = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            most = max(most, int(json.loads(line)["steps"]))
        except (ValueError, KeyError, TypeError):
            continue
    return most


def _json_number(value: float):
    return "inf" if value == float("inf") else value
