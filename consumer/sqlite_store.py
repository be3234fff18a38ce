"""A persistent device store: a SQLite (WAL) index plus one raw-bytes file per tensor."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from consumer.store import StoredObject, StoredPlan
from schemas.errors import ObjectNotFound, WireError
from schemas.plan_codec import plan_from_proto, plan_to_proto
from schemas.plan_pb2 import PlanProto

# Fixed dtype table: names read back from disk are looked up here, never resolved by getattr.
DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    )
}

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
    id TEXT PRIMARY KEY, proto BLOB NOT NULL, content_hash TEXT NOT NULL, tags TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS replies (
    command_id TEXT PRIMARY KEY, result_ids TEXT NOT NULL, reply BLOB NOT NULL,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS counter (k INTEGER PRIMARY KEY CHECK (k = 0), n INTEGER NOT NULL);
INSERT OR IGNORE INTO counter VALUES (0, 0);
"""

_GET_ONE = "SELECT id, dtype, shape, requires_grad, description, blob FROM objects WHERE id = ?"
_GET_ALL = "SELECT id, dtype, shape, requires_grad, description, blob FROM objects ORDER BY seq"
_SEARCH = (
    "SELECT id, dtype, shape, requires_grad, description, blob FROM objects "
    "WHERE id IN (SELECT object_id FROM tags WHERE tag IN (SELECT value FROM json_each(?)) "
    "GROUP BY object_id HAVING COUNT(DISTINCT tag) = ?) ORDER BY seq"
)


class SqliteStore:
    """A :class:`~consumer.store.DeviceStore` under ``data_dir`` that survives restarts.

    Safe across threads (one connection per thread) and across processes (SQLite WAL with a
    busy timeout; tensor files are written to a temporary name and renamed into place).
    Tensors are stored as raw element bytes with dtype and shape, plans as encoded
    ``PlanProto`` (their state included). Nothing is pickled.

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
        self._conn().executescript(_SCHEMA)

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        pid = getattr(self._local, "pid", None)
        if conn is None or pid != os.getpid():  # never share a connection across a fork
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

    def _blob_name(self, object_id: str) -> str:
        return hashlib.sha256(object_id.encode()).hexdigest() + ".bin"

    def _write_blob(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu().reshape(-1)
        raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        fd, tmp = tempfile.mkstemp(dir=self.blob_dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw.numpy().data)
            os.replace(tmp, self.blob_dir / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _read_blob(self, name: str, dtype_name: str, shape: list[int]) -> torch.Tensor:
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise WireError(f"stored tensor has unknown dtype {dtype_name!r}")
        path = self.blob_dir / name
        size = path.stat().st_size
        buf = bytearray(size)
        with path.open("rb") as f:
            f.readinto(buf)
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def put_object(self, obj: StoredObject) -> None:
        name = self._blob_name(obj.id)
        self._write_blob(name, obj.tensor)
        with self._tx() as db:
            seq = self._next_seq(db)
            db.execute(
                "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    obj.id,
                    str(obj.tensor.dtype).removeprefix("torch."),
                    json.dumps(list(obj.tensor.shape)),
                    int(obj.tensor.requires_grad),
                    obj.description,
                    name,
                    seq,
                ),
            )
            db.execute("DELETE FROM tags WHERE object_id = ?", (obj.id,))
            db.executemany(
                "INSERT OR IGNORE INTO tags VALUES (?, ?, ?)",
                [(obj.id, t, i) for i, t in enumerate(obj.tags)],
            )

    def _load(self, row: tuple[str, str, str, int, str, str]) -> StoredObject:
        object_id, dtype_name, shape, requires_grad, description, blob = row
        tensor = self._read_blob(blob, dtype_name, json.loads(shape))
        if requires_grad:
            tensor.requires_grad_(True)
        tags = (
            self._conn()
            .execute("SELECT tag FROM tags WHERE object_id = ? ORDER BY pos", (object_id,))
            .fetchall()
        )
        return StoredObject(object_id, tensor, tuple(t for (t,) in tags), description)

    def get_object(self, object_id: str) -> StoredObject:
        row = (
            self._conn()
            .execute(
                _GET_ONE,
                (object_id,),
            )
            .fetchone()
        )
        if row is None:
            raise ObjectNotFound(
                f"no object {object_id!r} on this device; it may have been fetched with "
                "get() or deleted already"
            )
        return self._load(row)

    def has_object(self, object_id: str) -> bool:
        q = "SELECT 1 FROM objects WHERE id = ?"
        return self._conn().execute(q, (object_id,)).fetchone() is not None

    def delete_object(self, object_id: str) -> None:
        with self._tx() as db:
            row = db.execute("SELECT blob FROM objects WHERE id = ?", (object_id,)).fetchone()
            if row is None:
                raise ObjectNotFound(f"no object {object_id!r} to delete on this device")
            db.execute("DELETE FROM objects WHERE id = ?", (object_id,))
            db.execute("DELETE FROM tags WHERE object_id = ?", (object_id,))
        (self.blob_dir / row[0]).unlink(missing_ok=True)

    def search(self, tags: list[str]) -> list[StoredObject]:
        wanted = sorted(set(tags))
        if not wanted:
            return self.list_objects()
        rows = (
            self._conn()
            .execute(
                _SEARCH,
                (json.dumps(wanted), len(wanted)),
            )
            .fetchall()
        )
        return [self._load(r) for r in rows]

    def list_objects(self) -> list[StoredObject]:
        rows = self._conn().execute(_GET_ALL).fetchall()
        return [self._load(r) for r in rows]

    def clear_objects(self) -> None:
        with self._tx() as db:
            blobs = [b for (b,) in db.execute("SELECT blob FROM objects").fetchall()]
            db.execute("DELETE FROM objects")
            db.execute("DELETE FROM tags")
        for b in blobs:
            (self.blob_dir / b).unlink(missing_ok=True)

    # -- plans -------------------------------------------------------------------------

    def put_plan(self, plan: StoredPlan) -> None:
        proto = plan_to_proto(plan.ir, plan_id=plan.id).SerializeToString()
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO plans VALUES (?, ?, ?, ?)",
                (plan.id, proto, plan.content_hash, json.dumps(list(plan.tags))),
            )

    def get_plan(self, plan_id: str) -> StoredPlan:
        row = (
            self._conn()
            .execute("SELECT proto, content_hash, tags FROM plans WHERE id = ?", (plan_id,))
            .fetchone()
        )
        if row is None:
            raise ObjectNotFound(
                f"no plan {plan_id!r} on this device; send the plan to it first",
                plan_id=plan_id,
            )
        proto = PlanProto()
        proto.ParseFromString(row[0])
        ir, _ = plan_from_proto(proto)
        return StoredPlan(plan_id, ir, row[1], tuple(json.loads(row[2])))

    def has_plan(self, plan_id: str) -> bool:
        q = "SELECT 1 FROM plans WHERE id = ?"
        return self._conn().execute(q, (plan_id,)).fetchone() is not None

    def save_plan_state(self, plan: StoredPlan) -> None:
        """Write the plan again with its current state (state tensors live in the proto)."""
        self.put_plan(plan)

    def delete_plan(self, plan_id: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM plans WHERE id = ?", (plan_id,)).rowcount == 0:
                raise ObjectNotFound(f"no plan {plan_id!r} to delete", plan_id=plan_id)

    # -- replies (idempotency) ---------------------------------------------------------

    def put_reply(self, command_id: str, result_ids: list[str], reply: bytes) -> None:
        with self._tx() as db:
            seq = self._next_seq(db)
            db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?)",
                (command_id, json.dumps(result_ids), reply, seq),
            )
            db.execute("DELETE FROM replies WHERE seq <= ?", (seq - self._max_replies,))

    def get_reply(self, command_id: str) -> bytes | None:
        row = (
            self._conn()
            .execute("SELECT reply FROM replies WHERE command_id = ?", (command_id,))
            .fetchone()
        )
        return None if row is None else bytes(row[0])
