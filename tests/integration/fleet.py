"""A RabbitMQ fleet for the behaviour suite: one real Celery worker process per device.

Workers are started on a device's first use and kept (in a vhost of the session's own,
deleted at exit), so a device used again costs no worker start-up. After each behaviour test
the pool keeps only the ``MAX_IDLE_WORKERS`` most recently used workers: many tests name
their devices afresh, and a worker per device for the whole session grew to 85 processes
(~17 GiB) and an OOM kill. A stopped device's queue and data dir stay; its worker starts
again on next use.
"""

from __future__ import annotations

import atexit
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import producer as fp
from producer.remote.collector import ReplyCollector
from producer.transport.amqp import AmqpTransport
from tests.integration.broker import RunVhost, WorkerProcess

MAX_IDLE_WORKERS = 16
"""Workers the pool keeps running between tests (the most recently used ones)."""


class WorkerPool:
    """The session's vhost and its device workers (stopped and deleted at exit)."""

    def __init__(self) -> None:
        self.vhost = RunVhost(secrets.token_hex(4)).create()
        self.root = Path(tempfile.mkdtemp(prefix="fedplan-workers-"))
        self.workers: OrderedDict[str, WorkerProcess] = OrderedDict()  # least recent first
        self._lock = threading.Lock()
        atexit.register(self.shutdown)

    def ensure(self, device_id: str) -> None:
        """Start the device's worker unless it runs (commands wait in its durable queue)."""
        with self._lock:
            w = self.workers.get(device_id)
            if w is None or w.proc is None or w.proc.poll() is not None:
                w = WorkerProcess(device_id, self.root / device_id, self.vhost).start()
                self.workers[device_id] = w
            self.workers.move_to_end(device_id)

    def trim(self, keep: int = MAX_IDLE_WORKERS) -> None:
        """Between tests: stop all but the ``keep`` most recently used workers."""
        with self._lock:
            while len(self.workers) > keep:
                _, w = self.workers.popitem(last=False)
                w.stop()

    def shutdown(self) -> None:
        for w in self.workers.values():
            w.stop()
        self.workers.clear()
        try:
            self.vhost.delete()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def worker_pool() -> WorkerPool:
    """The session's pool, created on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = WorkerPool()
        return _pool


class SpawningTransport(AmqpTransport):
    """An ``AmqpTransport`` whose ``ensure_device`` also starts the device's worker."""

    def __init__(self, *, pool: WorkerPool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool = pool

    def ensure_device(self, device_id: str) -> None:
        super().ensure_device(device_id)
        self._pool.ensure(device_id)


def trim_workers() -> None:
    """Stop the session's least recently used device workers (see ``MAX_IDLE_WORKERS``)."""
    if _pool is not None:
        _pool.trim()


def connect_rabbitmq(timeout: float = 120.0) -> fp.Fleet:
    """A fleet over RabbitMQ whose devices are real Celery worker processes."""
    pool = worker_pool()
    collector = ReplyCollector()
    settings = pool.vhost.settings.replace(producer_id=f"b{secrets.token_hex(4)}")
    transport = SpawningTransport(pool=pool, on_reply=collector.on_reply, settings=settings)
    return fp.Fleet(transport=transport, collector=collector, timeout=timeout)


def connect_rabbitmq_as(user: str, password: str, timeout: float = 120.0) -> fp.Fleet:
    """A fleet over the session's vhost as another broker user (created with full rights in
    the vhost: a second producer); delete it with :func:`delete_user`."""
    from urllib.parse import quote

    pool = worker_pool()
    admin = pool.vhost.admin
    admin.request("PUT", f"users/{admin.q(user)}", {"password": password, "tags": ""})
    admin.request(
        "PUT",
        f"permissions/{admin.q(pool.vhost.name)}/{admin.q(user)}",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    url = f"amqp://{user}:{password}@127.0.0.1:5672/{quote(pool.vhost.name, safe='')}"
    collector = ReplyCollector()
    settings = pool.vhost.settings.replace(
        broker_url=url,
        producer_id=f"m{secrets.token_hex(4)}",
        trusted_reply_users=admin.user,  # the workers answer as the session's user
    )
    transport = SpawningTransport(pool=pool, on_reply=collector.on_reply, settings=settings)
    return fp.Fleet(transport=transport, collector=collector, timeout=timeout)


def delete_user(user: str) -> None:
    """Delete a broker user made by :func:`connect_rabbitmq_as`."""
    admin = worker_pool().vhost.admin
    admin.request("DELETE", f"users/{admin.q(user)}")


def data_dir(device_id: str) -> Path:
    """The data dir of the session's worker for ``device_id`` (the device operator's)."""
    return worker_pool().root / device_id
