"""The collector accepts a reply only from the command's device and keeps unclaimed replies."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.remote.collector import ReplyCollector
from producer.transport import journal as journal_module
from producer.transport.journal import Journal
from schemas.command_pb2 import ObjectInfo, Ok, Reply
from schemas.errors import ObjectNotFound, PlanGuardError, ReplyTimeout
from schemas.value_codec import value_to_proto
from schemas.wire import encode_reply, error_to_proto


def _value(command_id: str, result_id: str, value: object, device: str = "alice") -> bytes:
    info = ObjectInfo(id=result_id, kind="value", python_value=value_to_proto(value))
    return encode_reply(
        Reply(
            command_id=command_id, device_id=device, result_ids=[result_id], ok=Ok(objects=[info])
        )
    )


def _error(command_id: str, device: str = "alice") -> bytes:
    exc = PlanGuardError("guard failed at f.py:3", device_id=device)
    return encode_reply(
        Reply(command_id=command_id, device_id=device, error=error_to_proto(exc, device_id=device))
    )


def test_a_reply_claiming_another_device_is_refused_and_the_command_keeps_waiting() -> None:
    collector = ReplyCollector()
    pending = collector.expect("c1", device_id="alice", result_ids=("r1",))
    collector.on_reply(_value("c1", "r1", 666, device="bob"))
    assert not pending.done() and collector.refused == 1
    collector.on_reply(_value("c1", "r1", 7))
    assert pending.value("r1", timeout=1) == 7


def test_a_reply_from_another_device_user_is_refused_even_if_it_names_the_right_device() -> None:
    collector = ReplyCollector()
    pending = collector.expect("c1", device_id="alice", result_ids=("r1",))
    collector.on_reply(_value("c1", "r1", 666), sender="mallory")
    assert not pending.done()
    collector.on_reply(_value("c1", "r1", 7), sender="alice")
    assert pending.value("r1", timeout=1) == 7


def test_a_reply_that_comes_before_its_command_is_expected_is_kept_and_claimed() -> None:
    collector = ReplyCollector()
    collector.on_reply(_value("c1", "r1", 3))
    assert collector.expect("c1", device_id="alice", result_ids=("r1",)).value("r1", 0) == 3


def test_a_kept_reply_is_claimed_only_by_a_command_to_its_device() -> None:
    collector = ReplyCollector()
    collector.on_reply(_value("c1", "r1", 3), sender="mallory")
    pending = collector.expect("c1", device_id="alice", result_ids=("r1",))
    with pytest.raises(ReplyTimeout):
        pending.value("r1", timeout=0)


def test_unclaimed_replies_are_bounded_and_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("producer.remote.collector.MAX_UNCLAIMED", 3)
    collector = ReplyCollector()
    for i in range(10):
        collector.on_reply(_value(f"c{i}", f"r{i}", i))
    with pytest.raises(ReplyTimeout):
        collector.expect("c0", device_id="alice", result_ids=("r0",)).value("r0", 0)
    assert collector.expect("c9", device_id="alice", result_ids=("r9",)).value("r9", 0) == 9
    expired = ReplyCollector(unclaimed_ttl=1e-9)
    expired.on_reply(_value("a", "ra", 1))
    expired.on_reply(_value("b", "rb", 2))  # the older one expires on the next arrival
    with pytest.raises(ReplyTimeout):
        expired.expect("a", device_id="alice", result_ids=("ra",)).value("ra", 0)


def test_a_value_the_reply_does_not_carry_raises_object_not_found() -> None:
    collector = ReplyCollector()
    pending = collector.expect("c1", device_id="alice", result_ids=("r1",))
    info = ObjectInfo(id="r1", kind="tensor", dtype="float32", shape=[2])
    collector.on_reply(
        encode_reply(Reply(command_id="c1", device_id="alice", ok=Ok(objects=[info])))
    )
    with pytest.raises(ObjectNotFound):
        pending.value("r1", 0)


def test_a_new_collector_on_the_same_journal_recovers_what_was_in_flight(tmp_path: Path) -> None:
    first = ReplyCollector(journal=Journal(tmp_path / "p.sqlite3"))
    first.expect("c1", device_id="alice", result_ids=("r1",))
    first.expect("c2", device_id="alice", result_ids=("r2",))
    first.expect("c3", device_id="alice", result_ids=("r3",))
    for cid in ("c1", "c2", "c3"):
        first.published(cid)  # the broker confirmed them
    first.on_reply(_value("c3", "r3", 3))  # answered: leaves the journal
    first.on_reply(_value("lost", "rl", 9))  # nobody awaits it: kept in the journal
    assert first.journal is not None
    first.journal.close()  # as if killed: nothing else is cleaned up

    second = ReplyCollector(journal=Journal(tmp_path / "p.sqlite3"))
    recovered = second.recover()
    assert sorted(recovered) == ["c1", "c2"]
    assert second.for_result("r1").device_id == "alice"
    second.on_reply(_value("c1", "r1", 1))
    second.on_reply(_error("c2"))
    assert second.for_result("r1").value("r1", 1) == 1
    with pytest.raises(PlanGuardError):
        second.wait("c2", 1)
    assert second.expect("lost", device_id="alice", result_ids=("rl",)).value("rl", 0) == 9
    assert second.journal is not None
    assert second.journal.in_flight() == [] and second.journal.unclaimed(ttl=60) == []


def test_recovery_drops_journal_rows_older_than_the_results_queue(tmp_path: Path) -> None:
    j = Journal(tmp_path / "p.sqlite3")
    j.record("old", "alice", ())
    collector = ReplyCollector(journal=j)
    assert collector.recover(in_flight_ttl=1e-9) == {}
    assert j.in_flight() == []


def test_the_journal_keeps_at_most_max_unclaimed_replies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "MAX_UNCLAIMED", 2)
    j = Journal(tmp_path / "p.sqlite3")
    for i in range(5):
        j.keep(f"c{i}", None, b"x")
    assert len(j.unclaimed(ttl=60)) == 2


def test_unclaimed_replies_are_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    big = _value("c0", "r0", "x" * 500)
    monkeypatch.setattr("producer.remote.collector.MAX_UNCLAIMED_BYTES", 2 * len(big) + 10)
    collector = ReplyCollector()
    for i in range(5):
        collector.on_reply(_value(f"c{i}", f"r{i}", "x" * 500))
    with pytest.raises(ReplyTimeout):
        collector.expect("c2", device_id="alice", result_ids=("r2",)).value("r2", 0)
    assert collector.expect("c4", device_id="alice", result_ids=("r4",)).value("r4", 0)
    collector.on_reply(_value("huge", "rh", "x" * 5000))  # larger than the bound: not kept
    with pytest.raises(ReplyTimeout):
        collector.expect("huge", device_id="alice", result_ids=("rh",)).value("rh", 0)


def test_the_journal_keeps_at_most_max_unclaimed_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "MAX_UNCLAIMED_BYTES", 250)
    j = Journal(tmp_path / "p.sqlite3")
    for i in range(5):
        j.keep(f"c{i}", None, b"x" * 100)
    assert [u.command_id for u in j.unclaimed(ttl=60)] == ["c3", "c4"]
