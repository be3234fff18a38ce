"""Unit tests of the RabbitMQ transport that need no broker."""

from __future__ import annotations

import pytest

from broker_config.settings import Settings
from producer.transport.amqp import AmqpTransport
from schemas.errors import BrokerUnavailable, FedplanError


def test_an_unreachable_broker_raises_broker_unavailable_naming_the_address() -> None:
    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:1/", confirm_timeout=10)
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1"):
        AmqpTransport(on_reply=lambda _: None, settings=settings)


def test_the_password_never_appears_in_the_error() -> None:
    settings = Settings(broker_url="amqp://u:s3cret@127.0.0.1:1/", confirm_timeout=10)
    with pytest.raises(BrokerUnavailable) as err:
        AmqpTransport(on_reply=lambda _: None, settings=settings)
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://u:p@127.0.0.1:1/", "amqp://127.0.0.1:1/ "),
        ("amqp://u:p@127.0.0.1:1/fedplan-run", "amqp://127.0.0.1:1/fedplan-run "),
        ("amqp://u:p@127.0.0.1:1/a%2Fb", "amqp://127.0.0.1:1/a%2Fb "),
    ],
)
def test_the_broker_url_in_messages_keeps_the_slash_before_the_vhost(url: str, shown: str) -> None:
    with pytest.raises(BrokerUnavailable) as err:
        AmqpTransport(
            on_reply=lambda _: None, settings=Settings(broker_url=url, confirm_timeout=10)
        )
    assert shown in str(err.value)


def test_reply_limits_come_from_fedplan_variables_and_are_checked() -> None:
    env = {
        "FEDPLAN_MAX_REPLY_SIZE": str(64 * 1024 * 1024),
        "FEDPLAN_REPLY_TRANSFER_TTL": "30",
        "FEDPLAN_UNCLAIMED_REPLY_TTL": "3600",
        "FEDPLAN_JOURNAL_DIR": "/tmp/j",
        "FEDPLAN_TRUSTED_REPLY_USERS": "workers,ops",
    }
    s = Settings.from_env(env)
    assert (s.max_reply_size, s.reply_transfer_ttl, s.unclaimed_reply_ttl) == (
        64 * 1024 * 1024,
        30.0,
        3600.0,
    )
    assert str(s.journal_dir) == "/tmp/j"
    assert s.trusted_reply_users == "workers,ops"
    with pytest.raises(FedplanError, match="FEDPLAN_MAX_REPLY_SIZE"):
        Settings(max_reply_size=4096, max_message_size=8192)
    with pytest.raises(FedplanError, match="FEDPLAN_REPLY_TRANSFER_TTL"):
        Settings(reply_transfer_ttl=0)
