"""Unit tests of the RabbitMQ transport that need no broker."""

from __future__ import annotations

import pytest

from broker_config.settings import Settings
from producer.transport.amqp import AmqpTransport
from schemas.errors import BrokerUnavailable


def test_an_unreachable_broker_raises_broker_unavailable_naming_the_address() -> None:
    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:1/", confirm_timeout=10)
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1"):
        AmqpTransport(on_reply=lambda _: None, settings=settings)


def test_the_password_never_appears_in_the_error() -> None:
    settings = Settings(broker_url="amqp://u:s3cret@127.0.0.1:1/", confirm_timeout=10)
    with pytest.raises(BrokerUnavailable) as err:
        AmqpTransport(on_reply=lambda _: None, settings=settings)
    assert "s3cret" not in str(err.value)
