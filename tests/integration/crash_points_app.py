"""The device Celery app, except that the worker kills itself once at each named point.

Test-only: ``FEDPLAN_TEST_CRASH_AT`` lists ``<command body>:<point>`` pairs, e.g.
``run_plan:state_saved,run_plan:committed``; the pool process ``os._exit``\\ s the first time
a command of that body reaches the point (a flag file per pair in
``FEDPLAN_TEST_CRASH_FLAGS`` makes it once), so the redelivered command runs on. Points, in
the order a command reaches them:

- ``ran``: the plan or op ran, nothing of it is written yet
- ``state_saved``: the plan's new state is written (in the open transaction)
- ``results_stored``: its results are written
- ``forwarded``: a move published the object to the destination device
- ``deleted``: an object was deleted (``DeleteObjects``, ``get(delete=True)``), not committed
- ``reply_stored``: its reply is written, the transaction not committed
- ``committed``: committed, the reply not yet published

``reply:unpublished``, whatever the body: the first reply publish fails as if the broker's
node had gone (a kombu ``OperationalError``; the pool process lives on), and
``open:collecting``, whatever the body: a pool process opening the store has deleted one
orphan blob file of the collection at open, the rest of it not done nor committed.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kombu.exceptions import OperationalError

import consumer.worker.tasks as tasks
from consumer.runtime.device import DeviceRuntime
from consumer.store.sqlite import SqliteStore
from consumer.store.units import BlobUnits
from consumer.worker.celery_app import app

POINTS = frozenset(filter(None, os.environ.get("FEDPLAN_TEST_CRASH_AT", "").split(",")))
FLAGS = Path(os.environ.get("FEDPLAN_TEST_CRASH_FLAGS", "."))
_body = [""]


def crash(point: str) -> None:
    """Exit at once if this command body's point is listed and has not crashed yet."""
    crash_named(f"{_body[0]}:{point}")


def crash_named(name: str) -> None:
    """Exit at once if ``name`` is listed and has not crashed yet."""
    if name not in POINTS:
        return
    try:
        os.close(os.open(FLAGS / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(70)


def _around(owner: Any, method: str, before: str | None = None, after: str | None = None) -> None:
    original: Callable[..., Any] = getattr(owner, method)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            crash(before)
        out = original(*args, **kwargs)
        if after:
            crash(after)
        return out

    setattr(owner, method, wrapper)


_dispatch = DeviceRuntime._dispatch


def _dispatch_noting_body(self: DeviceRuntime, body: str, *args: Any) -> Any:
    _body[0] = body
    return _dispatch(self, body, *args)


def _collect_orphans_crashing(self: BlobUnits, db: sqlite3.Connection, referenced: set[str]) -> int:
    """``BlobUnits.collect_orphans`` with a crash after its first unlink."""
    self._touched()
    orphans = [p for p in self.blob_dir.iterdir() if p.name not in referenced]
    for p in orphans:
        p.unlink(missing_ok=True)
        crash_named("open:collecting")
    return len(orphans)


_publish_reply = tasks.publish_reply


def _publish_reply_failing_once(*args: Any, **kwargs: Any) -> None:
    name = "reply:unpublished"
    if name in POINTS:
        try:
            os.close(os.open(FLAGS / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            raise OperationalError("test: the broker node took no reply")
    _publish_reply(*args, **kwargs)


tasks.publish_reply = _publish_reply_failing_once  # type: ignore[assignment]
DeviceRuntime._dispatch = _dispatch_noting_body  # type: ignore[method-assign]
BlobUnits.collect_orphans = _collect_orphans_crashing  # type: ignore[method-assign]
_around(SqliteStore, "delete_object", after="deleted")
_around(SqliteStore, "save_plan_state", before="ran", after="state_saved")
_around(DeviceRuntime, "_store_results", before="ran", after="results_stored")
_around(tasks, "_forward", after="forwarded")
_around(SqliteStore, "put_reply", after="reply_stored")
_around(SqliteStore, "commit", after="committed")
celery = app
