"""A node's privacy budget on disk: one ledger per dataset, locked, journaled, never reset.

The budget belongs to the data it protects, not to a run folder or a state directory. A
ledger is found by the fingerprint of the node's rows (`data_fingerprint`), in a budget
folder (`node.budget_dir`, default `$FEDTUNE_HOME/budgets`, i.e. `~/.fedtune/budgets`):

    ledger-<fp16>.json           the ledger (privacy.PrivacyLedger), replaced atomically
    ledger-<fp16>.journal.jsonl  one fsynced line per charge: steps and epsilon after it
    ledger-<fp16>.lock           held (flock) by the one process using this budget

So a second `train-local --out elsewhere`, or a node restarted with a new state dir, on
the same rows continues the same budget. What cannot happen by accident:

* two processes spending one budget at once: the second gets `StateLockedError`;
* a lost ledger: if the journal (or the caller's own record, e.g. a node's `node.json`)
  shows charges the ledger does not hold (file deleted, emptied, truncated, replaced by
  an older copy), the budget refuses to open with `LedgerLostError`, saying how to act;
* a ledger for other data: a ledger whose fingerprint differs is refused.

A crash keeps the write-ahead guarantee: the ledger is written and fsynced before any
training step, and the journal line follows it, so the journal never runs ahead of a
ledger that reached the disk. Deliberately deleting ledger, journal and every record
together is an operator's decision fedtune cannot prevent; it is never something a
command does for you.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

from fedtune.atomic import append_jsonl
from fedtune.errors import FedtuneError
from fedtune.privacy import PrivacyLedger


class StateLockedError(FedtuneError):
    """Another process holds this node's state or budget."""


class LedgerLostError(FedtuneError):
    """A ledger is missing or shorter than the records of what was charged."""


def fedtune_home() -> Path:
    """`$FEDTUNE_HOME`, default `~/.fedtune`: where a machine keeps its nodes' budgets."""
    return Path(os.environ.get("FEDTUNE_HOME") or Path.home() / ".fedtune")


def default_budget_dir() -> Path:
    return fedtune_home() / "budgets"


def data_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 over the sorted digests of the records' texts: the same records in any order
    (a re-exported or shuffled copy of the file) give the same fingerprint, and nothing a
    server may request (the task, which column is the label) changes it. Two files with the
    same texts share one budget: an over-count, never an under-count."""
    rows = sorted(hashlib.sha256(str(text).encode("utf-8")).digest() for text in texts)
    digest = hashlib.sha256(b"fedtune-records-v2")
    for row in rows:
        digest.update(row)
    return digest.hexdigest()


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

    def persist(self, ledger: PrivacyLedger | None = None) -> None:
        """Write the ledger durably, then journal it (`train_call`'s write-ahead hook)."""
        ledger = ledger or self.ledger
        ledger.save(self.ledger_path)
        last = ledger.calls[-1] if ledger.calls else {}
        append_jsonl(self.journal_path, {"time": time.time(), "steps": ledger.steps, "epsilon": _json_number(ledger.epsilon()),
                                         "label": last.get("label", ""), "entries": len(ledger.history)})


class BudgetStore:
    """The budget folder of one node: a ledger per data fingerprint."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def paths(self, fingerprint: str) -> tuple[Path, Path, Path]:
        stem = f"ledger-{fingerprint[:16]}"
        return (self.directory / f"{stem}.json", self.directory / f"{stem}.journal.jsonl",
                self.directory / f"{stem}.lock")

    def ledger_path(self, fingerprint: str) -> Path:
        return self.paths(fingerprint)[0]

    @contextmanager
    def open(self, fingerprint: str, new_ledger: Callable[[], PrivacyLedger], recorded_steps: int = 0,
             record_source: str = "") -> Iterator[Budget]:
        """Lock this data's budget and yield it: continued from disk, or new when nothing
        was ever charged for it. `recorded_steps` is the caller's own record of steps
        charged (a node's node.json), checked like the journal."""
        ledger_path, journal_path, lock_path = self.paths(fingerprint)
        with exclusive_lock(lock_path, f"the privacy budget {ledger_path}"):
            journaled = _journaled_steps(journal_path)
            if ledger_path.exists():
                ledger = PrivacyLedger.load(ledger_path)
                if ledger.data_fingerprint and ledger.data_fingerprint != fingerprint:
                    raise FedtuneError(f"{ledger_path}: this ledger protects other data (fingerprint "
                                       f"{ledger.data_fingerprint[:16]}, the data is {fingerprint[:16]}); refusing to mix budgets")
                ledger.data_fingerprint = fingerprint
            else:
                ledger = None
            for steps, source in ((journaled, str(journal_path)), (recorded_steps, record_source)):
                held = ledger.steps if ledger is not None else 0
                if steps > held:
                    state = "is missing" if ledger is None else f"holds only {held} steps"
                    raise LedgerLostError(
                        f"{ledger_path} {state} but {source} records {steps} steps charged on this data: the budget "
                        f"spent cannot be known, so nothing will train; restore the ledger from a backup (fedtune never "
                        f"starts a data set's budget again)")
            if ledger is None:
                ledger = new_ledger()
                ledger.data_fingerprint = fingerprint
            yield Budget(ledger, ledger_path, journal_path)


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
