"""A persistent device store: a SQLite (WAL) index plus one raw-bytes file per tensor."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from consumer.store.base import StoredObject, StoredPlan
from consumer.store.tensor_files import dtype_name, read_tensor_file, write_tensor_file
from schemas.errors import ObjectNotFound
from schemas.plan_codec import plan_from_proto, plan_to_proto
from schemas.plan_pb2 import PlanProto

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id TEXT PRIMARY KEY, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    requires_grad INTEGER NOT NULL, description TEXT NOT NULL, blob TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    object_id TEXT NOT NULL, tag TEXT NOT NULL, pos INTEGER NOT NULL,
    PRIMARY KEY (object_id, tag)
);
CREATE INDEX IF NOT EXISTS tags_by_tag ON tags(tag);
CREATE TABLE IF NOT EXISTS plans (
    id TEXT PRIMARY KEY, proto BLOB NOT NULL, content_hash TEXT NOT NULL, tags TEXT NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS plan_state (
    plan_id TEXT NOT NULL, name TEXT NOT NULL, dtype TEXT NOT NULL, shape TEXT NOT NULL,
    requires_grad INTEGER NOT NULL, blob TEXT NOT NULL, PRIMARY KEY (plan_id, name)
);
CREATE TABLE IF NOT EXISTS replies (
    command_id TEXT PRIMARY KEY, result_ids TEXT NOT NULL, reply BLOB NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (k INTEGER PRIMARY KEY CHECK (k = 0), n INTEGER NOT NULL);
INSERT OR IGNORE INTO counter VALUES (0, 0);
"""

_GET_ONE = (
    "SELECT id, dtype, shape, requires_grad, description, blob, seq FROM objects WHERE id = ?"
)
_GET_ALL = (
    "SELECT id, dtype, shape, requires_grad, description, blob, seq FROM objects ORDER BY seq"
)
_SEARCH = (
    "SELECT id, dtype, shape, requires_grad, description, blob, seq FROM objects "
    "WHERE id IN (SELECT object_id FROM tags WHERE tag IN (SELECT value FROM json_each(?)) "
    "GROUP BY object_id HAVING COUNT(DISTINCT tag) = ?) ORDER BY seq"
)

_Row = tuple[str, str, str, int, str, str, int]

_Marks = dict[str, tuple[torch.Tensor, int]]
"""Per state name: the tensor last persisted (or loaded) and its ``_version`` then."""


@dataclass(slots=True)
class _Live:
    """An object this process holds in memory: the row version it came from, its version."""

    seq: int
    version: int
    obj: StoredObject


class SqliteStore:
    """A :class:`~consumer.store.DeviceStore` under ``data_dir`` that survives restarts.

    Tensors are raw element bytes in files (a new file per write, renamed into place) with
    dtype, shape and tags in SQLite (WAL mode, busy timeout): safe across threads and
    processes. Plans are stored as encoded ``PlanProto`` with their initial state; a state
    tensor changed by a run is written to a file of its own, and only when it changed (its
    identity or ``_version`` differ from when it was last persisted). Nothing is pickled.

    Like the in-memory store, it hands out *live* objects: the tensors a process loaded stay
    in memory (with their autograd history and ``.grad``) while the row they came from is
    unchanged, so in-place ops act on the stored object. :meth:`flush` writes tensors changed
    in place back to disk; it runs before every stored reply, so a redelivered command never
    finds its reply without the effects that led to it.

    Examples
    --------
    >>> import tempfile, torch
    >>> store = SqliteStore(tempfile.mkdtemp())
    >>> store.put_object(StoredObject("a", torch.arange(3), tags=("#x",)))
    >>> store.search(["#x"])[0].tensor
    tensor([0, 1, 2])
    """

    def __init__(self, data_dir: str | os.PathLike[str], *, max_replies: int = 10_000) -> None:
        self.data_dir = Path(data_dir)
        self.blob_dir = self.data_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.data_dir / "index.sqlite3"
        self._max_replies = max_replies
        self._local = threading.local()
        self._lock = threading.RLock()
        self._live: dict[str, _Live] = {}
        self._plans: dict[str, tuple[int, StoredPlan]] = {}
        self._marks: dict[str, _Marks] = {}
        self._pid = os.getpid()
        self._conn().executescript(_SCHEMA)

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # forked: objects held by the parent are not ours
            self._pid, self._live, self._plans, self._marks = os.getpid(), {}, {}, {}
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _next_seq(self, db: sqlite3.Connection) -> int:
        db.execute("UPDATE counter SET n = n + 1 WHERE k = 0")
        return int(db.execute("SELECT n FROM counter WHERE k = 0").fetchone()[0])

    # -- tensors -----------------------------------------------------------------------

    def _write(self, obj: StoredObject, *, only_if_seq: int | None = None) -> int | None:
        """Write the tensor to a new file and point the row at it; returns the new seq."""
        stem = hashlib.sha256(obj.id.encode()).hexdigest()[:32]
        name = f"{stem}-{secrets.token_hex(6)}.bin"
        write_tensor_file(self.blob_dir / name, obj.tensor)
        t = obj.tensor
        with self._tx() as db:
            old = db.execute("SELECT blob, seq FROM objects WHERE id = ?", (obj.id,)).fetchone()
            if only_if_seq is not None and (old is None or old[1] != only_if_seq):
                (self.blob_dir / name).unlink(missing_ok=True)  # replaced or deleted meanwhile
                return None
            seq = self._next_seq(db)
            db.execute(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    obj.id,
                    dtype_name(t.dtype),
                    json.dumps(list(t.shape)),
                    int(t.requires_grad),
                    obj.description,
                    name,
                    seq,
                ),
            )
            db.execute("DELETE FROM tags WHERE object_id = ?", (obj.id,))
            db.executemany(
                "INSERT OR IGNORE INTO tags VALUES (?, ?, ?)",
                [(obj.id, tag, i) for i, tag in enumerate(obj.tags)],
            )
        if old is not None:
            (self.blob_dir / old[0]).unlink(missing_ok=True)
        return seq

    def put_object(self, obj: StoredObject) -> None:
        with self._lock:
            seq = self._write(obj)
            assert seq is not None
            self._live[obj.id] = _Live(seq, obj.tensor._version, obj)

    def _object(self, row: _Row) -> StoredObject:
        object_id, dtype, shape, requires_grad, description, blob, seq = row
        live = self._live.get(object_id)
        if live is not None and live.seq == seq:
            return live.obj
        tensor = read_tensor_file(self.blob_dir / blob, dtype, json.loads(shape))
        if requires_grad:
            tensor.requires_grad_(True)
        q = "SELECT tag FROM tags WHERE object_id = ? ORDER BY pos"
        tags = tuple(t for (t,) in self._conn().execute(q, (object_id,)).fetchall())
        obj = StoredObject(object_id, tensor, tags, description)
        self._live[object_id] = _Live(seq, tensor._version, obj)
        return obj

    def get_object(self, object_id: str) -> StoredObject:
        with self._lock:
            row = self._conn().execute(_GET_ONE, (object_id,)).fetchone()
            if row is None:
                self._live.pop(object_id, None)
                raise ObjectNotFound(
                    f"no object {object_id!r} on this device; it may have been fetched with "
                    "get() or deleted already"
                )
            return self._object(row)

    def has_object(self, object_id: str) -> bool:
        q = "SELECT 1 FROM objects WHERE id = ?"
        return self._conn().execute(q, (object_id,)).fetchone() is not None

    def delete_object(self, object_id: str) -> None:
        with self._lock, self._tx() as db:
            row = db.execute("SELECT blob FROM objects WHERE id = ?", (object_id,)).fetchone()
            if row is None:
                raise ObjectNotFound(f"no object {object_id!r} to delete on this device")
            db.execute("DELETE FROM objects WHERE id = ?", (object_id,))
            db.execute("DELETE FROM tags WHERE object_id = ?", (object_id,))
            self._live.pop(object_id, None)
        (self.blob_dir / row[0]).unlink(missing_ok=True)

    def search(self, tags: list[str]) -> list[StoredObject]:
        wanted = sorted(set(tags))
        if not wanted:
            return self.list_objects()
        with self._lock:
            rows = self._conn().execute(_SEARCH, (json.dumps(wanted), len(wanted))).fetchall()
            return [self._object(r) for r in rows]

    def list_objects(self) -> list[StoredObject]:
        with self._lock:
            return [self._object(r) for r in self._conn().execute(_GET_ALL).fetchall()]

    def clear_objects(self) -> None:
        with self._lock, self._tx() as db:
            blobs = [b for (b,) in db.execute("SELECT blob FROM objects").fetchall()]
            db.execute("DELETE FROM objects")
            db.execute("DELETE FROM tags")
            self._live.clear()
        for b in blobs:
            (self.blob_dir / b).unlink(missing_ok=True)

    def flush(self) -> int:
        """Write back the tensors changed in place since loaded or stored; returns how many."""
        written = 0
        with self._lock:
            self._conn()
            for live in list(self._live.values()):
                if live.obj.tensor._version == live.version:
                    continue
                seq = self._write(live.obj, only_if_seq=live.seq)
                if seq is None:
                    self._live.pop(live.obj.id, None)
                    continue
                live.seq, live.version = seq, live.obj.tensor._version
                written += 1
        return written

    # -- plans -------------------------------------------------------------------------

    def put_plan(self, plan: StoredPlan) -> None:
        proto = plan_to_proto(plan.ir, plan_id=plan.id).SerializeToString()
        with self._lock:
            with self._tx() as db:
                seq = self._next_seq(db)
                db.execute(
                    "INSERT OR REPLACE INTO plans VALUES (?, ?, ?, ?, ?)",
                    (plan.id, proto, plan.content_hash, json.dumps(list(plan.tags)), seq),
                )
                stale = self._drop_state_rows(db, plan.id)
            self._plans[plan.id] = (seq, plan)
            self._marks[plan.id] = _marks_of(plan)
        self._unlink(stale)

    def get_plan(self, plan_id: str) -> StoredPlan:
        with self._lock:
            q = "SELECT seq FROM plans WHERE id = ?"
            found = self._conn().execute(q, (plan_id,)).fetchone()
            if found is None:
                self._plans.pop(plan_id, None)
                raise ObjectNotFound(
                    f"no plan {plan_id!r} on this device; send the plan to it first",
                    plan_id=plan_id,
                )
            cached = self._plans.get(plan_id)
            if cached is not None and cached[0] == found[0]:
                return cached[1]
            q = "SELECT proto, content_hash, tags, seq FROM plans WHERE id = ?"
            row = self._conn().execute(q, (plan_id,)).fetchone()
            proto = PlanProto()
            proto.ParseFromString(row[0])
            ir, _ = plan_from_proto(proto)
            q = "SELECT name, dtype, shape, requires_grad, blob FROM plan_state WHERE plan_id = ?"
            for name, dtype, shape, requires_grad, blob in self._conn().execute(q, (plan_id,)):
                tensor = read_tensor_file(self.blob_dir / blob, dtype, json.loads(shape))
                ir.state_values[name] = tensor.requires_grad_(True) if requires_grad else tensor
            plan = StoredPlan(plan_id, ir, row[1], tuple(json.loads(row[2])))
            self._plans[plan_id] = (int(row[3]), plan)
            self._marks[plan_id] = _marks_of(plan)
            return plan

    def has_plan(self, plan_id: str) -> bool:
        q = "SELECT 1 FROM plans WHERE id = ?"
        return self._conn().execute(q, (plan_id,)).fetchone() is not None

    def save_plan_state(self, plan: StoredPlan) -> None:
        """Persist the state tensors a run changed; a run that changed none writes nothing.

        A state tensor counts as changed when it is another tensor than the one last
        persisted or loaded, or when its ``_version`` (bumped by every in-place op) moved.
        """
        with self._lock:
            self._conn()
            marks = self._marks.setdefault(plan.id, {})
            changed = [
                (name, t)
                for name, t in plan.ir.state_values.items()
                if name not in marks or marks[name][0] is not t or marks[name][1] != t._version
            ]
            if not changed:
                return
            files = {name: self._state_file(plan.id, name, t) for name, t in changed}
            stale: list[str] = []
            with self._tx() as db:
                if db.execute("SELECT 1 FROM plans WHERE id = ?", (plan.id,)).fetchone() is None:
                    stale = list(files.values())  # deleted meanwhile: keep nothing
                else:
                    q = "SELECT blob FROM plan_state WHERE plan_id = ? AND name = ?"
                    for name, t in changed:
                        old = db.execute(q, (plan.id, name)).fetchone()
                        stale += [old[0]] if old else []
                        db.execute(
                            "INSERT OR REPLACE INTO plan_state VALUES (?, ?, ?, ?, ?, ?)",
                            (
                                plan.id,
                                name,
                                dtype_name(t.dtype),
                                json.dumps(list(t.shape)),
                                int(t.requires_grad),
                                files[name],
                            ),
                        )
                    seq = self._next_seq(db)  # other processes' cached copies are stale now
                    db.execute("UPDATE plans SET seq = ? WHERE id = ?", (seq, plan.id))
                    self._plans[plan.id] = (seq, plan)
                    for name, t in changed:
                        marks[name] = (t, t._version)
            self._unlink(stale)

    def _state_file(self, plan_id: str, name: str, tensor: torch.Tensor) -> str:
        stem = hashlib.sha256(f"{plan_id}/{name}".encode()).hexdigest()[:32]
        file = f"state-{stem}-{secrets.token_hex(6)}.bin"
        write_tensor_file(self.blob_dir / file, tensor)
        return file

    def _drop_state_rows(self, db: sqlite3.Connection, plan_id: str) -> list[str]:
        q = "SELECT blob FROM plan_state WHERE plan_id = ?"
        blobs = [b for (b,) in db.execute(q, (plan_id,)).fetchall()]
        db.execute("DELETE FROM plan_state WHERE plan_id = ?", (plan_id,))
        return blobs

    def _unlink(self, blobs: list[str]) -> None:
        for b in blobs:
            (self.blob_dir / b).unlink(missing_ok=True)

    def delete_plan(self, plan_id: str) -> None:
        with self._lock:
            with self._tx() as db:
                self._plans.pop(plan_id, None)
                self._marks.pop(plan_id, None)
                if db.execute("DELETE FROM plans WHERE id = ?", (plan_id,)).rowcount == 0:
                    raise ObjectNotFound(f"no plan {plan_id!r} to delete", plan_id=plan_id)
                stale = self._drop_state_rows(db, plan_id)
            self._unlink(stale)

    # -- replies (idempotency) ---------------------------------------------------------

    def put_reply(self, command_id: str, result_ids: list[str], reply: bytes) -> None:
        """Remember a command's reply, after writing back what the command changed."""
        self.flush()
        with self._tx() as db:
            seq = self._next_seq(db)
            db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                (command_id, json.dumps(result_ids), reply, seq),
            )
            db.execute("DELETE FROM replies WHERE seq <= ?", (seq - self._max_replies,))

    def get_reply(self, command_id: str) -> bytes | None:
        q = "SELECT reply FROM replies WHERE command_id = ?"
        row = self._conn().execute(q, (command_id,)).fetchone()
        return None if row is None else bytes(row[0])


def _marks_of(plan: StoredPlan) -> _Marks:
    return {name: (t, t._version) for name, t in plan.ir.state_values.items()}
