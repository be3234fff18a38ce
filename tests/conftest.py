"""Suite-wide rules: tests marked ``rabbitmq`` skip without a broker, but fail under CI=true."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlsplit

import pytest

from broker_config.settings import Settings

AMQP_PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"


def ci_mode() -> bool:
    """Whether this run is CI (``CI`` set to a true value), where nothing may be skipped."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def broker_problem() -> str | None:
    """Why no AMQP broker answers at the configured URL, or None when one does."""
    url = Settings.from_env().broker_url
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            if parts.scheme == "amqps":
                return None  # TLS: an open port is as far as this check goes
            sock.settimeout(3)
            sock.sendall(AMQP_PROTOCOL_HEADER)
            first = sock.recv(1)
    except OSError as exc:
        return f"no RabbitMQ answers at {host}:{port} ({exc})"
    if first != b"\x01":  # a Connection.Start method frame
        return f"{host}:{port} does not speak AMQP 0-9-1"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("rabbitmq") is None:
        return
    problem = broker_problem()
    if problem is None:
        return
    if ci_mode():
        pytest.fail(
            f"{problem}; CI=true requires a broker for tests marked rabbitmq: "
            "run ./scripts/ensure_rabbitmq (or set FEDPLAN_BROKER_URL)",
            pytrace=False,
        )
    pytest.skip(f"{problem}; start one with ./scripts/ensure_rabbitmq")
