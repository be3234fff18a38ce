"""The device's audit log: an append-only SQLite record of every command it ran or refused.

One row per command: time, sender (the broker-validated user), kind (the command body),
plan content hash (for plan commands), the objects it read, the bytes that left the device
in its reply, the outcome (``ok`` or the error code) and the rule that let the bytes out
(``own-data``, ``public-tags``, ``approved-plan``) or refused the command. Triggers refuse
``UPDATE`` and ``DELETE`` on the table, so the device's own code cannot rewrite history.
``fedplan device audit`` reads it; ``fedplan status`` counts refusals from it.

Example
-------
>>> import tempfile
>>> log = AuditLog(tempfile.mkdtemp())
>>> log.record(AuditEntry(sender="p1", kind="get_object", outcome="POLICY_REFUSED",
...                       rule="private-data", objects=["x"]))
>>> [(e.sender, e.outcome) for e in log.entries()]
[('p1', 'POLICY_REFUSED')]
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.sqlite3"
MAX_OBJECTS = 64
"""Object ids kept per row (the count is always exact)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, sender TEXT NOT NULL,
    kind TEXT NOT NULL, plan_hash TEXT NOT NULL, objects TEXT NOT NULL,
    object_count INTEGER NOT NULL, bytes_out INTEGER NOT NULL, outcome TEXT NOT NULL,
    rule TEXT NOT NULL, command_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_sender ON audit(sender);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit BEGIN
    SELECT RAISE(ABORT, 'the audit log is append-only');
END;
"""


@dataclass
class AuditEntry:
    """One audited command."""

    sender: str
    kind: str
    outcome: str = "ok"
    rule: str = ""
    plan_hash: str = ""
    objects: list[str] = field(default_factory=list)
    bytes_out: int = 0
    command_id: str = ""
    time: float = 0.0


class MemoryAudit:
    """The audit log of an embedded device (kept in memory, bounded)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._rows: list[AuditEntry] = []
        self._limit = limit
        self._lock = threading.Lock()

    def record(self, entry: AuditEntry) -> None:
        entry.time = entry.time or time.time()
        with self._lock:
            self._rows.append(entry)
            del self._rows[: max(0, len(self._rows) - self._limit)]

    def entries(
        self, *, sender: str | None = None, outcome: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        with self._lock:
            rows = [r for r in self._rows if _matches(r, sender, outcome)]
        return rows[-limit:]


class AuditLog:
    """The audit log of a Celery device: ``<data dir>/audit.sqlite3`` (one per process)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.path = Path(data_dir) / AUDIT_FILE
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():  # never share across a fork
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA busy_timeout = 10000")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints, no fsync per row
            db.executescript(_SCHEMA)
            self._db, self._pid = db, os.getpid()
        return self._db

    def record(self, entry: AuditEntry) -> None:
        """Append one row (committed at once, independent of the store's unit)."""
        with self._lock:
            self._conn().execute(
                "INSERT INTO audit (time, sender, kind, plan_hash, objects, object_count,"
                " bytes_out, outcome, rule, command_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    entry.time or time.time(),
                    entry.sender,
                    entry.kind,
                    entry.plan_hash,
                    json.dumps(entry.objects[:MAX_OBJECTS]),
                    len(entry.objects),
                    entry.bytes_out,
                    entry.outcome,
                    entry.rule,
                    entry.command_id,
                ),
            )

    def entries(
        self, *, sender: str | None = None, outcome: str | None = None, limit: int = 1000
    ) -> list[AuditEntry]:
        """The newest ``limit`` rows matching the filters, oldest first."""
        q = "SELECT time, sender, kind, plan_hash, objects, bytes_out, outcome, rule, command_id"
        q += " FROM audit WHERE 1 = 1"
        args: list[Any] = []
        if sender is not None:
            q += " AND sender = ?"
            args.append(sender)
        if outcome is not None:
            q += " AND outcome != 'ok'" if outcome == "refused" else " AND outcome = ?"
            if outcome != "refused":
                args.append(outcome)
        q += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._conn().execute(q, args).fetchall()
        return [
            AuditEntry(
                time=t,
                sender=s,
                kind=k,
                plan_hash=h,
                objects=json.loads(o),
                bytes_out=b,
                outcome=out,
                rule=r,
                command_id=c,
            )
            for t, s, k, h, o, b, out, r, c in reversed(rows)
        ]

    def refusals(self) -> int:
        """How many commands the device refused (policy, budgets, tenancy)."""
        with self._lock:
            q = "SELECT COUNT(*) FROM audit WHERE outcome = 'POLICY_REFUSED'"
            return int(self._conn().execute(q).fetchone()[0])


def _matches(entry: AuditEntry, sender: str | None, outcome: str | None) -> bool:
    if sender is not None and entry.sender != sender:
        return False
    if outcome == "refused":
        return entry.outcome != "ok"
    return outcome is None or entry.outcome == outcome


AuditSink = MemoryAudit | AuditLog
"""Where a device runtime records its commands."""

__all__ = ["AUDIT_FILE", "AuditEntry", "AuditLog", "AuditSink", "MemoryAudit"]
