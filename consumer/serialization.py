"""The fedplan protobuf content type for kombu/Celery, and Celery task-message headers."""

from __future__ import annotations

import math
import os
import socket
from typing import Any

from kombu.serialization import register

from broker_config.names import TASK_NAME

SERIALIZER = "fedplan-protobuf"
CONTENT_TYPE = "application/x-fedplan-protobuf"
CONTENT_ENCODING = "binary"

# Headers of a message that carries one chunk of a larger command or reply.
TRANSFER_HEADER = "fedplan_transfer"
CHUNK_HEADER = "fedplan_chunk"
CHUNKS_HEADER = "fedplan_chunks"

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
    drops a message whose decoder raises; the task parses the protobuf exactly once.
    """
    try:
        if isinstance(data, str):
            raw = data.encode("latin-1", errors="replace")
        else:
            raw = data if isinstance(data, bytes) else bytes(data)
    except Exception:
        raw = b""
    return (raw,), {}, dict(_EMBED)


def register_content_type() -> None:
    """Register the fedplan serializer with kombu (idempotent)."""
    register(
        SERIALIZER, _encode, _decode, content_type=CONTENT_TYPE, content_encoding=CONTENT_ENCODING
    )


def task_headers(task_id: str, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Celery task message protocol v2 headers for one fedplan command message.

    Examples
    --------
    >>> h = task_headers("c1")
    >>> h["task"], h["id"], h["lang"]
    ('fedplan.handle', 'c1', 'py')
    """
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "(<fedplan command>,)",
        "kwargsrepr": "{}",
        "origin": f"{os.getpid()}@{socket.gethostname()}",
        "ignore_result": True,
    }
    if extra:
        headers.update(extra)
    return headers


def split_chunks(data: bytes, max_size: int) -> list[memoryview]:
    """``data`` cut into pieces of at most ``max_size`` bytes (one piece when it fits)."""
    view = memoryview(data)
    n = max(1, math.ceil(len(data) / max_size))
    return [view[i * max_size : (i + 1) * max_size] for i in range(n)]


def chunk_headers(transfer_id: str, index: int, count: int) -> dict[str, Any]:
    """The headers marking chunk ``index`` of ``count`` of one transfer."""
    return {TRANSFER_HEADER: transfer_id, CHUNK_HEADER: index, CHUNKS_HEADER: count}
