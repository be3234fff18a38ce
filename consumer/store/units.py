"""Units of work over a SQLite index and blob files: all of a unit's writes or none of them.

A unit is one SQLite transaction (``BEGIN IMMEDIATE`` at its first write, ``COMMIT`` at the
end). Blob files are only ever created inside a transaction, under new names, and the rows
that point at them commit with it; the files a unit replaces are deleted after its commit.
A process killed at any point leaves files no committed row names, and nothing else:
:meth:`BlobUnits.collect_orphans` (run under the write lock, when a store opens) deletes them.
A full disk (``ENOSPC``/``EDQUOT`` writing a file, ``SQLITE_FULL`` in the index or at
``COMMIT``) raises :class:`~schemas.errors.StoreFullError`, like the store's own bounds: the
caller rolls the unit back and nothing of it stays.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from consumer.store.tensor_files import write_bytes_file, write_tensor_file
from schemas.errors import StoreFullError
from schemas.tensor_codec import FramedParts

_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def disk_full(exc: BaseException) -> StoreFullError | None:
    """The ``StoreFullError`` for an out-of-space ``OSError`` or ``SQLITE_FULL``, else None."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        what = f"{exc.strerror} ({exc.filename})" if exc.filename else str(exc.strerror)
    elif isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == 13:
        what = f"the device's index is full: {exc}"  # 13: SQLITE_FULL
    else:
        return None
    return StoreFullError(
        f"the device's disk is full: {what}; the command changed nothing. Free space in "
        "the device's data dir, delete objects the server no longer needs, or lower "
        "FEDPLAN_STORE_MAX_BYTES below the free space"
    )


@dataclass(slots=True)
class Unit:
    """The writes of one unit: files to delete after rollback or commit, ids it touched."""

    fresh: list[str] = field(default_factory=list)  # written in this unit: gone on rollback
    stale: list[str] = field(default_factory=list)  # replaced or deleted: gone after commit
    objects: set[str] = field(default_factory=set)  # object ids written or deleted
    plans: set[str] = field(default_factory=set)  # plan ids written or deleted
    implicit: bool = False  # the unit of one store call made outside any unit


class BlobUnits:
    """Per-thread SQLite connections (WAL) and units over ``data_dir/blobs``.

    Subclasses define ``_forked`` (drop what a parent process held), ``_after_commit`` and
    ``_after_rollback`` (drop in-memory copies of what the unit changed).

    Examples
    --------
    >>> import tempfile
    >>> units = BlobUnits(tempfile.mkdtemp())
    >>> units.begin()
    >>> with units._tx() as db:
    ...     name = units._new_file("x", "", b"data")
    >>> units.rollback()
    >>> (units.blob_dir / name).exists()
    False
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "index.sqlite3"
        self._local = threading.local()
        self._lock = threading.RLock()
        self._pid = os.getpid()

    def _forked(self) -> None:
        """Called in a forked child before its first use of the store."""

    def _after_commit(self) -> None:
        """Called after a unit committed."""

    def _after_rollback(self, unit: Unit) -> None:
        """Called after a unit was rolled back (its files are gone)."""

    def _conn(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # forked: objects held by the parent are not ours
            self._pid = os.getpid()
            self._forked()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA recursive_triggers=ON")  # REPLACE fires delete triggers
            self._local.conn, self._local.pid, self._local.unit = conn, os.getpid(), None
        return conn

    def _unit(self) -> Unit | None:
        self._conn()
        unit: Unit | None = self._local.unit
        return unit

    def begin(self) -> None:
        """Start a unit: every write of this thread until :meth:`commit` is one transaction.

        The SQLite write lock is taken at the unit's first write and held until its end.
        """
        if self._unit() is not None:
            raise RuntimeError("a unit is already open on this thread; commit it first")
        self._local.unit = Unit()

    def commit(self) -> None:
        """Commit the unit's writes at once, then delete the files they replaced.

        When ``COMMIT`` fails the unit stays open: call :meth:`rollback`.
        """
        unit = self._unit()
        if unit is None:
            return
        db = self._conn()
        if db.in_transaction:
            try:
                db.execute("COMMIT")
            except sqlite3.Error as e:
                raise (disk_full(e) or e) from e
            self._lock.release()
        self._local.unit = None
        self._unlink(unit.stale)
        self._after_commit()

    def rollback(self) -> None:
        """Drop the unit's writes and the files it wrote."""
        unit = self._unit()
        if unit is None:
            return
        self._local.unit = None
        db = self._conn()
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            finally:
                self._lock.release()
        self._unlink(unit.fresh)
        self._after_rollback(unit)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Writes that happen together: a savepoint of the open unit, or a unit of their own."""
        unit = self._unit()
        if unit is None:
            self.begin()
            self._local.unit.implicit = True
            try:
                with self._tx() as db:
                    yield db
                self.commit()
            except BaseException:
                self.rollback()  # a failed COMMIT too: the unit and its lock end here
                raise
            return
        db = self._conn()
        if not db.in_transaction:
            self._lock.acquire()  # held until commit or rollback: one unit at a time
            try:
                db.execute("BEGIN IMMEDIATE")
            except BaseException:
                # An exception raised *after* BEGIN took effect (a time-limit alarm between
                # the statement and this line) leaves the transaction open: the unit's
                # rollback ends it and releases the lock then, not here (twice).
                if not db.in_transaction:
                    self._lock.release()
                raise
        fresh, stale = len(unit.fresh), len(unit.stale)
        db.execute("SAVEPOINT w")
        try:
            yield db
        except BaseException as e:
            if db.in_transaction:
                db.execute("ROLLBACK TO w")
                db.execute("RELEASE w")
            self._unlink(unit.fresh[fresh:])
            del unit.fresh[fresh:], unit.stale[stale:]
            full = disk_full(e)
            if full is not None:
                raise full from e
            raise
        try:
            db.execute("RELEASE w")
        except sqlite3.Error as e:
            raise (disk_full(e) or e) from e

    def _touched(self) -> Unit:
        """The open unit (inside :meth:`_tx`)."""
        unit = self._unit()
        assert unit is not None, "writes happen inside a transaction only"
        return unit

    def _new_file(
        self, stem_of: str, prefix: str, data: torch.Tensor | bytes | FramedParts
    ) -> str:
        """Write a blob file under a new name; call inside :meth:`_tx` (it is the unit's)."""
        unit = self._touched()
        stem = hashlib.sha256(stem_of.encode()).hexdigest()[:32]
        name = f"{prefix}{stem}-{secrets.token_hex(6)}.bin"
        unit.fresh.append(name)
        if isinstance(data, torch.Tensor):
            write_tensor_file(self.blob_dir / name, data)
        else:
            write_bytes_file(self.blob_dir / name, data)
        return name

    def _discard(self, blobs: list[str]) -> None:
        """Files to delete once the current unit commits."""
        self._touched().stale.extend(blobs)

    def _unlink(self, blobs: list[str]) -> None:
        for b in blobs:
            (self.blob_dir / b).unlink(missing_ok=True)

    def _next_seq(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE counter SET n = n + 1 WHERE k = 0")
        return int(db.execute("SELECT n FROM counter WHERE k = 0").fetchone()[0])

    def collect_orphans(self, db: sqlite3.Connection, referenced: set[str]) -> int:
        """Delete blob files (and temp files) outside ``referenced``; call inside :meth:`_tx`.

        Under the write lock, every unreferenced file belongs to a transaction that never
        committed, or was replaced by one that did.
        """
        self._touched()
        orphans = [p for p in self.blob_dir.iterdir() if p.name not in referenced]
        for p in orphans:
            p.unlink(missing_ok=True)
        return len(orphans)
