"""Fixtures for RabbitMQ + Celery integration tests: a vhost per run, workers, a transport."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from broker_config.setup import create_producer_user, declare_topology
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


@pytest.fixture
def producer(vhost: RunVhost) -> Iterator[tuple[str, str, str]]:
    """A second producer: its id, its least-privilege broker user and that user's AMQP URL
    (the user is deleted afterwards)."""
    pid = f"lp{secrets.token_hex(3)}"
    password = secrets.token_hex(8)
    declare_topology(vhost.client, vhost.settings, ["pu"])
    user = create_producer_user(vhost.client, pid, password)
    url = f"amqp://{user}:{password}@127.0.0.1:5672/{quote(vhost.name, safe='')}"
    yield pid, user, url
    vhost.admin.request("DELETE", f"users/{vhost.admin.q(user)}")
