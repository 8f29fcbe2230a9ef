"""Which ledger protects each record: a budget folder's index of record digests.

The privacy budget belongs to the records it protects, not to a file or a data set. A
hospital's file grows every week, is re-exported, deduplicated, split; the epsilon a row
has spent must follow it into every one of those. So the budget folder keeps, for every
record it has ever charged, the SHA-256 digest of the record and the id of the ledger that
carries its charges. Opening a budget for some rows looks their digests up here
(`fedtune.privacy.budget.BudgetStore.open` decides what to do with the answer).

SQLite (Python's standard library) holds the index: a lookup of a hundred thousand digests
is one indexed join, a commit is durable (`synchronous=FULL`), and a torn write rolls back.
Only digests are stored, never a record's text. The file is private to its owner (0600).
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Iterable

from fedtune.errors import FedtuneError

INDEX_FILE = "records.sqlite"


class RecordIndex:
    """digest -> ledger id, for every record a budget folder has charged."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / INDEX_FILE

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        try:
            connection = sqlite3.connect(self.path, timeout=30)
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("CREATE TABLE IF NOT EXISTS records (digest BLOB PRIMARY KEY, ledger TEXT NOT NULL) "
                               "WITHOUT ROWID")
        except sqlite3.DatabaseError as exc:
            raise FedtuneError(f"{self.path}: the budget folder's record index is unreadable ({exc}); restore it from "
                               "a backup (without it, fedtune cannot tell which budget each record has spent)") from None
        return connection

    def owners(self, digests: Iterable[bytes]) -> dict[str, int]:
        """ledger id -> how many of `digests` it protects (digests never seen are absent)."""
        with closing(self._connect()) as connection:
            connection.execute("CREATE TEMP TABLE wanted (digest BLOB PRIMARY KEY) WITHOUT ROWID")
            connection.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((d,) for d in digests))
            rows = connection.execute("SELECT records.ledger, COUNT(*) FROM wanted JOIN records USING (digest) "
                                      "GROUP BY records.ledger").fetchall()
        return {str(ledger): int(count) for ledger, count in rows}

    def assign(self, digests: Iterable[bytes], ledger_id: str) -> None:
        """Every one of `digests` is protected by `ledger_id` from now on (one durable commit)."""
        with closing(self._connect()) as connection, connection:
            connection.executemany("INSERT OR REPLACE INTO records VALUES (?, ?)", ((d, ledger_id) for d in digests))

    def count(self) -> int:
        with closing(self._connect()) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM records").fetchone()[0])
