"""Chunked commands on a device: bounded assembly on disk and expiry of incomplete transfers.

The gate has checked the chunk headers (integers, ``0 <= index < count <= max_chunks``);
here every chunk is checked against the assembled size, the bytes all incomplete transfers
hold together and their number before it is written, and transfers whose last chunk arrived
more than ``chunk_ttl`` seconds ago are deleted (at worker start and while chunks arrive).

Chunks are stored by the gate, in the worker's main process, as they are delivered
(:func:`spool_chunk`), and acked there once on disk; only the chunk that completes a
transfer goes on to the pool process, whose :func:`assemble` reads the whole command from
disk into one buffer. A 16 MiB chunk is thus never pickled through Celery's prefork pipe.

All chunks of one transfer come from one sender (the broker-validated ``user_id`` the gate
put in ``fedplan_sender``): the first chunk's sender is recorded with the transfer, a chunk
of the same transfer id from another sender is refused and changes nothing, and the command
assembled runs for that one sender.

Against the pool of incomplete transfers a chunk counts as at least ``MIN_CHUNK_BYTES``
(the gate's chunk count bound assumes chunks that big): a flood of one-byte chunks, each
opening a transfer of its own, would otherwise fill the disk with files and directories
while staying far below ``max_pending_chunk_bytes``, and make every later chunk slower (each
one scans what is pending).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from broker_config.envelope import CHUNK_HEADER, CHUNKS_HEADER, TRANSFER_HEADER
from broker_config.settings import Settings
from consumer.store.tensor_files import read_file_into
from consumer.worker.devices import SENDER_HEADER
from schemas.errors import FedplanError, MessageRefused
from schemas.tensor_codec import writable_buffer

log = logging.getLogger(__name__)

MIN_CHUNK_BYTES = 64 * 1024
"""Chunks of a transfer are this big at least (but the last): bounds the chunk count."""

GC_INTERVAL = 60.0
"""Seconds between two sweeps for expired transfers while chunks arrive."""

MAX_PENDING_TRANSFERS = 64
"""Incomplete transfers a device keeps at once; a chunk opening one more is refused."""

SENDER_FILE = ".sender"
"""In a transfer's folder: the sender of its first chunk; chunks from any other are refused."""

_last_sweep: dict[str, float] = {}


def max_chunks(settings: Settings) -> int:
    """The most chunks one transfer may have: the assembled size over the smallest chunk."""
    return max(1, math.ceil(settings.max_command_size / MIN_CHUNK_BYTES))


def chunks_dir(settings: Settings) -> Path:
    """Where a device keeps the chunks of incomplete transfers."""
    return Path(settings.data_dir) / "chunks"


def transfer_dir(settings: Settings, transfer: str, count: int) -> Path:
    """The folder of one transfer (its chunk count is part of the name: no mixing)."""
    key = hashlib.sha256(f"{transfer}\0{count}".encode()).hexdigest()
    return chunks_dir(settings) / key


def _sizes(folder: Path) -> dict[str, int]:
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return {}
    return {e.name: e.stat().st_size for e in entries if not e.name.startswith(".")}


def _charge(size: int) -> int:
    return max(size, MIN_CHUNK_BYTES)


def pending(settings: Settings) -> tuple[int, int]:
    """Incomplete transfers, and the bytes they are charged (see the module docstring)."""
    transfers = total = 0
    try:
        folders = list(os.scandir(chunks_dir(settings)))
    except FileNotFoundError:
        return 0, 0
    for folder in folders:
        if folder.is_dir():
            transfers += 1
            total += sum(_charge(n) for n in _sizes(Path(folder.path)).values())
    return transfers, total


def pending_bytes(settings: Settings) -> int:
    """Bytes all incomplete transfers are charged (each chunk at least ``MIN_CHUNK_BYTES``)."""
    return pending(settings)[1]


def collect_expired(settings: Settings, *, now: float | None = None) -> int:
    """Delete transfers with no chunk for ``chunk_ttl`` seconds; returns how many.

    Examples
    --------
    >>> import tempfile
    >>> collect_expired(Settings(data_dir=tempfile.mkdtemp()))
    0
    """
    now = time.time() if now is None else now
    _last_sweep[str(settings.data_dir)] = time.monotonic()
    removed = 0
    try:
        folders = list(os.scandir(chunks_dir(settings)))
    except FileNotFoundError:
        return 0
    for folder in folders:
        try:
            if folder.is_dir() and now - folder.stat().st_mtime > settings.chunk_ttl:
                shutil.rmtree(folder.path, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    if removed:
        log.warning(
            "deleted %d incomplete chunked transfers older than %gs", removed, settings.chunk_ttl
        )
    return removed


def _maybe_sweep(settings: Settings) -> None:
    last = _last_sweep.get(str(settings.data_dir))
    if last is None or time.monotonic() - last > GC_INTERVAL:
        collect_expired(settings)


def assemble(settings: Settings, request: Any, data: bytes) -> bytes | memoryview | None:
    """Store one chunk; the whole command once every chunk is there, else None.

    Raises :class:`~schemas.errors.MessageRefused` when the chunk would make the transfer
    larger than ``max_command_size``, the incomplete transfers together larger than
    ``max_pending_chunk_bytes`` or more than :data:`MAX_PENDING_TRANSFERS` (nothing is
    written then).
    """
    count = getattr(request, CHUNKS_HEADER, None)
    if not isinstance(count, int) or count <= 1:
        return data
    sizes = store_chunk(settings, request, data)
    if sizes is None:
        return None
    folder = transfer_dir(settings, str(getattr(request, TRANSFER_HEADER, "")), count)
    return _read_whole(folder, sizes)


def spool_chunk(settings: Settings, headers: dict[str, Any], data: bytes) -> bool:
    """In the worker's main process: store a chunk the gate admitted; True when more chunks
    of its transfer are still missing (the gate acks it then, the pool never sees it).

    The chunk that completes a transfer (and any unchunked message) returns False and goes
    to the pool process as before, where :func:`assemble` finds the other chunks on disk:
    only that one crosses the pool's pipe, not every byte of the transfer. A refused chunk
    raises like :func:`assemble` and its transfer is deleted (if it is the sender's).

    Examples
    --------
    >>> import tempfile
    >>> s = Settings(data_dir=tempfile.mkdtemp())
    >>> h = {"fedplan_transfer": "t", "fedplan_chunks": 2, "fedplan_sender": "guest"}
    >>> spool_chunk(s, {**h, "fedplan_chunk": 0}, b"a" * MIN_CHUNK_BYTES)
    True
    >>> spool_chunk(s, {**h, "fedplan_chunk": 1}, b"b")
    False
    """
    count = headers.get(CHUNKS_HEADER)
    if not isinstance(count, int) or count <= 1:
        return False
    request = SimpleNamespace(**headers)
    try:
        return store_chunk(settings, request, data) is None
    except FedplanError:
        done_with_chunks(settings, request)
        raise


def store_chunk(settings: Settings, request: Any, data: bytes) -> list[int] | None:
    """Write one chunk of a transfer (checked, see :func:`assemble`); the sizes of all its
    chunks once every chunk is there, else None."""
    count = int(getattr(request, CHUNKS_HEADER))
    transfer = str(getattr(request, TRANSFER_HEADER, ""))
    index = int(getattr(request, CHUNK_HEADER, 0))
    _maybe_sweep(settings)
    folder = transfer_dir(settings, transfer, count)
    sender = _sender_of(request)
    owner = _owner(folder)
    if owner is not None and owner != sender:
        raise MessageRefused(
            f"chunk {index} of transfer {transfer} comes from another sender than the "
            "transfer's first chunk; refused (the transfer is left as it was)"
        )
    sizes = _sizes(folder)
    if sizes.get(str(index)) == len(data) and len(sizes) == count:
        return [sizes[str(i)] for i in range(count)]  # the gate stored it a moment ago
    is_new = str(index) not in sizes
    sizes[str(index)] = len(data)
    if sum(sizes.values()) > settings.max_command_size:
        raise MessageRefused(
            f"transfer {transfer} grows past max_command_size ({settings.max_command_size} bytes)"
        )
    if is_new:
        transfers, charged = pending(settings)
        if len(sizes) == 1 and transfers >= MAX_PENDING_TRANSFERS:
            raise MessageRefused(
                f"the device holds {transfers} incomplete chunked transfers already (at most "
                f"{MAX_PENDING_TRANSFERS}); send again later"
            )
        if charged + _charge(len(data)) > settings.max_pending_chunk_bytes:
            raise MessageRefused(
                f"incomplete transfers hold max_pending_chunk_bytes "
                f"({settings.max_pending_chunk_bytes} bytes) already; send again later"
            )
    folder.mkdir(parents=True, exist_ok=True)
    if owner is None:
        (folder / SENDER_FILE).write_text(sender)
    tmp = folder / f".{index}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, folder / str(index))
    if len(sizes) < count:
        return None
    return [sizes[str(i)] for i in range(count)]


def _read_whole(folder: Path, sizes: list[int]) -> memoryview:
    """The chunk files read straight into one preallocated buffer (one copy, no join).

    The buffer is writable and not zero-filled first (:func:`writable_buffer`), so the
    framed tensors of the command decode into it without another copy
    (:func:`schemas.tensor_codec.tensor_from_proto`).
    """
    view = whole = writable_buffer(sum(sizes))
    offset = 0
    for i, size in enumerate(sizes):
        if read_file_into(folder / str(i), view[offset : offset + size]) != size:
            raise MessageRefused(f"chunk {i} of a transfer changed while it was read")
        offset += size
    return whole


def done_with_chunks(settings: Settings, request: Any) -> None:
    """Delete the chunks of the request's transfer (if it was one and is the sender's)."""
    count = getattr(request, CHUNKS_HEADER, None)
    transfer = getattr(request, TRANSFER_HEADER, None)
    if transfer is not None and isinstance(count, int):
        folder = transfer_dir(settings, str(transfer), count)
        owner = _owner(folder)
        if owner is None or owner == _sender_of(request):
            shutil.rmtree(folder, ignore_errors=True)


def _sender_of(request: Any) -> str:
    sender = getattr(request, SENDER_HEADER, None)
    return sender if isinstance(sender, str) else ""


def _owner(folder: Path) -> str | None:
    """The sender of a transfer's first chunk (None: no chunk yet)."""
    try:
        return (folder / SENDER_FILE).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
