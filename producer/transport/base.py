"""The transport interface: publish command bytes to a device, deliver reply bytes back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from schemas.tensor_codec import FramedParts

ReplyHandler = Callable[[bytes], None]
"""Called by the transport, from any thread, with each encoded ``Reply``.

A transport that knows which device the broker vouches sent a reply (the RabbitMQ transport
with least-privilege device users) also passes ``sender=<device id>``; give such a transport
a handler that takes it (``ReplyCollector.on_reply`` does) or one taking ``*args, **kwargs``.
"""


class Transport(Protocol):
    """Moves encoded ``Command``/``Reply`` protobufs; knows nothing of plans or tensors.

    The embedded transport (``local.py``) runs devices in threads in this process; the
    RabbitMQ transport (``amqp.py``, the only module that imports pika) publishes to
    per-device durable queues consumed by Celery workers. Both call ``on_reply`` (given at
    construction) for every reply.
    """

    def publish(self, device_id: str, command: bytes | FramedParts, *, command_id: str) -> None:
        """Hand one command to the device's queue; raise ``DeviceNotFound`` if it has none.

        ``command`` may be framed parts not yet joined (large tensors, see
        ``schemas.wire.encode_command_parts``)."""
        ...

    def ensure_device(self, device_id: str) -> None:
        """Make sure the device exists (embedded: start it; RabbitMQ: its queue is declared)."""
        ...

    def close(self) -> None: ...
