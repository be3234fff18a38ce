"""A full device queue still refuses commands after the producer's nack retries."""

from __future__ import annotations

import secrets

import pytest

from producer.transport.amqp import NACK_RETRIES, AmqpTransport
from schemas.errors import TransportError
from tests.integration.broker import Replies, RunVhost

pytestmark = pytest.mark.rabbitmq


def test_a_command_for_a_full_queue_is_refused_with_a_typed_error_after_the_retries(
    vhost: RunVhost, replies: Replies
) -> None:
    settings = vhost.settings.replace(
        producer_id=f"t{secrets.token_hex(4)}", queue_max_length=1
    )
    device = f"full{secrets.token_hex(3)}"
    transport = AmqpTransport(on_reply=replies.on_reply, settings=settings)
    try:
        transport.ensure_device(device)
        transport.publish(device, b"first", command_id="c1")  # no worker: it stays queued
        reconnects = transport.reconnects
        with pytest.raises(TransportError, match="probably full"):
            transport.publish(device, b"second", command_id="c2")
        assert transport.reconnects - reconnects == NACK_RETRIES
        vhost.wait_queue(f"fedplan.device.{device}", messages=1)
    finally:
        transport.close()
