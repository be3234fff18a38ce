"""A persistent device store: a SQLite (WAL) index plus one raw-bytes file per tensor.

A command's writes are one *unit* (:meth:`SqliteStore.begin` ... :meth:`~SqliteStore.commit`):
one SQLite transaction holds the new plan state, the stored results, the tensors changed in
place and the cached reply. Blob files are written under new names inside the transaction and
only the committed rows point at them; files a dead transaction wrote (or replaced files whose
unlink a crash interrupted) are deleted when the store opens. So a worker killed at any point
of a command leaves either nothing of it or all of it with its reply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import time

import torch

from consumer.store.base import StoredObject, StoredPlan
from consumer.store.limits import StoreLimits
from consumer.store.live_cache import LiveCache
from consumer.store.sqlite_schema import (
    GET_ALL,
    GET_ONE,
    INDEXES,
    REFERENCED,
    REPLIES_HELD,
    SCHEMA,
    SEARCH,
    USAGE,
    USED,
    add_missing_columns,
    recount,
)
from consumer.store.tensor_files import (
    dtype_name,
    read_tensor_file,
    tensor_nbytes,
)
from consumer.store.units import BlobUnits, Unit
from schemas.errors import ObjectNotFound, StoreFullError
from schemas.plan_codec import plan_from_proto, plan_to_proto
from schemas.plan_pb2 import PlanProto
from schemas.tensor_codec import FramedParts

INLINE_REPLY_BYTES = 64 * 1024
"""Cached replies up to this size live in SQLite; larger ones in a file of their own."""

log = logging.getLogger(__name__)

_Row = tuple[str, str, str, int, str, str, int]

_Marks = dict[str, tuple[torch.Tensor, int]]
"""Per state name: the tensor last persisted (or loaded) and its ``_version`` then."""


class SqliteStore(BlobUnits):
    """A :class:`~consumer.store.DeviceStore` under ``data_dir`` that survives restarts.

    Tensors are raw element bytes in files (a new file per write, renamed into place) with
    dtype, shape and tags in SQLite (WAL mode, busy timeout): safe across threads and
    processes. Plans are stored as encoded ``PlanProto`` with their initial state; a state
    tensor changed by a run is written to a file of its own, and only when it changed (its
    identity or ``_version`` differ from when it was last persisted). Nothing is pickled.

    Like the in-memory store, it hands out *live* objects: the tensors a process loaded stay
    in memory (with their autograd history and ``.grad``) while the row they came from is
    unchanged, so in-place ops act on the stored object; at most ``limits.cache_bytes`` of
    them (least recently used first out; tensors that require grad stay). :meth:`flush`
    writes tensors changed in place back to disk; it runs before every stored reply, in the
    same unit, so a redelivered command never finds its reply without the effects that led
    to it, nor those effects without the reply. Bounds: see :mod:`consumer.store.limits`.

    Examples
    --------
    >>> import tempfile, torch
    >>> store = SqliteStore(tempfile.mkdtemp())
    >>> store.put_object(StoredObject("a", torch.arange(3), tags=("#x",)))
    >>> store.search(["#x"])[0].tensor
    tensor([0, 1, 2])
    >>> store.begin()                     # a unit: all or nothing
    >>> store.put_object(StoredObject("b", torch.ones(2)))
    >>> store.rollback()
    >>> store.has_object("b")
    False
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        limits: StoreLimits | None = None,
        max_replies: int | None = None,
    ) -> None:
        limits = limits or StoreLimits()
        if max_replies is not None:
            limits = dataclasses.replace(limits, max_replies=max_replies)
        self.limits = limits
        self._live = LiveCache(limits.cache_bytes)
        self._plans: dict[str, tuple[int, StoredPlan]] = {}
        self._marks: dict[str, _Marks] = {}
        self._expiry_due = 0.0
        super().__init__(data_dir)
        db = self._conn()
        db.executescript(SCHEMA)
        add_missing_columns(db)
        db.executescript(INDEXES)
        db.executescript(USAGE)
        recount(db)
        self.collect_garbage()

    def _forked(self) -> None:
        self._plans, self._marks = {}, {}
        self._live = LiveCache(self.limits.cache_bytes)

    def _after_commit(self) -> None:
        with self._lock:
            self._live.trim()

    def _check_room(self, db: sqlite3.Connection, adding: int, freeing: int, what: str) -> None:
        used = int(db.execute(USED).fetchone()[0])
        after = used - freeing + adding
        if adding > freeing and after > self.limits.max_bytes:
            raise StoreFullError(
                f"storing {what} ({adding} bytes) would take the device store to {after} "
                f"bytes, over its bound of {self.limits.max_bytes} (FEDPLAN_STORE_MAX_BYTES); "
                "the command changed nothing. Delete objects the server no longer needs "
                "(get() them or drop their pointers) or raise the bound"
            )

    def collect_garbage(self) -> int:
        """Delete blob files no committed row points at, and expired replies; returns files.

        Runs when the store opens. Files are created only inside a transaction, so under the
        write lock every unreferenced file belongs to a transaction that never committed or
        was replaced by one that did.
        """
        with self._tx() as db:
            referenced = {b for (b,) in db.execute(REFERENCED).fetchall()}
            orphans = self.collect_orphans(db, referenced)
            self._expire_replies(db, time.time(), 0, 0, force=True)
        if orphans:
            log.info("deleted %d blob files of unfinished writes", orphans)
        return orphans

    # -- the in-memory cache -----------------------------------------------------------

    def _after_rollback(self, unit: Unit) -> None:
        """Forget what the unit wrote; after a command's unit also what it changed in place.

        A write's own unit (a store call outside any unit) only forgets that write: tensors
        changed in place before it are not its doing and stay until flushed.
        """
        with self._lock:
            for object_id in unit.objects:
                self._live.pop(object_id)
            for plan_id in unit.plans:
                self._plans.pop(plan_id, None)
                self._marks.pop(plan_id, None)
            if unit.implicit:
                return
            for live in self._live.values():
                if live.dirty:
                    self._live.pop(live.obj.id)
            for plan_id in list(self._plans):
                marks = self._marks.get(plan_id, {})
                state = self._plans[plan_id][1].ir.state_values
                if any(
                    name not in marks or marks[name][0] is not t or marks[name][1] != t._version
                    for name, t in state.items()
                ):
                    self._plans.pop(plan_id, None)
                    self._marks.pop(plan_id, None)

    # -- tensors -----------------------------------------------------------------------

    def _write(self, obj: StoredObject, *, only_if_seq: int | None = None) -> int | None:
        """Write the tensor to a new file and point the row at it; returns the new seq."""
        t = obj.tensor
        size = tensor_nbytes(t)
        with self._tx() as db:
            q = "SELECT blob, seq, size FROM objects WHERE id = ?"
            old = db.execute(q, (obj.id,)).fetchone()
            if only_if_seq is not None and (old is None or old[1] != only_if_seq):
                return None  # replaced or deleted meanwhile
            self._check_room(db, size, old[2] if old else 0, f"object {obj.id!r}")
            name = self._new_file(obj.id, "", t)
            seq = self._next_seq(db)
            db.execute(
                "INSERT OR REPLACE INTO objects (id, dtype, shape, requires_grad, description,"
                " blob, seq, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    obj.id,
                    dtype_name(t.dtype),
                    json.dumps(list(t.shape)),
                    int(t.requires_grad),
                    obj.description,
                    name,
                    seq,
                    size,
                ),
            )
            db.execute("DELETE FROM tags WHERE object_id = ?", (obj.id,))
            db.executemany(
                "INSERT OR IGNORE INTO tags VALUES (?, ?, ?)",
                [(obj.id, tag, i) for i, tag in enumerate(obj.tags)],
            )
            self._discard([old[0]] if old is not None else [])
            self._touched().objects.add(obj.id)
        return seq

    def put_object(self, obj: StoredObject) -> None:
        with self._lock, self._tx():  # its own unit, unless inside one: trimmed after
            seq = self._write(obj)
            assert seq is not None
            self._live.put(obj, seq)

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
        self._live.put(obj, seq)
        return obj

    def get_object(self, object_id: str) -> StoredObject:
        with self._lock:
            row = self._conn().execute(GET_ONE, (object_id,)).fetchone()
            if row is None:
                self._live.pop(object_id)
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
            self._discard([row[0]])
            self._live.pop(object_id)
            self._touched().objects.add(object_id)

    def search(self, tags: list[str]) -> list[StoredObject]:
        wanted = sorted(set(tags))
        if not wanted:
            return self.list_objects()
        with self._lock:
            rows = self._conn().execute(SEARCH, (json.dumps(wanted), len(wanted))).fetchall()
            return [self._object(r) for r in rows]

    def list_objects(self) -> list[StoredObject]:
        with self._lock:
            return [self._object(r) for r in self._conn().execute(GET_ALL).fetchall()]

    def clear_objects(self) -> None:
        with self._lock, self._tx() as db:
            rows = db.execute("SELECT id, blob FROM objects").fetchall()
            db.execute("DELETE FROM objects")
            db.execute("DELETE FROM tags")
            self._discard([b for _, b in rows])
            self._touched().objects.update(i for i, _ in rows)
            self._live.clear()

    def resident_objects(self) -> list[StoredObject]:
        """The objects of the in-memory cache (nothing is loaded from disk)."""
        with self._lock:
            return [live.obj for live in self._live.values()]

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
                    self._live.pop(live.obj.id)
                    continue
                live.seq, live.version = seq, live.obj.tensor._version
                written += 1
        return written

    def stored_bytes(self) -> int:
        """Bytes the store holds now: tensors, plans, plan state and cached replies."""
        return int(self._conn().execute(USED).fetchone()[0])

    def cached_bytes(self) -> int:
        """Bytes of stored tensors this process holds in memory."""
        with self._lock:
            return self._live.nbytes

    # -- plans -------------------------------------------------------------------------

    def put_plan(self, plan: StoredPlan) -> None:
        proto = plan_to_proto(plan.ir, plan_id=plan.id).SerializeToString()
        with self._lock:
            with self._tx() as db:
                q = "SELECT (SELECT COALESCE(SUM(size), 0) FROM plans WHERE id = ?)"
                q += " + (SELECT COALESCE(SUM(size), 0) FROM plan_state WHERE plan_id = ?)"
                held = int(db.execute(q, (plan.id, plan.id)).fetchone()[0])
                self._check_room(db, len(proto), held, f"plan {plan.id!r}")
                seq = self._next_seq(db)
                db.execute(
                    "INSERT OR REPLACE INTO plans (id, proto, content_hash, tags, seq, size)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        plan.id,
                        proto,
                        plan.content_hash,
                        json.dumps(list(plan.tags)),
                        seq,
                        len(proto),
                    ),
                )
                self._discard(self._drop_state_rows(db, plan.id))
                self._touched().plans.add(plan.id)
            self._plans[plan.id] = (seq, plan)
            self._marks[plan.id] = _marks_of(plan)

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
            with self._tx() as db:
                if db.execute("SELECT 1 FROM plans WHERE id = ?", (plan.id,)).fetchone() is None:
                    return  # deleted meanwhile: keep nothing
                q = "SELECT blob, size FROM plan_state WHERE plan_id = ? AND name = ?"
                olds = {name: db.execute(q, (plan.id, name)).fetchone() for name, _ in changed}
                adding = sum(tensor_nbytes(t) for _, t in changed)
                freeing = sum(old[1] for old in olds.values() if old is not None)
                self._check_room(db, adding, freeing, f"the state of plan {plan.id!r}")
                for name, t in changed:
                    old = olds[name]
                    self._discard([old[0]] if old else [])
                    db.execute(
                        "INSERT OR REPLACE INTO plan_state (plan_id, name, dtype, shape,"
                        " requires_grad, blob, size) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            plan.id,
                            name,
                            dtype_name(t.dtype),
                            json.dumps(list(t.shape)),
                            int(t.requires_grad),
                            self._new_file(f"{plan.id}/{name}", "state-", t),
                            tensor_nbytes(t),
                        ),
                    )
                seq = self._next_seq(db)  # other processes' cached copies are stale now
                db.execute("UPDATE plans SET seq = ? WHERE id = ?", (seq, plan.id))
                self._touched().plans.add(plan.id)
                self._plans[plan.id] = (seq, plan)
                for name, t in changed:
                    marks[name] = (t, t._version)

    def _drop_state_rows(self, db: sqlite3.Connection, plan_id: str) -> list[str]:
        q = "SELECT blob FROM plan_state WHERE plan_id = ?"
        blobs = [b for (b,) in db.execute(q, (plan_id,)).fetchall()]
        db.execute("DELETE FROM plan_state WHERE plan_id = ?", (plan_id,))
        return blobs

    def delete_plan(self, plan_id: str) -> None:
        with self._lock, self._tx() as db:
            self._plans.pop(plan_id, None)
            self._marks.pop(plan_id, None)
            if db.execute("DELETE FROM plans WHERE id = ?", (plan_id,)).rowcount == 0:
                raise ObjectNotFound(f"no plan {plan_id!r} to delete", plan_id=plan_id)
            self._discard(self._drop_state_rows(db, plan_id))
            self._touched().plans.add(plan_id)

    # -- replies (idempotency) ---------------------------------------------------------

    def put_reply(
        self, command_id: str, result_ids: list[str], reply: bytes | FramedParts
    ) -> None:
        """Remember a command's reply, after writing back what the command changed.

        Expired replies go first, then the oldest while over ``max_replies`` or
        ``max_reply_bytes``; a reply larger than ``max_reply_bytes`` alone raises
        :class:`~schemas.errors.StoreFullError` (nothing is stored).
        """
        size = len(reply)
        if size > self.limits.max_reply_bytes:
            raise StoreFullError(
                f"the reply of command {command_id} is {size} bytes, more than the "
                f"{self.limits.max_reply_bytes} bytes of cached replies a device keeps "
                "(FEDPLAN_STORE_MAX_REPLY_BYTES); the command changed nothing. Return "
                "fewer values with the command and fetch big results with get()"
            )
        with self._lock:
            self.flush()
            with self._tx() as db:
                self._expire_replies(db, time.time(), 1, size)
                q = "SELECT file, size FROM replies WHERE command_id = ?"
                old = db.execute(q, (command_id,)).fetchone()
                self._check_room(db, size, old[1] if old else 0, f"the reply of {command_id}")
                file = None
                if size > INLINE_REPLY_BYTES:
                    file = self._new_file(command_id, "reply-", reply)
                self._discard([old[0]] if old and old[0] else [])
                db.execute(
                    "INSERT OR REPLACE INTO replies (command_id, result_ids, reply, seq, file,"
                    " size, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        command_id,
                        json.dumps(result_ids),
                        b"" if file else bytes(reply),
                        self._next_seq(db),
                        file,
                        size,
                        time.time(),
                    ),
                )

    def _expire_replies(
        self, db: sqlite3.Connection, now: float, count: int, size: int, *, force: bool = False
    ) -> None:
        """Drop expired replies, then the oldest until ``count`` more of ``size`` bytes fit.

        The scan for expired replies runs at most every ``reply_ttl / 10`` (and 60) seconds
        unless forced; the count and bytes bounds are checked every time.
        """
        if force or now >= self._expiry_due:
            self._expiry_due = now + min(60.0, self.limits.reply_ttl / 10)
            cutoff = now - self.limits.reply_ttl
            q = "SELECT file FROM replies WHERE created < ? AND file IS NOT NULL"
            self._discard([f for (f,) in db.execute(q, (cutoff,)).fetchall()])
            db.execute("DELETE FROM replies WHERE created < ?", (cutoff,))
        n, total = db.execute(REPLIES_HELD).fetchone()
        max_n, max_bytes = self.limits.max_replies, self.limits.max_reply_bytes
        if n + count <= max_n and total + size <= max_bytes:
            return
        gone: list[str] = []
        for command_id, reply_size, file in db.execute(
            "SELECT command_id, size, file FROM replies ORDER BY seq"
        ).fetchall():
            if n + count <= max_n and total + size <= max_bytes:
                break
            gone.append(command_id)
            n, total = n - 1, total - reply_size
            self._discard([file] if file else [])
        db.executemany("DELETE FROM replies WHERE command_id = ?", [(c,) for c in gone])

    def expire_replies(self) -> None:
        """Drop the cached replies that expired (also done whenever a reply is stored)."""
        with self._tx() as db:
            self._expire_replies(db, time.time(), 0, 0, force=True)

    def get_reply(self, command_id: str) -> bytes | None:
        """The cached reply of a command, or None.

        Inside a unit it is read under the unit's write lock (taken here, held to its end):
        a run of the same command in another process has then committed or not begun.
        """
        q = "SELECT reply, file FROM replies WHERE command_id = ?"
        if self._unit() is not None:
            with self._lock, self._tx() as db:
                row = db.execute(q, (command_id,)).fetchone()
        else:
            row = self._conn().execute(q, (command_id,)).fetchone()
        if row is None:
            return None
        if row[1] is None:
            return bytes(row[0])
        try:
            return (self.blob_dir / row[1]).read_bytes()
        except FileNotFoundError:  # replaced meanwhile by another process: as if expired
            log.warning("the cached reply of %s has no file any more", command_id)
            return None


def _marks_of(plan: StoredPlan) -> _Marks:
    return {name: (t, t._version) for name, t in plan.ir.state_values.items()}
