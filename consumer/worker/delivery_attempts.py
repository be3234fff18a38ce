"""A durable count of deliveries per command message, for refusing poison messages."""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL UNIQUE, n INTEGER NOT NULL
);
"""


def quorum_deliveries(headers: Any) -> int:
    """Deliveries a quorum queue counted (``x-delivery-count`` + 1), 1 when absent."""
    value = headers.get("x-delivery-count") if isinstance(headers, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value + 1
    return 1


class DeliveryAttempts:
    """How often each message was delivered, kept in the device's SQLite index.

    A classic queue redelivers a message whose worker died forever; the worker records
    every *redelivery* (durably, before running the command) and refuses a message once its
    count passes the limit. First deliveries write nothing: they count as one.

    Examples
    --------
    >>> import tempfile
    >>> attempts = DeliveryAttempts(tempfile.mkdtemp())
    >>> attempts.record_redelivery("c1"), attempts.record_redelivery("c1")
    (2, 3)
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, keep: int = 10_000) -> None:
        self.db_path = Path(data_dir) / "index.sqlite3"
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._keep = keep
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def record_redelivery(self, message_id: str) -> int:
        """Count one more delivery of ``message_id``; returns how many there were in all."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT n FROM deliveries WHERE message_id = ?", (message_id,)
            ).fetchone()
            n = (int(row[0]) if row else 1) + 1
            db.execute("DELETE FROM deliveries WHERE message_id = ?", (message_id,))
            db.execute("INSERT INTO deliveries (message_id, n) VALUES (?, ?)", (message_id, n))
            db.execute(
                "DELETE FROM deliveries WHERE seq <= (SELECT MAX(seq) FROM deliveries) - ?",
                (self._keep,),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return n
