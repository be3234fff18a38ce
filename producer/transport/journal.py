"""The producer's durable in-flight journal: what it awaits, and replies nobody claimed yet.

A small SQLite file per producer id (``<journal_dir>/<producer_id>.sqlite3``, WAL mode; a
commit survives a SIGKILL of the process). The reply collector writes a command's row
*before* the command is published and deletes it once the reply has been handed to the
command's future, so a producer killed with commands in flight finds them again when it
connects with the same producer id (``fp.connect(url, producer_id=...)``) and re-registers
them before it consumes its results queue.

Rules (also in ``broker_config.settings``):

- an in-flight row is kept until its reply is handed over, or for at most
  ``results_queue_expires`` seconds (after that the results queue, and any reply in it, is
  gone); ``fleet.close()`` keeps rows: the commands are still at the broker;
- a reply to a command nobody awaits is kept (``unclaimed``) for ``unclaimed_reply_ttl``
  seconds, at most ``MAX_UNCLAIMED`` of them and ``MAX_UNCLAIMED_BYTES`` in all (the
  oldest dropped first), until a command or recovery with its id claims it;
- a command's row keeps its encoded bytes (up to ``MAX_JOURNALED_BODY``) until the broker
  confirmed the publish; a producer killed before that confirm leaves a command that may
  never have been sent, and its successor publishes it again on recovery (the device runs
  a command id once and answers a repeat from its reply cache); one too large to keep
  fails with :class:`CommandNotSent` instead of waiting for a reply that may never come;
- one process at a time holds a producer id: the journal takes an exclusive lock
  (``<producer_id>.sqlite3.lock``, ``flock``; the kernel drops it when the process dies,
  SIGKILL included), and a second ``Journal`` of that id raises :class:`ProducerIdInUse`.
  Two producers on one id would share one results queue, and each would take replies the
  other awaits.

Example
-------
>>> import tempfile, pathlib
>>> j = Journal(pathlib.Path(tempfile.mkdtemp()) / "p1.sqlite3")
>>> j.record("c1", "alice", ("r1",))
>>> [(e.command_id, e.device_id, e.result_ids) for e in j.in_flight()]
[('c1', 'alice', ('r1',))]
>>> j.done("c1"); j.in_flight()
[]
>>> j.close()
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from broker_config import names
from schemas.errors import FedplanError, TransportError
from schemas.tensor_codec import FramedParts

MAX_UNCLAIMED = 1024
"""Unclaimed replies kept at most (in memory and in the journal)."""

MAX_JOURNALED_BODY = 4 * 1024 * 1024
"""Commands up to this size are journaled with their bytes until their publish is confirmed
(so a successor can publish them again); larger ones are journaled without."""

MAX_UNCLAIMED_BYTES = 256 * 1024 * 1024
"""Bytes of unclaimed replies kept at most (the oldest dropped first; a larger one alone is
not kept)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS in_flight (
    command_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, result_ids TEXT NOT NULL,
    created REAL NOT NULL, published INTEGER NOT NULL DEFAULT 0, body BLOB);
CREATE TABLE IF NOT EXISTS unclaimed (
    command_id TEXT PRIMARY KEY, sender TEXT, data BLOB NOT NULL, received REAL NOT NULL);
"""


class ProducerIdInUse(TransportError):
    """Another live producer (in this or another process) holds this producer id.

    Only one process may use a producer id at a time: they would share its results queue.
    """

    code = "PRODUCER_ID_IN_USE"


class CommandNotSent(TransportError):
    """A recovered command may never have reached the broker (its producer died before the
    publish was confirmed) and was too large to journal whole: send it again."""

    code = "COMMAND_NOT_SENT"


@dataclass(frozen=True, slots=True)
class InFlight:
    """One journaled command: where it went and the result ids its reply carries."""

    command_id: str
    device_id: str
    result_ids: tuple[str, ...]
    created: float
    published: bool = True
    """Whether the broker confirmed the publish (else it may never have been sent)."""
    body: bytes | None = None
    """The encoded command while its publish is unconfirmed (``None`` when too large)."""


@dataclass(frozen=True, slots=True)
class Unclaimed:
    """One reply kept for a later claim; ``sender`` is the device user's device, if any."""

    command_id: str
    sender: str | None
    data: bytes
    received: float


def journal_path(journal_dir: Path, producer_id: str) -> Path:
    """Where the journal of ``producer_id`` lives."""
    return Path(journal_dir) / f"{names.check_id('producer', producer_id)}.sqlite3"


class Journal:
    """The SQLite journal of one producer; thread-safe (one connection behind a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock_exclusively(self.path.with_name(self.path.name + ".lock"))
        except OSError as e:
            raise FedplanError(f"cannot open the producer journal {self.path}: {e}") from e
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across a process kill
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(in_flight)")}
            if "published" not in columns:  # a journal of an older fedplan
                self._db.execute(
                    "ALTER TABLE in_flight ADD COLUMN published INTEGER NOT NULL DEFAULT 1"
                )
                self._db.execute("ALTER TABLE in_flight ADD COLUMN body BLOB")
        except (OSError, sqlite3.Error) as e:
            os.close(self._lock_fd)
            raise FedplanError(f"cannot open the producer journal {self.path}: {e}") from e
        self._lock = threading.Lock()

    def record(
        self,
        command_id: str,
        device_id: str,
        result_ids: tuple[str, ...],
        body: bytes | FramedParts | None = None,
    ) -> None:
        """Note a command before it is published (with its bytes when they are at most
        ``MAX_JOURNALED_BODY``); raises ``TransportError`` when the journal cannot take it
        (a full disk): the command must not be published then."""
        kept = bytes(body) if body is not None and len(body) <= MAX_JOURNALED_BODY else None
        try:
            with self._lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO in_flight VALUES (?, ?, ?, ?, 0, ?)",
                    (command_id, device_id, json.dumps(list(result_ids)), time.time(), kept),
                )
        except sqlite3.Error as e:
            raise TransportError(
                f"command {command_id} for device {device_id!r} was not sent: the producer "
                f"journal {self.path} cannot record it ({e}); free space there"
            ) from e

    def published(self, command_id: str) -> None:
        """The broker confirmed the command: its bytes are no longer needed."""
        with self._lock:
            self._db.execute(
                "UPDATE in_flight SET published = 1, body = NULL WHERE command_id = ?",
                (command_id,),
            )

    def done(self, command_id: str) -> None:
        """Forget a command (its reply was handed over, or it was never published)."""
        with self._lock:
            self._db.execute("DELETE FROM in_flight WHERE command_id = ?", (command_id,))
            self._db.execute("DELETE FROM unclaimed WHERE command_id = ?", (command_id,))

    def in_flight(self, *, older_than_drop: float | None = None) -> list[InFlight]:
        """The journaled commands, oldest first; rows created before ``older_than_drop``
        (a ``time.time()`` value) are deleted instead of returned."""
        with self._lock:
            if older_than_drop is not None:
                self._db.execute("DELETE FROM in_flight WHERE created < ?", (older_than_drop,))
            rows = self._db.execute(
                "SELECT command_id, device_id, result_ids, created, published, body "
                "FROM in_flight ORDER BY created"
            ).fetchall()
        found = []
        for command_id, device_id, result_ids, created, published, body in rows:
            try:
                ids = tuple(str(r) for r in json.loads(result_ids))
            except (ValueError, TypeError):
                ids = ()
            kept = bytes(body) if isinstance(body, bytes) else None
            found.append(InFlight(command_id, device_id, ids, created, bool(published), kept))
        return found

    def keep(self, command_id: str, sender: str | None, data: bytes) -> None:
        """Keep a reply nobody awaits (the oldest go past ``MAX_UNCLAIMED``)."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO unclaimed VALUES (?, ?, ?, ?)",
                (command_id, sender, data, time.time()),
            )
            self._db.execute(
                "DELETE FROM unclaimed WHERE command_id IN (SELECT command_id FROM (SELECT "
                "command_id, ROW_NUMBER() OVER w AS n, SUM(length(data)) OVER w AS total "
                "FROM unclaimed WINDOW w AS (ORDER BY received DESC, rowid DESC)) "
                "WHERE n > ? OR total > ?)",
                (MAX_UNCLAIMED, MAX_UNCLAIMED_BYTES),
            )

    def unclaimed(self, *, ttl: float) -> list[Unclaimed]:
        """The kept replies younger than ``ttl`` seconds, oldest first (older ones deleted)."""
        with self._lock:
            self._db.execute("DELETE FROM unclaimed WHERE received < ?", (time.time() - ttl,))
            rows = self._db.execute(
                "SELECT command_id, sender, data, received FROM unclaimed ORDER BY received"
            ).fetchall()
        return [Unclaimed(c, s, bytes(d), r) for c, s, d, r in rows]

    def close(self) -> None:
        """Close the file and give up the producer id (rows stay for its next producer)."""
        with self._lock:
            self._db.close()
            if self._lock_fd >= 0:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = -1


def _lock_exclusively(lock_path: Path) -> int:
    """An open descriptor holding an exclusive ``flock`` on ``lock_path``; raises
    :class:`ProducerIdInUse` when another open descriptor holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ProducerIdInUse(
            f"producer id {lock_path.name.removesuffix('.sqlite3.lock')!r} is in use by a "
            f"running producer (its journal {lock_path.with_suffix('')} is locked); two "
            "producers with one id would take each other's replies. Close that fleet, or "
            "connect with another producer_id"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd
