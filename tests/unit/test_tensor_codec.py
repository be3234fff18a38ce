"""Tests for schemas.tensor_codec: tensors <-> TensorProto and raw framing."""

from __future__ import annotations

import struct
import warnings

import numpy as np
import pytest
import torch

from schemas.command_pb2 import Command, StoreObject
from schemas.errors import WireError
from schemas.plan_pb2 import NamedTensor, PlanProto
from schemas.tensor_codec import (
    DTYPES,
    FRAME_ALIGN,
    decode_framed,
    dtype_from_name,
    encode_framed,
    framed_tensor_protos,
    inline_frames,
    is_framed,
    swap_byte_order,
    tensor_from_proto,
    tensor_to_proto,
)
from schemas.tensor_pb2 import TensorProto

WIRE_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.complex64,
    torch.complex128,
]


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=gen)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype, generator=gen)


def assert_same(decoded: torch.Tensor, original: torch.Tensor) -> None:
    assert decoded.dtype == original.dtype
    assert decoded.shape == original.shape
    # bitwise equality: nan == nan, -0.0 != 0.0
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (decoded, original)]
    assert torch.equal(*as_bytes)


@pytest.mark.parametrize("dtype", WIRE_DTYPES, ids=str)
def test_every_wire_dtype_round_trips_bit_for_bit(dtype: torch.dtype) -> None:
    original = sample(dtype)
    assert_same(tensor_from_proto(tensor_to_proto(original)), original)


@pytest.mark.parametrize(
    "original",
    [
        torch.tensor(3.5),
        torch.tensor(True),
        torch.empty(0),
        torch.empty(2, 0, 3, dtype=torch.int64),
        torch.arange(12.0).reshape(3, 4).t(),
        torch.arange(20).reshape(4, 5)[::2, 1::2],
        torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0]),
    ],
    ids=["0-dim", "0-dim bool", "empty", "empty 3-d", "transposed", "strided", "specials"],
)
def test_unusual_shapes_and_values_round_trip(original: torch.Tensor) -> None:
    assert_same(tensor_from_proto(tensor_to_proto(original)), original)


def test_elements_are_sent_as_contiguous_little_endian_bytes() -> None:
    proto = tensor_to_proto(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32).t())
    assert proto.data == struct.pack("<4i", 1, 3, 2, 4)
    assert list(proto.shape) == [2, 2]
    assert proto.dtype == "int32"


def test_a_conjugated_complex_tensor_is_sent_resolved() -> None:
    original = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    decoded = tensor_from_proto(tensor_to_proto(original.conj()))
    assert torch.equal(decoded, torch.tensor([1 - 2j, 3 + 4j], dtype=torch.complex64))
    assert not decoded.is_conj()


def test_requires_grad_travels_and_the_decoded_tensor_is_a_leaf() -> None:
    original = torch.ones(2, requires_grad=True) * 2  # not a leaf on this side
    decoded = tensor_from_proto(tensor_to_proto(original))
    assert decoded.requires_grad and decoded.is_leaf
    (decoded * 3).sum().backward()
    assert torch.equal(decoded.grad, torch.full((2,), 3.0))


def test_a_decoded_one_byte_tensor_is_writable_without_touching_shared_bytes() -> None:
    proto = tensor_to_proto(torch.tensor([1], dtype=torch.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = tensor_from_proto(proto)
    decoded.add_(5)
    assert decoded.tolist() == [6]
    assert bytes([1]) == b"\x01"  # CPython's cached one-byte object is intact
    assert proto.data == b"\x01"


def test_an_unknown_dtype_name_is_a_wire_error_that_lists_the_known_ones() -> None:
    with pytest.raises(WireError, match="float32"):
        tensor_from_proto(TensorProto(dtype="Tensor", shape=[1], data=b"\x00"))
    with pytest.raises(WireError):
        dtype_from_name("__class__")


def test_a_byte_count_that_does_not_match_the_shape_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="needs 12 bytes"):
        tensor_from_proto(TensorProto(dtype="float32", shape=[3], data=b"\x00" * 8))


def test_a_negative_size_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="negative"):
        tensor_from_proto(TensorProto(dtype="float32", shape=[-1], data=b""))


def test_an_integer_tensor_that_claims_to_require_grad_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="grad"):
        tensor_from_proto(TensorProto(dtype="int64", shape=[], data=bytes(8), requires_grad=True))


def test_tensors_that_cannot_cross_the_wire_are_refused_with_a_remedy() -> None:
    with pytest.raises(WireError, match="to_dense"):
        tensor_to_proto(torch.eye(2).to_sparse())
    with pytest.raises(WireError, match="convert"):
        tensor_to_proto(torch.zeros(2, dtype=torch.float8_e4m3fn))


def test_swap_byte_order_agrees_with_numpy_byteswap() -> None:
    ints = torch.tensor([1, 256, -2, 2**30], dtype=torch.int32)
    assert swap_byte_order(ints).tolist() == ints.numpy().byteswap().tolist()
    cplx = torch.tensor([1 + 2j, -3.5 + 0.25j], dtype=torch.complex64)
    expected = torch.from_numpy(cplx.numpy().byteswap())
    assert torch.equal(swap_byte_order(cplx).view(torch.uint8), expected.view(torch.uint8))


def _command_with(tensors: list[torch.Tensor]) -> Command:
    cmd = Command(command_id="c1", device_id="d")
    cmd.store_object.CopyFrom(StoreObject(id="x", tensor=tensor_to_proto(tensors[0], framed=True)))
    return cmd


def test_a_framed_message_round_trips_several_tensors_in_order() -> None:
    tensors = [sample(torch.float32, (5, 7)), torch.empty(0), sample(torch.int16, (3,))]
    plan = PlanProto(name="p")
    for slot, tensor in enumerate(tensors):
        plan.constants.append(NamedTensor(slot=slot, tensor=tensor_to_proto(tensor, framed=True)))
    data = encode_framed(plan, tensors)
    assert is_framed(data)
    decoded, frames = decode_framed(data, PlanProto)
    assert decoded.name == "p"
    assert len(frames) == 2  # the empty tensor has no frame
    protos = framed_tensor_protos(decoded)
    assert_same(tensor_from_proto(protos[0], frames[0]), tensors[0])
    assert_same(tensor_from_proto(protos[1], frames[1]), tensors[2])
    assert_same(tensor_from_proto(decoded.constants[1].tensor), tensors[1])


def test_frames_start_at_aligned_offsets() -> None:
    tensors = [torch.ones(3, dtype=torch.float64), torch.ones(5, dtype=torch.float64)]
    plan = PlanProto()
    for tensor in tensors:
        plan.constants.append(NamedTensor(tensor=tensor_to_proto(tensor, framed=True)))
    data = bytearray(encode_framed(plan, tensors))
    _, frames = decode_framed(data, PlanProto)
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    for frame in frames:
        assert (np.frombuffer(frame, dtype=np.uint8).ctypes.data - base) % FRAME_ALIGN == 0


def test_a_frame_from_a_bytearray_is_shared_without_copy() -> None:
    original = sample(torch.float32, (64, 64))
    buffer = bytearray(encode_framed(_command_with([original]), [original]))
    cmd, frames = decode_framed(buffer, Command)
    decoded = tensor_from_proto(cmd.store_object.tensor, frames[0])
    assert_same(decoded, original)
    start = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    assert start <= decoded.data_ptr() < start + len(buffer)
    decoded.add_(1)  # writes land in the buffer the tensor shares
    again = tensor_from_proto(cmd.store_object.tensor, frames[0])
    assert torch.equal(again, original + 1)


def test_a_frame_from_read_only_bytes_is_copied_once_and_writable_without_warning() -> None:
    original = sample(torch.int64, (10,))
    data = encode_framed(_command_with([original]), [original])
    cmd, frames = decode_framed(data, Command)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = tensor_from_proto(cmd.store_object.tensor, frames[0])
    decoded.mul_(2)
    assert torch.equal(decoded, original * 2)
    assert encode_framed(_command_with([original]), [original]) == data  # bytes untouched


def test_framed_tensors_given_out_of_order_are_refused() -> None:
    a, b = torch.ones(2), torch.ones(3, dtype=torch.int32)
    plan = PlanProto()
    for tensor in (a, b):
        plan.constants.append(NamedTensor(tensor=tensor_to_proto(tensor, framed=True)))
    with pytest.raises(WireError, match="order"):
        encode_framed(plan, [b, a])
    with pytest.raises(WireError, match="framed tensors"):
        encode_framed(plan, [a])


@pytest.mark.parametrize("cut", [3, 20, -1])
def test_truncated_or_padded_framed_data_is_a_wire_error(cut: int) -> None:
    original = torch.arange(100.0)
    data = encode_framed(_command_with([original]), [original])
    with pytest.raises(WireError):
        decode_framed(data[:cut], Command)
    with pytest.raises(WireError, match="trailing"):
        decode_framed(data + b"\x00", Command)


def test_plain_protobuf_bytes_are_not_taken_for_framed_data() -> None:
    plain = _command_with([torch.ones(1)]).SerializeToString()
    assert not is_framed(plain)
    with pytest.raises(WireError, match="not framed"):
        decode_framed(plain, Command)


def test_a_framed_tensor_without_its_frame_is_a_wire_error() -> None:
    proto = tensor_to_proto(torch.ones(4), framed=True)
    with pytest.raises(WireError, match="decode_framed"):
        tensor_from_proto(proto)
    with pytest.raises(WireError, match="header says"):
        tensor_from_proto(proto, b"\x00" * 4)


def test_inline_frames_makes_a_framed_message_self_contained() -> None:
    original = sample(torch.bfloat16, (4, 3))
    cmd, frames = decode_framed(encode_framed(_command_with([original]), [original]), Command)
    inline_frames(cmd, frames)
    assert framed_tensor_protos(cmd) == []
    assert_same(tensor_from_proto(cmd.store_object.tensor), original)


def test_an_eight_mebibyte_tensor_round_trips_through_a_frame() -> None:
    original = torch.arange(2 * 1024 * 1024, dtype=torch.float32)
    data = bytearray(encode_framed(_command_with([original]), [original]))
    cmd, frames = decode_framed(data, Command)
    assert torch.equal(tensor_from_proto(cmd.store_object.tensor, frames[0]), original)


def test_the_dtype_table_names_match_torch_names() -> None:
    for name, dtype in DTYPES.items():
        assert str(dtype) == f"torch.{name}"
