"""Fixtures for RabbitMQ + Celery integration tests: a vhost per run, workers, a transport."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producer.transport.amqp import AmqpTransport
from tests.integration.broker import Replies, RunVhost, WorkerProcess


@pytest.fixture(scope="module")
def vhost() -> Iterator[RunVhost]:
    """A fresh vhost (deleted afterwards, with every queue in it)."""
    v = RunVhost(secrets.token_hex(4)).create()
    yield v
    v.delete()


@pytest.fixture
def workers(vhost: RunVhost, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start a worker for a device: ``workers("alice", env={...})``; all stop afterwards."""
    started: list[WorkerProcess] = []

    def start(
        device_id: str, env: dict[str, str] | None = None, app: str = "consumer"
    ) -> WorkerProcess:
        w = WorkerProcess(device_id, tmp_path / device_id, vhost, env, app=app).start()
        started.append(w)
        return w.wait_ready()

    yield start
    for w in started:
        w.stop()


@pytest.fixture
def replies() -> Replies:
    return Replies()


@pytest.fixture
def transport(vhost: RunVhost, replies: Replies) -> Iterator[AmqpTransport]:
    t = AmqpTransport(
        on_reply=replies.on_reply,
        settings=vhost.settings.replace(producer_id=f"t{secrets.token_hex(4)}"),
    )
    yield t
    t.close()
