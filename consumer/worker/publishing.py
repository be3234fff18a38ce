"""Publishing from a worker (replies, forwarded commands) with publisher confirms.

Used by the task in the pool process and by the gate and the time-limit handler in the
worker's main process; each process keeps its own connection.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from kombu import Connection, Producer

from broker_config import names
from broker_config.envelope import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    Pieces,
    chunk_headers,
    message_pieces,
)
from broker_config.settings import Settings
from consumer.runtime.replies import encode_safely, error_reply
from schemas.errors import FedplanError

log = logging.getLogger(__name__)

_producers: dict[int, Producer] = {}

# A main-process publish must not stall the worker's event loop for long.
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 1, "interval_max": 2}


def confirming_producer(settings: Settings) -> Producer:
    """This process's producer, on a connection in publisher-confirm mode.

    Only replies (and forwarded commands) wait for confirms; Celery's own event messages
    keep the worker's connection without them.
    """
    producer = _producers.get(os.getpid())
    if producer is None:
        conn = Connection(
            settings.broker_url,
            heartbeat=0,  # nobody would send them between tasks; TCP keepalive instead
            transport_options={"confirm_publish": True},
        )
        producer = Producer(conn, auto_declare=False)
        _producers.clear()  # a forked child never uses its parent's connection
        _producers[os.getpid()] = producer
    return producer


def forget_connection() -> None:
    """Drop this process's publishing connection (after a failure): the next publish
    connects again, to the next node of a cluster if this one is gone."""
    producer = _producers.pop(os.getpid(), None)
    if producer is not None:
        try:
            producer.connection.release()
        except Exception:
            log.debug("closing a failed publishing connection failed", exc_info=True)


def publish(
    settings: Settings,
    body: bytes | Pieces,
    *,
    exchange: str,
    routing_key: str,
    headers: dict[str, Any],
    correlation_id: str,
    reply_to: str | None = None,
) -> None:
    """Publish (chunked above the message size); returns once the broker took every piece."""
    producer = confirming_producer(settings)
    count, pieces = message_pieces(body, settings.max_message_size)
    for i, piece in enumerate(pieces):
        extra = chunk_headers(correlation_id, i, count) if count > 1 else {}
        producer.publish(
            piece,
            exchange=exchange,
            routing_key=routing_key,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            headers={**headers, **extra},
            correlation_id=correlation_id,
            reply_to=reply_to,
            user_id=producer.connection.userid,
            delivery_mode=2,
            retry=True,
            retry_policy=_RETRY_POLICY,
            declare=[],
        )


def publish_reply(
    settings: Settings, reply: bytes | Pieces, *, reply_to: str, command_id: str
) -> None:
    """Publish an encoded ``Reply`` (or its framed parts) to the results exchange under
    ``reply_to``."""
    publish(
        settings,
        reply,
        exchange=names.results_exchange(),
        routing_key=reply_to,
        headers={},
        correlation_id=command_id,
    )


def send_error(
    settings: Settings,
    device_id: str,
    exc: FedplanError,
    *,
    reply_to: str | None,
    command_id: str | None,
) -> bool:
    """Best effort: publish a typed error reply for ``command_id``; never raises.

    Returns whether a reply was published (there is no reply address without both
    ``reply_to`` and ``command_id``).

    Examples
    --------
    >>> from schemas.errors import MessageRefused
    >>> send_error(Settings(), "d1", MessageRefused("no"), reply_to=None, command_id="c1")
    False
    """
    if not reply_to or not command_id:
        return False
    try:
        reply = encode_safely(error_reply(device_id, command_id, [], exc))
        publish_reply(settings, reply, reply_to=reply_to, command_id=command_id)
        return True
    except Exception:
        log.exception("publishing the error reply to %s failed", command_id)
        forget_connection()
        return False
