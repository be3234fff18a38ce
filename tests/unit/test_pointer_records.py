"""Pointer records on a device (consumer/runtime/pointer_records.py) and how it serves them."""

from __future__ import annotations

from typing import Any

import torch

from consumer.runtime.device import DeviceRuntime
from consumer.runtime.pointer_records import PointerRecords
from consumer.store.memory import MemoryStore
from schemas import command_pb2 as cmd
from schemas.ir import ObjectId
from schemas.plan_pb2 import ValueList
from schemas.tensor_codec import tensor_from_proto, tensor_to_proto
from schemas.value_codec import value_to_proto
from schemas.wire import decode_command, decode_reply, encode_command, new_id


def _send(runtime: DeviceRuntime, body: str, msg: Any) -> cmd.Reply:
    command = cmd.Command(command_id=new_id(), device_id=runtime.device_id)
    getattr(command, body).CopyFrom(msg)
    return decode_reply(runtime.handle(encode_command(command)))


def _record(object_id: str = "p", *tags: str) -> cmd.StorePointer:
    return cmd.StorePointer(
        id=object_id, location="bob", remote_id="x", tags=list(tags), dtype="float32", shape=[3]
    )


def test_records_are_found_by_every_tag_and_removed_by_pop() -> None:
    records = PointerRecords()
    records.put(_record("p", "a", "b"))
    records.put(_record("q", "a"))
    assert [r.id for r in records.search(["a", "b"])] == ["p"]
    assert [r.id for r in records.search([])] == ["p", "q"]
    assert records.pop("p") is not None and records.get("p") is None
    records.clear()
    assert records.search([]) == []


def test_a_stored_pointer_is_listed_with_its_target_and_fetched_as_a_pointer() -> None:
    runtime = DeviceRuntime(device_id="alice", store=MemoryStore())
    reply = _send(runtime, "store_pointer", _record("p", "t"))
    assert list(reply.result_ids) == ["p"]
    [info] = _send(runtime, "search", cmd.Search(tags=["t"])).ok.objects
    assert (info.kind, info.points_to_device, info.points_to_id) == ("pointer", "bob", "x")
    assert list(info.shape) == [3]
    [got] = _send(runtime, "get_object", cmd.GetObject(id="p", delete=True)).ok.objects
    assert got.kind == "pointer" and not got.has_value
    assert list(_send(runtime, "list_objects", cmd.ListObjects()).ok.objects) == []


def test_a_value_arriving_under_a_pointers_id_replaces_the_pointer() -> None:
    runtime = DeviceRuntime(device_id="alice", store=MemoryStore())
    _send(runtime, "store_pointer", _record("p"))
    value = torch.tensor([1.0, 2.0, 3.0])
    _send(runtime, "store_object", cmd.StoreObject(id="p", tensor=tensor_to_proto(value)))
    [info] = _send(runtime, "get_object", cmd.GetObject(id="p")).ok.objects
    assert info.kind == "tensor"
    assert torch.equal(tensor_from_proto(info.value), value)


def test_an_op_on_a_pointer_record_fails_naming_where_the_value_is() -> None:
    runtime = DeviceRuntime(device_id="alice", store=MemoryStore())
    _send(runtime, "store_pointer", _record("p"))
    msg = cmd.RunOp(
        target="torch.abs",
        args=ValueList(items=[value_to_proto(ObjectId("p"))]),
        result_ids=[new_id()],
    )
    reply = _send(runtime, "run_op", msg)
    assert reply.error.code == "NOT_FOUND"
    assert "bob:x" in reply.error.message and "remote_get" in reply.error.message


def test_moving_a_pointer_record_forwards_the_record_and_drops_it_here() -> None:
    sent: list[tuple[str, bytes]] = []
    runtime = DeviceRuntime(
        device_id="alice", store=MemoryStore(), forward=lambda d, b: sent.append((d, b))
    )
    _send(runtime, "store_pointer", _record("p"))
    _send(runtime, "move_object", cmd.MoveObject(id="p", destination_device="carol"))
    [(destination, data)] = sent
    forwarded = decode_command(data)
    assert destination == "carol" and forwarded.WhichOneof("body") == "store_pointer"
    assert (forwarded.store_pointer.location, forwarded.store_pointer.remote_id) == ("bob", "x")
    assert list(_send(runtime, "list_objects", cmd.ListObjects()).ok.objects) == []


def test_clear_and_delete_remove_pointer_records() -> None:
    runtime = DeviceRuntime(device_id="alice", store=MemoryStore())
    _send(runtime, "store_pointer", _record("p"))
    _send(runtime, "store_pointer", _record("q"))
    _send(runtime, "delete_objects", cmd.DeleteObjects(ids=["p"]))
    assert [o.id for o in _send(runtime, "list_objects", cmd.ListObjects()).ok.objects] == ["q"]
    _send(runtime, "clear_objects", cmd.ClearObjects())
    assert list(_send(runtime, "list_objects", cmd.ListObjects()).ok.objects) == []
