"""Tests of the reply collector (futures keyed by command id and result id)."""

from __future__ import annotations

import threading

import pytest

from producer.remote.collector import ReplyCollector
from schemas.command_pb2 import ObjectInfo, Ok, Reply
from schemas.errors import (
    FedplanError,
    ObjectNotFound,
    PlanGuardError,
    ReplyTimeout,
    TransportError,
)
from schemas.wire import encode_reply, error_to_proto


def _ok(command_id: str, *result_ids: str) -> bytes:
    objects = [ObjectInfo(id=r, kind="tensor", dtype="float32", shape=[2]) for r in result_ids]
    return encode_reply(
        Reply(
            command_id=command_id,
            device_id="d1",
            result_ids=list(result_ids),
            ok=Ok(objects=objects),
        )
    )


def _error(command_id: str, exc: Exception, *result_ids: str) -> bytes:
    return encode_reply(
        Reply(
            command_id=command_id,
            device_id="d1",
            result_ids=list(result_ids),
            error=error_to_proto(exc, device_id="d1"),
        )
    )


def test_a_reply_resolves_the_command_and_its_result_ids() -> None:
    collector = ReplyCollector()
    pending = collector.expect("c1", device_id="d1", result_ids=("r1", "r2"))
    collector.on_reply(_ok("c1", "r1", "r2"))
    assert collector.wait("c1", timeout=1).command_id == "c1"
    assert list(collector.wait_result("r2", timeout=1).shape) == [2]
    assert pending.done()
    assert collector.in_flight == 0


def test_a_reply_from_another_thread_wakes_the_waiter() -> None:
    collector = ReplyCollector()
    collector.expect("c1", device_id="d1", result_ids=("r1",))
    threading.Timer(0.05, collector.on_reply, args=(_ok("c1", "r1"),)).start()
    assert collector.wait_result("r1", timeout=5).id == "r1"


def test_an_error_reply_raises_the_typed_error_for_every_result_id() -> None:
    collector = ReplyCollector()
    collector.expect("c1", device_id="d1", result_ids=("r1", "r2"))
    collector.on_reply(_error("c1", PlanGuardError("guard failed at f.py:3", op_index=4)))
    for result_id in ("r1", "r2"):
        with pytest.raises(PlanGuardError) as info:
            collector.wait_result(result_id, timeout=1)
        assert (info.value.device_id, info.value.op_index) == ("d1", 4)


def test_waiting_too_long_raises_a_reply_timeout_naming_device_and_command() -> None:
    collector = ReplyCollector()
    collector.expect("c7", device_id="device_9")
    with pytest.raises(ReplyTimeout, match=r"device_9.*c7") as err:
        collector.wait("c7", timeout=0.01)
    assert isinstance(err.value, TimeoutError) and isinstance(err.value, FedplanError)


def test_garbage_is_dropped_and_a_reply_to_an_unknown_command_awaits_no_one() -> None:
    collector = ReplyCollector()
    collector.on_reply(_ok("never-sent", "r"))
    collector.on_reply(b"\x00garbage")
    with pytest.raises(ObjectNotFound):
        collector.wait("never-sent", timeout=0)


def test_a_result_id_missing_from_the_reply_raises_object_not_found() -> None:
    collector = ReplyCollector()
    collector.expect("c1", device_id="d1", result_ids=("r1", "r2"))
    collector.on_reply(_ok("c1", "r1"))
    with pytest.raises(ObjectNotFound):
        collector.wait_result("r2", timeout=1)


def test_fail_all_fails_every_command_still_waiting() -> None:
    collector = ReplyCollector()
    collector.expect("c1", device_id="d1")
    collector.expect("c2", device_id="d2")
    collector.fail_all(TransportError("closed"))
    for command_id in ("c1", "c2"):
        with pytest.raises(TransportError):
            collector.wait(command_id, timeout=1)


def test_a_command_that_could_not_be_published_fails_with_that_error() -> None:
    collector = ReplyCollector()
    pending = collector.expect("c1", device_id="d1")
    collector.forget("c1", TransportError("broker down"))
    with pytest.raises(TransportError, match="broker down"):
        pending.reply(timeout=1)


def test_a_released_command_is_no_longer_findable_but_its_holder_keeps_the_reply() -> None:
    collector = ReplyCollector()
    pending = collector.expect("c1", device_id="d1", result_ids=("r1",))
    collector.on_reply(_ok("c1", "r1"))
    collector.release("c1")
    with pytest.raises(ObjectNotFound):
        collector.wait("c1", timeout=0)
    with pytest.raises(ObjectNotFound):
        collector.wait_result("r1", timeout=0)
    assert pending.object_info("r1", timeout=0).id == "r1"


def test_only_the_most_recent_resolved_commands_are_kept() -> None:
    collector = ReplyCollector(keep=2)
    for i in range(3):
        collector.expect(f"c{i}", device_id="d1", result_ids=(f"r{i}",))
        collector.on_reply(_ok(f"c{i}", f"r{i}"))
    with pytest.raises(ObjectNotFound):
        collector.wait_result("r0", timeout=0)
    assert collector.wait_result("r2", timeout=0).id == "r2"
