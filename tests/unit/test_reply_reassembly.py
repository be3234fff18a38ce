"""Unit tests of reply checks before use: the sender rule and bounded chunk reassembly."""

from __future__ import annotations

from typing import Any

import pytest

from broker_config.envelope import CHUNK_HEADER, CHUNKS_HEADER, TRANSFER_HEADER
from producer.transport.reassembly import RejectedReply, ReplyAssembler, reply_sender
from schemas.errors import FedplanError

TRUSTED = frozenset({"guest"})


def _chunk(transfer: Any, index: Any, count: Any) -> dict[str, Any]:
    return {TRANSFER_HEADER: transfer, CHUNK_HEADER: index, CHUNKS_HEADER: count}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _assembler(clock: Clock | None = None, **kw: Any) -> ReplyAssembler:
    args: dict[str, Any] = {
        "max_reply_size": 100,
        "max_pending_bytes": 200,
        "max_transfers": 4,
        "ttl": 10.0,
    }
    args.update(kw)
    return ReplyAssembler(clock=clock or Clock(), **args)


def test_a_device_user_is_that_device_and_the_shared_user_is_trusted_without_a_device() -> None:
    assert reply_sender("fedplan-device-alice", TRUSTED).device_id == "alice"
    assert reply_sender("guest", TRUSTED).device_id is None


@pytest.mark.parametrize(
    "user_id", [None, "", "admin", "fedplan-device-", "fedplan-device-../x", b"guest", 7]
)
def test_a_reply_without_a_known_user_is_rejected(user_id: object) -> None:
    with pytest.raises(RejectedReply):
        reply_sender(user_id, TRUSTED)


def test_a_rejected_reply_is_a_typed_fedplan_error() -> None:
    assert issubclass(RejectedReply, FedplanError)
    assert RejectedReply.code == "DECODE_FAILED"


def test_chunks_in_any_order_are_joined_once_all_have_come() -> None:
    a = _assembler()
    assert a.add(_chunk("t", 2, 3), b"ef", sender="alice") is None
    assert a.add(_chunk("t", 0, 3), b"ab", sender="alice") is None
    assert a.add(_chunk("t", 0, 3), b"ab", sender="alice") is None  # a redelivery
    assert a.add(_chunk("t", 1, 3), b"cd", sender="alice") == b"abcdef"
    assert a.transfers == 0 and a.pending_bytes == 0


@pytest.mark.parametrize(
    "headers",
    [
        _chunk("t", "0", 2),
        _chunk("t", 0, "2"),
        _chunk("t", 0.0, 2),
        _chunk("t", True, 2),
        _chunk("t", None, 2),
        _chunk("t", -1, 2),
        _chunk("t", 2, 2),
        _chunk("t", 0, 0),
        _chunk("t", 0, 10**12),
        _chunk("", 0, 2),
        _chunk(None, 0, 2),
        _chunk("x" * 1000, 0, 2),
        {TRANSFER_HEADER: "t", CHUNK_HEADER: 0},
        {CHUNKS_HEADER: 2},
        "not a table",
    ],
)
def test_a_bad_chunk_header_is_rejected_and_nothing_is_kept(headers: Any) -> None:
    a = _assembler()
    with pytest.raises(RejectedReply):
        a.add(headers, b"ab", sender="alice")
    assert a.transfers == 0 and a.pending_bytes == 0


def test_a_message_over_the_reply_limit_is_rejected_before_it_is_stored() -> None:
    a = _assembler()
    with pytest.raises(RejectedReply):
        a.add({}, b"x" * 101, sender=None)
    a.add(_chunk("t", 0, 3), b"x" * 60, sender="alice")
    with pytest.raises(RejectedReply, match="over the reply limit"):
        a.add(_chunk("t", 1, 3), b"x" * 60, sender="alice")
    assert a.transfers == 0 and a.pending_bytes == 0


def test_a_transfer_that_changes_its_chunk_count_is_dropped() -> None:
    a = _assembler()
    a.add(_chunk("t", 0, 3), b"ab", sender="alice")
    with pytest.raises(RejectedReply, match="chunk count"):
        a.add(_chunk("t", 1, 2), b"cd", sender="alice")
    assert a.transfers == 0


def test_a_flood_of_never_completed_transfers_stays_within_its_bounds() -> None:
    a = _assembler()
    for i in range(1000):
        a.add(_chunk(f"t{i}", 0, 2), b"x" * 90, sender="mallory")
        assert a.transfers <= 4 and a.pending_bytes <= 200
    assert a.dropped >= 990
    assert a.add(_chunk("ok", 0, 2), b"ab", sender="alice") is None
    assert a.add(_chunk("ok", 1, 2), b"cd", sender="alice") == b"abcd"


def test_an_incomplete_transfer_expires_after_its_ttl() -> None:
    clock = Clock()
    a = _assembler(clock)
    a.add(_chunk("t", 0, 2), b"ab", sender="alice")
    clock.now = 5.0
    assert a.expire() == 0
    clock.now = 10.5
    assert a.expire() == 1
    assert a.transfers == 0 and a.pending_bytes == 0
    assert a.add(_chunk("t", 1, 2), b"cd", sender="alice") is None  # the start is gone


def test_one_sender_cannot_complete_or_spoil_another_senders_transfer() -> None:
    a = _assembler()
    a.add(_chunk("c1", 0, 2), b"ab", sender="alice")
    assert a.add(_chunk("c1", 1, 2), b"XX", sender="mallory") is None
    with pytest.raises(RejectedReply):
        a.add(_chunk("c1", 0, 5), b"XX", sender="mallory")
    assert a.add(_chunk("c1", 1, 2), b"cd", sender="alice") == b"abcd"


def test_a_chunk_delivered_again_after_it_was_joined_is_held_and_the_reply_stays_whole() -> None:
    a = _assembler(max_reply_size=100, max_pending_bytes=100)
    assert a.add(_chunk("t", 0, 3), b"ab", sender="alice", token=1) is None
    assert a.add(_chunk("t", 0, 3), b"ab", sender="alice", token=2) is None  # redelivered
    assert a.add(_chunk("t", 2, 3), b"e", sender="alice", token=3) is None
    assert bytes(a.add(_chunk("t", 1, 3), b"cd", sender="alice") or b"") == b"abcde"
    assert sorted(a.releasable()) == [1, 2, 3]


def test_a_joined_chunk_delivered_again_with_another_size_drops_the_transfer() -> None:
    a = _assembler(max_reply_size=100, max_pending_bytes=100)
    assert a.add(_chunk("t", 0, 2), b"ab", sender="alice") is None
    with pytest.raises(RejectedReply, match="changed a chunk's size"):
        a.add(_chunk("t", 0, 2), b"abc", sender="alice")
    assert a.transfers == 0 and a.pending_bytes == 0


def test_an_unchunked_reply_passes_through_unchanged() -> None:
    assert _assembler().add(None, b"whole", sender=None) == b"whole"
    assert _assembler().add({"other": 1}, b"whole", sender=None) == b"whole"


def test_tokens_of_an_incomplete_reply_are_held_until_it_is_whole() -> None:
    a = _assembler(max_held=8)
    assert a.add(_chunk("t", 0, 3), b"ab", sender="alice", token=1) is None
    assert a.add(_chunk("t", 2, 3), b"ef", sender="alice", token=2) is None
    assert a.releasable() == []
    assert a.add(_chunk("t", 1, 3), b"cd", sender="alice", token=3) == b"abcdef"
    assert sorted(a.releasable()) == [1, 2]  # token 3 is the caller's to ack
    assert a.releasable() == []


def test_tokens_of_a_dropped_or_expired_transfer_are_released() -> None:
    clock = Clock()
    a = _assembler(clock, max_held=8)
    a.add(_chunk("t", 0, 2), b"ab", sender="alice", token=1)
    with pytest.raises(RejectedReply):
        a.add(_chunk("t", 1, 5), b"cd", sender="alice", token=2)
    assert a.releasable() == [1]
    a.add(_chunk("u", 0, 2), b"ab", sender="alice", token=3)
    clock.now = 11.0
    a.expire()
    assert a.releasable() == [3]


def test_past_max_held_the_oldest_tokens_are_released_but_the_data_is_kept() -> None:
    a = _assembler(max_held=2)
    a.add(_chunk("t", 0, 2), b"ab", sender="alice", token=1)
    a.add(_chunk("u", 0, 2), b"ab", sender="alice", token=2)
    a.add(_chunk("v", 0, 2), b"ab", sender="alice", token=3)
    assert a.releasable() == [1]
    assert a.add(_chunk("t", 1, 2), b"cd", sender="alice", token=4) == b"abcd"
    a.add(_chunk("w", 0, 3), b"ab", sender="alice", token=5)  # 3 chunks can never be held
    assert a.releasable() == [5]


def test_forgotten_tokens_are_never_released() -> None:
    a = _assembler(max_held=8)
    a.add(_chunk("t", 0, 2), b"ab", sender="alice", token=1)
    a.forget_tokens()
    assert a.add(_chunk("t", 1, 2), b"cd", sender="alice", token=2) == b"abcd"
    assert a.releasable() == []


def test_one_byte_chunks_count_as_the_minimum_charge_so_a_flood_holds_few_pieces() -> None:
    """Before: pending bytes counted the byte only, so 2 GiB of pending room held 2**31
    one-byte pieces (~100 bytes of producer memory each)."""
    a = _assembler(max_reply_size=10**6, max_pending_bytes=64 * 1024, min_chunk_charge=4096)
    refused = 0
    for i in range(1000):
        try:
            assert a.add(_chunk("t", i, 10**6), b"x", sender="evil") is None
        except RejectedReply:
            refused += 1
    assert refused == 1000 - 16 and a.pending_bytes == 64 * 1024
    pieces = sum(len(t.parts) + t.joined for t in a._transfers.values())
    assert pieces == 16  # 64 KiB of room / 4 KiB a piece
    assert a.add(_chunk("u", 0, 2), b"a" * 5000, sender="alice") is None
    assert a.add(_chunk("u", 1, 2), b"b", sender="alice") == b"a" * 5000 + b"b"
    assert a.pending_bytes <= 64 * 1024
