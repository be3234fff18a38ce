"""A dead-letter queue declared by an older fedplan (no bounds) does not stop a producer."""

from __future__ import annotations

import logging
import secrets

import pytest

from broker_config import names
from producer.transport.amqp import AmqpTransport
from tests.integration.broker import Replies, RunVhost

pytestmark = pytest.mark.rabbitmq


def test_a_producer_uses_an_unbounded_dead_letter_queue_left_by_an_older_version(
    vhost: RunVhost, replies: Replies, caplog: pytest.LogCaptureFixture
) -> None:
    own = RunVhost(secrets.token_hex(4)).create()
    try:
        dead = names.dead_letter_queue()
        own.client.request(
            "PUT",
            f"queues/{own.client.vq()}/{own.client.q(dead)}",
            {"durable": True, "auto_delete": False, "arguments": {}},
        )
        settings = own.settings.replace(producer_id=f"t{secrets.token_hex(4)}")
        with caplog.at_level(logging.WARNING, logger="producer.transport.amqp"):
            transport = AmqpTransport(on_reply=replies.on_reply, settings=settings)
            try:
                device = f"d{secrets.token_hex(3)}"
                transport.ensure_device(device)
                transport.publish(device, b"queued", command_id="c1")
                own.wait_queue(f"fedplan.device.{device}", messages=1)
                assert transport.reconnects == 0
            finally:
                transport.close()
        assert any("exists with other arguments" in r.getMessage() for r in caplog.records)
        assert own.queue(dead)["arguments"] == {}
    finally:
        own.delete()
