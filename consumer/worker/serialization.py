"""The fedplan protobuf content type registered with kombu (the worker side of the envelope)."""

from __future__ import annotations

import logging
from typing import Any

from kombu.serialization import register

from broker_config.envelope import CONTENT_ENCODING, CONTENT_TYPE

log = logging.getLogger(__name__)

SERIALIZER = "fedplan-protobuf"

_EMBED: dict[str, Any] = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _encode(value: Any) -> bytes:
    """Celery-side encoder: bytes, or a ``((bytes,), {}, embed)`` task payload, as is."""
    if isinstance(value, tuple) and len(value) == 3 and len(value[0]) == 1:
        value = value[0][0]
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"the {SERIALIZER} serializer sends bytes only, not {type(value).__name__}")


def _decode(data: Any) -> tuple[tuple[bytes], dict[str, Any], dict[str, Any]]:
    """Wrap the body as the task's only argument; never parses and never raises.

    Celery decodes a task body twice (in the worker and in the pool process) and acks and
    drops a message whose decoder raises; the task parses the protobuf exactly once. A body
    that is not bytes-like becomes an empty command (answered with a decode error), and the
    log says so.
    """
    if isinstance(data, str):
        raw = data.encode("latin-1", errors="replace")
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:  # never bytes(int): that would allocate as many bytes as the int says
        log.warning("a %s body is not bytes; it is handled as empty", type(data).__name__)
        raw = b""
    return (raw,), {}, dict(_EMBED)


def register_content_type() -> None:
    """Register the fedplan serializer with kombu (idempotent)."""
    register(
        SERIALIZER, _encode, _decode, content_type=CONTENT_TYPE, content_encoding=CONTENT_ENCODING
    )
