"""Tests for schemas.wire: Command/Reply bytes, ErrorInfo, ids."""

from __future__ import annotations

import random
import re

import pytest
import torch

from schemas.command_pb2 import (
    Command,
    ErrorInfo,
    GetObject,
    ObjectInfo,
    Ok,
    Reply,
    RunPlan,
    StoreObject,
)
from schemas.errors import (
    DeviceError,
    FedplanError,
    ObjectNotFound,
    PlanExecutionError,
    PlanGuardError,
    SchemaVersionError,
    WireError,
)
from schemas.ir import SCHEMA_VERSION, ObjectId
from schemas.tensor_codec import framed_tensor_protos, tensor_from_proto, tensor_to_proto
from schemas.value_codec import value_list_from_proto, value_list_to_proto
from schemas.wire import (
    decode_command,
    decode_command_framed,
    decode_reply,
    decode_reply_framed,
    encode_command,
    encode_reply,
    error_from_proto,
    error_to_proto,
    new_id,
)


def run_plan_command() -> Command:
    return Command(
        command_id=new_id(),
        device_id="alice",
        run_plan=RunPlan(
            plan_id="p1",
            args=value_list_to_proto([ObjectId("x1"), 3]),
            result_ids=["r1", "r2"],
            return_values=True,
        ),
    )


def test_a_command_round_trips_and_gets_the_schema_version() -> None:
    cmd = run_plan_command()
    decoded = decode_command(encode_command(cmd))
    assert decoded.schema_version == SCHEMA_VERSION
    assert decoded.command_id == cmd.command_id
    assert decoded.WhichOneof("body") == "run_plan"
    assert value_list_from_proto(decoded.run_plan.args) == [ObjectId("x1"), 3]
    assert list(decoded.run_plan.result_ids) == ["r1", "r2"]


def test_a_reply_round_trips_with_an_inline_tensor() -> None:
    value = torch.tensor([[1.5, -2.0]])
    reply = Reply(
        command_id="c1",
        device_id="alice",
        result_ids=["r1"],
        ok=Ok(objects=[ObjectInfo(id="r1", value=tensor_to_proto(value), has_value=True)]),
    )
    decoded = decode_reply(encode_reply(reply))
    assert decoded.schema_version == SCHEMA_VERSION
    assert torch.equal(tensor_from_proto(decoded.ok.objects[0].value), value)


def test_a_command_without_an_id_or_a_body_cannot_be_encoded() -> None:
    with pytest.raises(WireError, match="new_id"):
        encode_command(Command(get_object=GetObject(id="x")))
    with pytest.raises(WireError, match="body"):
        encode_command(Command(command_id="c"))


def test_a_reply_without_an_outcome_cannot_be_encoded() -> None:
    with pytest.raises(WireError, match="outcome"):
        encode_reply(Reply(command_id="c"))


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff", b"\x0a\x80", b"not a protobuf at all"])
def test_garbage_bytes_are_a_wire_error(garbage: bytes) -> None:
    with pytest.raises(WireError):
        decode_command(garbage)
    with pytest.raises(WireError):
        decode_reply(garbage)


def test_empty_bytes_are_not_a_command() -> None:
    with pytest.raises(WireError, match="schema_version"):
        decode_command(b"")


def test_a_command_from_another_schema_version_is_refused() -> None:
    cmd = run_plan_command()
    cmd.schema_version = SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError, match=f"supports {SCHEMA_VERSION}"):
        decode_command(cmd.SerializeToString())


def test_a_reply_from_another_schema_version_is_refused() -> None:
    reply = Reply(schema_version=SCHEMA_VERSION + 5, command_id="c", ok=Ok())
    with pytest.raises(SchemaVersionError):
        decode_reply(reply.SerializeToString())


def test_a_decoded_command_without_a_body_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="no body"):
        decode_command(Command(schema_version=SCHEMA_VERSION, command_id="c").SerializeToString())


def framed_store(tensor: torch.Tensor) -> tuple[Command, bytes]:
    cmd = Command(
        command_id=new_id(),
        device_id="bob",
        store_object=StoreObject(id="big", tensor=tensor_to_proto(tensor, framed=True)),
    )
    return cmd, encode_command(cmd, [tensor])


def test_a_framed_command_decodes_with_zero_copy_frames() -> None:
    tensor = torch.randn(128, 64)
    _, data = framed_store(tensor)
    cmd, frames = decode_command_framed(bytearray(data))
    (proto,) = framed_tensor_protos(cmd)
    assert torch.equal(tensor_from_proto(proto, frames[0]), tensor)


def test_a_framed_command_decodes_inline_with_the_plain_decoder() -> None:
    tensor = torch.arange(1000, dtype=torch.int64)
    _, data = framed_store(tensor)
    cmd = decode_command(data)
    assert cmd.store_object.tensor.frame_length == 0
    assert torch.equal(tensor_from_proto(cmd.store_object.tensor), tensor)


def test_a_framed_reply_round_trips() -> None:
    tensor = torch.ones(10, 10)
    reply = Reply(
        command_id="c",
        ok=Ok(objects=[ObjectInfo(id="r", value=tensor_to_proto(tensor, framed=True))]),
    )
    decoded, frames = decode_reply_framed(encode_reply(reply, [tensor]))
    assert torch.equal(tensor_from_proto(decoded.ok.objects[0].value, frames[0]), tensor)


def test_a_fedplan_error_keeps_its_code_and_fields_across_the_wire() -> None:
    exc = PlanGuardError(
        "guard failed at f.py:3: traced True, now False", plan_id="p1", plan_name="f", op_index=4
    )
    info = ErrorInfo.FromString(error_to_proto(exc, device_id="alice").SerializeToString())
    again = error_from_proto(info)
    assert type(again) is PlanGuardError
    assert isinstance(again, ValueError)
    assert again.message == exc.message
    assert (again.device_id, again.plan_id, again.plan_name, again.op_index) == (
        "alice",
        "p1",
        "f",
        4,
    )


def test_op_index_zero_survives_the_wire() -> None:
    info = error_to_proto(PlanExecutionError("boom", op_index=0), device_id="d")
    assert error_from_proto(info).op_index == 0


def test_an_error_without_an_op_index_has_none() -> None:
    again = error_from_proto(error_to_proto(ObjectNotFound("no x"), device_id="d"))
    assert isinstance(again, ObjectNotFound) and isinstance(again, KeyError)
    assert again.op_index is None and again.plan_id is None


def test_the_error_s_own_device_id_wins_over_the_reporting_device() -> None:
    info = error_to_proto(FedplanError("x", device_id="origin"), device_id="relay")
    assert info.device_id == "origin"


def test_a_foreign_exception_becomes_internal_with_its_type_and_message() -> None:
    info = error_to_proto(ZeroDivisionError("division by zero"), device_id="bob")
    assert info.code == "INTERNAL"
    assert info.message == "ZeroDivisionError: division by zero"
    again = error_from_proto(info)
    assert type(again) is FedplanError
    assert again.device_id == "bob"


def test_an_unknown_error_code_becomes_a_device_error() -> None:
    again = error_from_proto(ErrorInfo(code="FROM_THE_FUTURE", message="m"))
    assert type(again) is DeviceError


def test_new_ids_are_sixteen_hex_characters_and_distinct() -> None:
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)


def test_every_truncation_or_bit_flip_of_a_command_decodes_or_raises_wire_error() -> None:
    tensor = torch.arange(6.0).reshape(2, 3)
    _, framed = framed_store(tensor)
    plain = encode_command(run_plan_command())
    rng = random.Random(0)
    samples: list[bytes] = []
    for data in (framed, plain):
        samples += [data[:cut] for cut in range(len(data))]
        for _ in range(300):
            flipped = bytearray(data)
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            samples.append(bytes(flipped))
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(64))) for _ in range(300)]
    for sample in samples:
        try:
            cmd = decode_command(sample)
        except WireError:
            continue
        if cmd.WhichOneof("body") == "store_object":
            try:
                tensor_from_proto(cmd.store_object.tensor)
            except WireError:
                continue
