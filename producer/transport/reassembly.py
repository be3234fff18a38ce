"""Reply messages from the broker, checked before use: sender, chunk headers, bounded memory.

A reply message is untrusted input: any holder of a device user may publish into the results
exchange. :func:`reply_sender` says who the broker vouches for (the AMQP ``user_id``
property, which RabbitMQ checks against the connection's user) and :class:`ReplyAssembler`
joins chunked replies without letting a message grow memory beyond stated bounds:

- every chunk header is validated (types, ranges, a consistent count) before use;
- one reply is at most ``max_reply_size`` bytes, checked before anything is stored;
- incomplete transfers hold at most ``max_pending_bytes`` and ``max_transfers`` in total
  (the oldest transfer is dropped to make room) and expire after ``ttl`` seconds without a
  new chunk; a chunk counts as at least ``min_chunk_charge`` bytes there (the transport
  uses :data:`MIN_CHUNK_CHARGE`: devices cut replies in pieces at least that big), so a
  flood of one-byte chunks cannot make the producer hold millions of pieces, each costing
  far more memory than its byte;
- transfers are keyed by sender and transfer id, so one device cannot complete or spoil
  another's transfer;
- each chunk can come with a ``token`` (the transport's delivery tag): tokens of an
  incomplete transfer are held (the transport does not ack those messages, so a killed
  producer gets them again) and become :meth:`ReplyAssembler.releasable` once the transfer
  completes or is dropped. At most ``max_held`` tokens are held: past that the oldest
  transfer's tokens are released early (its data is kept, only crash safety is lost), so the
  broker's prefetch window never fills with held messages.

A rejected message raises :class:`RejectedReply`; the transport acks it and goes on.

Example
-------
>>> a = ReplyAssembler(max_reply_size=10, max_pending_bytes=10, max_transfers=2, ttl=60)
>>> a.add({}, b"whole", sender=None)
b'whole'
>>> h = {"fedplan_transfer": "t", "fedplan_chunks": 2}
>>> a.add({**h, "fedplan_chunk": 1}, b"cd", sender="alice") is None
True
>>> bytes(a.add({**h, "fedplan_chunk": 0}, b"ab", sender="alice"))
b'abcd'
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker_config import names
from broker_config.envelope import CHUNK_HEADER, CHUNKS_HEADER, TRANSFER_HEADER
from schemas.errors import WireError

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # as names.check_id

MAX_TRANSFER_ID = 256
"""Longest transfer id accepted (a command id is 32 hex characters)."""

MIN_CHUNK_CHARGE = 4096
"""What a chunk counts as at least against ``max_pending_bytes`` in the transport (the
smallest ``max_message_size`` a device may cut replies at)."""


class RejectedReply(WireError):
    """A reply message that is malformed, too large, or from a sender not allowed to reply."""


@dataclass(frozen=True, slots=True)
class Sender:
    """Who the broker vouches sent a reply: a device user, or a trusted (shared) user."""

    user: str
    device_id: str | None
    """The device of a ``fedplan-device-<id>`` user; None for the trusted shared user."""


def reply_sender(user_id: object, trusted_users: frozenset[str]) -> Sender:
    """The sender of a reply from its broker-validated ``user_id`` property.

    A ``fedplan-device-<id>`` user is device ``<id>`` (least privilege: it can only answer
    commands sent to ``<id>``). A user in ``trusted_users`` (the producer's own broker user,
    e.g. ``guest`` when everything shares it) is trusted but names no device: with a shared
    user the broker cannot tell devices apart, so only the reply's own device id is checked.
    Anything else, including no ``user_id`` at all, is rejected: RabbitMQ validates the
    property only when it is set, so a device user could otherwise leave it out.

    Examples
    --------
    >>> reply_sender("fedplan-device-alice", frozenset({"guest"})).device_id
    'alice'
    >>> reply_sender("guest", frozenset({"guest"})).device_id is None
    True
    """
    if not isinstance(user_id, str) or not user_id:
        raise RejectedReply("a reply without a user_id property is not accepted")
    if user_id in trusted_users:
        return Sender(user_id, None)
    prefix = names.device_user("x")[:-1]
    device = user_id[len(prefix) :] if user_id.startswith(prefix) else ""
    if device and _DEVICE_ID.match(device) and names.device_user(device) == user_id:
        return Sender(user_id, device)
    raise RejectedReply(f"a reply from broker user {user_id[:80]!r} is not accepted")


@dataclass(slots=True)
class _Transfer:
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)
    """Chunks that arrived ahead of the ones before them."""
    head: bytearray = field(default_factory=bytearray)
    """Chunks 0 .. ``joined - 1``, joined as they come in order (no second copy at the end:
    growing a large ``bytearray`` remaps its pages rather than copying them)."""
    joined: int = 0
    chunk_sizes: list[int] = field(default_factory=list)
    size: int = 0
    charged: int = 0
    touched: float = 0.0
    tokens: list[int] = field(default_factory=list)


def _int_header(headers: Mapping[str, Any], name: str) -> int:
    value = headers.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RejectedReply(f"chunk header {name} is {type(value).__name__}, not an integer")
    return value


class ReplyAssembler:
    """Joins chunked replies within bounds; see the module docstring. Not thread-safe."""

    def __init__(
        self,
        *,
        max_reply_size: int,
        max_pending_bytes: int,
        max_transfers: int,
        ttl: float,
        max_held: int = 0,
        min_chunk_charge: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_reply_size = max_reply_size
        self.max_pending_bytes = max_pending_bytes
        self.max_transfers = max_transfers
        self.ttl = ttl
        self._clock = clock
        self._transfers: OrderedDict[tuple[str, str], _Transfer] = OrderedDict()
        self.pending_bytes = 0
        self.dropped = 0
        """Incomplete transfers dropped (expired or evicted) so far."""
        self.max_held = max_held
        self.min_chunk_charge = min_chunk_charge
        self._held = 0
        self._releasable: list[int] = []

    def releasable(self) -> list[int]:
        """Tokens no longer held (their transfer completed, was dropped, or held too many);
        each is returned once."""
        out, self._releasable = self._releasable, []
        return out

    def forget_tokens(self) -> None:
        """Drop every token without releasing it (the channel they belong to is gone; the
        broker delivers those messages again)."""
        for transfer in self._transfers.values():
            transfer.tokens.clear()
        self._held = 0
        self._releasable.clear()

    @property
    def transfers(self) -> int:
        """How many incomplete transfers are held."""
        return len(self._transfers)

    def add(
        self, headers: object, body: bytes, *, sender: str | None, token: int | None = None
    ) -> bytes | memoryview | None:
        """The whole reply once complete (``body`` itself for an unchunked one), else None.

        Raises :class:`RejectedReply` for a message that is malformed or over a bound;
        nothing of it is kept then. ``token`` is held while the reply is incomplete, and
        released (see :meth:`releasable`) with the rest of the transfer's; the token of a
        message that is not held (complete, rejected) is the caller's to release.
        """
        self.expire()
        if headers is None:
            headers = {}
        if not isinstance(headers, Mapping):
            raise RejectedReply("reply headers are not a table")
        if len(body) > self.max_reply_size:
            raise RejectedReply(f"a reply message of {len(body)} bytes is over the limit")
        chunked = [h in headers for h in (TRANSFER_HEADER, CHUNK_HEADER, CHUNKS_HEADER)]
        if not any(chunked):
            return body
        if not all(chunked):
            raise RejectedReply("a chunk without all three chunk headers")
        transfer_id = headers[TRANSFER_HEADER]
        if isinstance(transfer_id, bytes):
            transfer_id = transfer_id.decode("utf-8", "replace")
        if not isinstance(transfer_id, str) or not 0 < len(transfer_id) <= MAX_TRANSFER_ID:
            raise RejectedReply("chunk header fedplan_transfer is not a short string")
        count = _int_header(headers, CHUNKS_HEADER)
        index = _int_header(headers, CHUNK_HEADER)
        if count < 1 or count > self.max_reply_size:
            raise RejectedReply(f"chunk count {count} is out of range")
        if not 0 <= index < count:
            raise RejectedReply(f"chunk index {index} is not within 0..{count - 1}")
        if count == 1:
            return body
        key = (sender or "", transfer_id)
        transfer = self._transfers.get(key)
        if transfer is None:
            transfer = _Transfer(count)
        elif transfer.count != count:
            self._drop(key)
            raise RejectedReply(f"transfer {transfer_id[:40]!r} changed its chunk count")
        if index < transfer.joined:  # again (a redelivery): its first copy is joined already
            if len(body) != transfer.chunk_sizes[index]:
                self._drop(key)
                raise RejectedReply(f"transfer {transfer_id[:40]!r} changed a chunk's size")
            if token is not None:
                self._hold(transfer, token)
            return None
        previous = transfer.parts.get(index)
        old = len(previous) if previous is not None else 0
        grown = transfer.size - old + len(body)
        if grown > self.max_reply_size:
            self._drop(key)
            raise RejectedReply(f"transfer {transfer_id[:40]!r} grows over the reply limit")
        old_charge = self._charge(previous)
        charge = self._charge(body)
        if key not in self._transfers:
            self._make_room(charge)
            self._transfers[key] = transfer
        else:
            self._make_room(charge - old_charge, keep=key)
        transfer.parts[index] = body
        transfer.size = grown
        while transfer.joined in transfer.parts:  # join the chunks that are now in order
            part = transfer.parts.pop(transfer.joined)
            transfer.head += part
            transfer.chunk_sizes.append(len(part))
            transfer.joined += 1
        transfer.charged += charge - old_charge
        transfer.touched = self._clock()
        self._transfers.move_to_end(key)
        self.pending_bytes += charge - old_charge
        if transfer.joined < count:
            if token is not None:
                self._hold(transfer, token)
            return None
        self._drop(key, counted=False)
        # Joined in order as the chunks came (one copy each, into a writable buffer: tensor
        # frames then decode without another copy); no second copy of the whole.
        return memoryview(transfer.head)

    def _charge(self, part: bytes | None) -> int:
        return 0 if part is None else max(len(part), self.min_chunk_charge)

    def _hold(self, transfer: _Transfer, token: int) -> None:
        if transfer.count > self.max_held:  # it could never be held whole
            self._releasable.append(token)
            return
        transfer.tokens.append(token)
        self._held += 1
        for other in list(self._transfers.values()):
            if self._held <= self.max_held:
                break
            if other is not transfer:
                self._release(other)
        if self._held > self.max_held:
            self._release(transfer)

    def _release(self, transfer: _Transfer) -> None:
        self._releasable.extend(transfer.tokens)
        self._held -= len(transfer.tokens)
        transfer.tokens.clear()

    def expire(self) -> int:
        """Drop transfers that got no chunk for ``ttl`` seconds; returns how many."""
        limit = self._clock() - self.ttl
        old = [k for k, t in self._transfers.items() if t.touched < limit]
        for key in old:
            self._drop(key)
        return len(old)

    def _make_room(self, size: int, keep: tuple[str, str] | None = None) -> None:
        while self._transfers and (
            self.pending_bytes + size > self.max_pending_bytes
            or (keep is None and len(self._transfers) >= self.max_transfers)
        ):
            oldest = next(iter(self._transfers))
            if oldest == keep:
                if len(self._transfers) == 1:
                    break
                self._transfers.move_to_end(oldest)
                continue
            self._drop(oldest)
        if self.pending_bytes + size > self.max_pending_bytes:
            raise RejectedReply("no room for this chunk among incomplete transfers")

    def _drop(self, key: tuple[str, str], *, counted: bool = True) -> None:
        transfer = self._transfers.pop(key, None)
        if transfer is not None:
            self.pending_bytes -= transfer.charged
            self.dropped += counted
            self._release(transfer)
