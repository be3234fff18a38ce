"""The Celery task-message envelope both transports speak: content type, headers, chunks.

Pure Python (no kombu, no pika): the pika transport on the producer and the Celery worker on
the device build and read the same envelope from here.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from typing import Any, Protocol

from broker_config.names import TASK_NAME

CONTENT_TYPE = "application/x-fedplan-protobuf"
CONTENT_ENCODING = "binary"

# Headers of a message that carries one chunk of a larger command or reply.
TRANSFER_HEADER = "fedplan_transfer"
CHUNK_HEADER = "fedplan_chunk"
CHUNKS_HEADER = "fedplan_chunks"


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
    """``data`` cut into pieces of at most ``max_size`` bytes (one piece when it fits).

    Examples
    --------
    >>> [bytes(p) for p in split_chunks(b"abcde", 2)]
    [b'ab', b'cd', b'e']
    """
    view = memoryview(data)
    n = max(1, math.ceil(len(data) / max_size))
    return [view[i * max_size : (i + 1) * max_size] for i in range(n)]


class Pieces(Protocol):
    """Data that cuts itself into message-sized ``bytes`` (``schemas.tensor_codec.FramedParts``)."""

    def __len__(self) -> int: ...

    def pieces(self, size: int) -> Iterator[bytes]: ...


def message_pieces(data: bytes | Pieces, max_size: int) -> tuple[int, Iterator[bytes]]:
    """How many messages ``data`` takes at ``max_size`` bytes each, and their bodies.

    Each body is copied once from ``data`` (the client libraries publish ``bytes``); a
    ``bytes`` that fits in one message is published as it is, and :class:`Pieces` (framed
    parts) are cut without joining them into one ``bytes`` first.

    Examples
    --------
    >>> count, bodies = message_pieces(b"abcde", 2)
    >>> count, list(bodies)
    (3, [b'ab', b'cd', b'e'])
    """
    count = max(1, math.ceil(len(data) / max_size))
    if isinstance(data, bytes):
        if count == 1:
            return 1, iter([data])
        return count, (bytes(v) for v in split_chunks(data, max_size))
    return count, data.pieces(max_size)


def chunk_headers(transfer_id: str, index: int, count: int) -> dict[str, Any]:
    """The headers marking chunk ``index`` of ``count`` of one transfer."""
    return {TRANSFER_HEADER: transfer_id, CHUNK_HEADER: index, CHUNKS_HEADER: count}
