"""Message properties a worker can always decode, so the gate gets to judge every delivery.

py-amqp (the transport under kombu and Celery) decodes a delivery's properties before any
consumer code runs, and it raises on input RabbitMQ passes through untouched: a short
string property that is not UTF-8 (``correlation_id=b"\\xff"``), a header timestamp past
the year 9999, a field type it does not know. The exception leaves the worker's event loop
and Celery stops with "Unrecoverable error"; the message is delivered again to the next
worker, which dies the same way: one message takes the device down for good.

:func:`install` replaces py-amqp's decoder of basic properties with :func:`decode_properties`:
py-amqp's own decoder first, and when it raises, a lenient one that keeps the frame's layout
(undecodable strings stay ``bytes``, an undecodable header table is skipped by its length)
and marks the headers with :data:`UNDECODABLE` and the reason. The gate refuses such a
message to the dead-letter queue like any other bad one.
"""

from __future__ import annotations

import logging
from struct import unpack_from
from typing import Any

from amqp import serialization
from amqp.spec import Basic

log = logging.getLogger(__name__)

UNDECODABLE = "x-fedplan-undecodable"
"""Header the lenient decoder sets (to the reason) on a message py-amqp could not decode."""

# Basic's properties in wire order: flag bit, name, kind (s: shortstr, o: octet,
# Q: 64-bit timestamp, F: table).
_FIELDS = (
    (0x8000, "content_type", "s"),
    (0x4000, "content_encoding", "s"),
    (0x2000, "application_headers", "F"),
    (0x1000, "delivery_mode", "o"),
    (0x0800, "priority", "o"),
    (0x0400, "correlation_id", "s"),
    (0x0200, "reply_to", "s"),
    (0x0100, "expiration", "s"),
    (0x0080, "message_id", "s"),
    (0x0040, "timestamp", "Q"),
    (0x0020, "type", "s"),
    (0x0010, "user_id", "s"),
    (0x0008, "app_id", "s"),
    (0x0004, "cluster_id", "s"),
)

_original = serialization.PROPERTY_CLASSES[Basic.CLASS_ID]


def decode_properties(buf: Any, offset: int) -> tuple[dict[str, Any], int]:
    """py-amqp's decoder of basic properties, made total (see the module docstring).

    Examples
    --------
    >>> frame = bytes([0x04, 0x00, 2, 0xFF, 0xFE])  # correlation_id = b"\\xff\\xfe"
    >>> props, end = decode_properties(frame, 0)
    >>> props["correlation_id"], end
    (b'\\xff\\xfe', 5)
    >>> props["application_headers"][UNDECODABLE]
    'property correlation_id is not UTF-8'
    """
    try:
        return _original(buf, offset)
    except Exception as exc:
        try:
            return _lenient(buf, offset)
        except Exception:  # a truncated frame: nothing of it can be trusted
            why = f"message properties could not be decoded ({type(exc).__name__})"
            return {"application_headers": {UNDECODABLE: why}}, len(buf)


def _lenient(buf: Any, offset: int) -> tuple[dict[str, Any], int]:
    props: dict[str, Any] = {}
    problems: list[str] = []
    (flags,) = unpack_from(">H", buf, offset)
    offset += 2
    for bit, name, kind in _FIELDS:
        if not flags & bit:
            continue
        if kind == "s":
            (n,) = unpack_from(">B", buf, offset)
            raw = bytes(buf[offset + 1 : offset + 1 + n])
            offset += 1 + n
            try:
                props[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                props[name] = raw
                problems.append(f"property {name} is not UTF-8")
        elif kind == "o":
            (props[name],) = unpack_from(">B", buf, offset)
            offset += 1
        elif kind == "Q":
            (props[name],) = unpack_from(">Q", buf, offset)
            offset += 8
        else:
            (size,) = unpack_from(">I", buf, offset)
            try:
                (table,), _ = serialization.loads("F", buf, offset)
            except Exception as exc:
                table = {}
                problems.append(f"the headers could not be decoded ({type(exc).__name__})")
            offset += 4 + size
            props[name] = table if isinstance(table, dict) else {}
    if offset > len(buf):
        raise ValueError("a truncated frame")
    headers = props.setdefault("application_headers", {})
    headers[UNDECODABLE] = "; ".join(problems) or "py-amqp could not decode the properties"
    log.warning("a delivery with undecodable properties: %s", headers[UNDECODABLE])
    return props, offset


def install() -> None:
    """Make this process's py-amqp decode every delivery's properties (idempotent)."""
    serialization.PROPERTY_CLASSES[Basic.CLASS_ID] = decode_properties
