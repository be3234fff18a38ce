"""Tensors on the wire: ``torch.Tensor`` <-> ``TensorProto`` and raw framing for large tensors.

A tensor travels as its dtype name (from the fixed table :data:`DTYPES`, never looked up on
``torch`` by a received name), its shape, ``requires_grad`` and its contiguous row-major
little-endian element bytes. Small tensors carry the bytes inline in ``TensorProto.data``;
large ones travel as raw *frames* after the protobuf (:func:`encode_framed`), which avoids
protobuf's copies of a ``bytes`` field.

Memory ownership (decided here, once): a decoded tensor is always writable and never aliases
immutable memory. Inline ``data`` is copied once into a ``bytearray`` (protobuf hands out
``bytes``, and CPython shares one-byte ``bytes`` objects process-wide, so aliasing them would
let an in-place op corrupt the interpreter). A frame from a writable buffer (``bytearray``,
writable ``memoryview``) is used without any copy: the tensor shares that memory and keeps
the buffer alive. A frame from read-only memory (``bytes``) is copied once.

Framed layout (all integers little-endian)::

    b"\\x00FP1"  uint64 message length  message bytes  zero padding to a multiple of 64
    frame 0 (TensorProto.frame_length bytes)  zero padding to a multiple of 64  frame 1 ...

Frames follow the order of the framed ``TensorProto`` s in the message, as listed by
:func:`framed_tensor_protos` (depth-first, fields in field-number order). A serialized
protobuf never starts with a zero byte, so framed data is recognisable (:func:`is_framed`).

Examples
--------
>>> import torch
>>> p = tensor_to_proto(torch.tensor([[1.0, 2.0]]))
>>> p.dtype, list(p.shape)
('float32', [1, 2])
>>> tensor_from_proto(p)
tensor([[1., 2.]])
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from schemas.errors import WireError
from schemas.tensor_pb2 import TensorProto

DTYPES: dict[str, torch.dtype] = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
"""Every dtype that may cross the wire, by the name used in ``TensorProto.dtype``."""

_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

FRAME_MAGIC = b"\x00FP1"
"""First bytes of framed data (a protobuf message never starts with a zero byte)."""

FRAME_ALIGN = 64
"""Frames start at offsets that are multiples of this, so decoded tensors are aligned."""

_HEADER = struct.Struct("<4sQ")
_MAX_ELEMENTS = 1 << 40

M = TypeVar("M", bound=Message)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a dtype; ``WireError`` for dtypes that cannot cross the wire."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise WireError(
            f"dtype {dtype} cannot be sent; convert the tensor to one of: {', '.join(DTYPES)}"
        ) from None


def dtype_from_name(name: str) -> torch.dtype:
    """The dtype for a wire name, from the fixed table; ``WireError`` for unknown names."""
    try:
        return DTYPES[name]
    except KeyError:
        raise WireError(
            f"unknown dtype {name!r} on the wire; known dtypes: {', '.join(DTYPES)}"
            " (is the sender a newer fedplan?)"
        ) from None


def tensor_to_proto(tensor: torch.Tensor, *, framed: bool = False) -> TensorProto:
    """Encode a dense tensor: dtype name, shape, ``requires_grad`` and element bytes.

    Parameters
    ----------
    tensor:
        Any dense strided tensor (non-contiguous, conjugated, 0-dim and empty are fine; GPU
        tensors are copied to the CPU). Autograd history is not sent, only ``requires_grad``.
    framed:
        Leave ``data`` empty and set ``frame_length`` instead: the bytes are then written
        by :func:`encode_framed`, which must be given this tensor. Empty tensors have no
        frame (``frame_length`` stays 0).

    Examples
    --------
    >>> import torch
    >>> p = tensor_to_proto(torch.arange(3, dtype=torch.int16))
    >>> p.dtype, list(p.shape), len(p.data)
    ('int16', [3], 6)
    """
    proto = TensorProto(
        dtype=dtype_name(tensor.dtype),
        shape=list(tensor.shape),
        requires_grad=tensor.requires_grad,
    )
    nbytes = tensor.numel() * tensor.element_size()
    if framed:
        proto.frame_length = nbytes
    elif nbytes:
        proto.data = _byte_view(tensor).numpy().tobytes()
    return proto


def tensor_from_proto(
    proto: TensorProto, frame: bytes | bytearray | memoryview | None = None
) -> torch.Tensor:
    """Decode a tensor; ``frame`` holds its bytes when ``proto.frame_length`` is set.

    The result is always writable: inline bytes are copied once; a writable ``frame`` is
    shared without copy (the tensor keeps it alive), a read-only one is copied once.

    Raises
    ------
    WireError
        Unknown dtype, negative or absurd shape, a byte count that does not match the shape,
        or a frame that is missing, unexpected or of the wrong length.

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([True, False])
    >>> torch.equal(tensor_from_proto(tensor_to_proto(t)), t)
    True
    """
    dtype = dtype_from_name(proto.dtype)
    shape = tuple(proto.shape)
    if any(size < 0 for size in shape):
        raise WireError(f"tensor shape {list(shape)} has a negative size")
    numel = 1
    for size in shape:
        numel *= size
    if numel > _MAX_ELEMENTS:
        raise WireError(f"tensor shape {list(shape)} has more than 2**40 elements")
    expected = numel * dtype.itemsize
    buffer = _element_bytes(proto, frame, expected)
    if expected == 0:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        tensor = torch.frombuffer(buffer, dtype=torch.uint8)
        if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
            tensor = swap_byte_order(tensor.view(dtype)).view(torch.uint8)
        tensor = tensor.view(dtype).view(shape)
    if proto.requires_grad:
        if not (dtype.is_floating_point or dtype.is_complex):
            raise WireError(f"a {proto.dtype} tensor cannot require grad")
        tensor.requires_grad_(True)
    return tensor


def writable_buffer(nbytes: int) -> memoryview:
    """``nbytes`` of writable memory, not initialised, to read or copy received bytes into.

    ``bytearray(n)`` zero-fills (touches every page once) before the bytes are written over
    it; this is a fresh ``uint8`` tensor's memory instead, so each byte is written once.
    Frames in it decode without a copy (:func:`tensor_from_proto` shares writable memory).

    Examples
    --------
    >>> buf = writable_buffer(4)
    >>> buf[:] = b"\\x00\\x00\\x80?"
    >>> proto = TensorProto(dtype="float32", shape=[1], frame_length=4)
    >>> tensor_from_proto(proto, buf)
    tensor([1.])
    """
    return torch.empty(nbytes, dtype=torch.uint8).numpy().data


def swap_byte_order(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy with every element's bytes reversed (little <-> big endian)."""
    itemsize = tensor.element_size()
    if itemsize == 1 or tensor.numel() == 0:
        return tensor.contiguous().clone()
    if tensor.is_complex():  # real and imaginary parts are swapped separately
        parts = torch.view_as_real(tensor.contiguous())
        return torch.view_as_complex(swap_byte_order(parts).contiguous())
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8).view(-1, itemsize)
    return raw.flip(1).contiguous().view(tensor.dtype).view(tensor.shape)


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The elements as a flat little-endian ``uint8`` CPU tensor (copies only if needed)."""
    if tensor.layout != torch.strided:
        raise WireError(f"a {tensor.layout} tensor cannot be sent; call .to_dense() first")
    if tensor.is_quantized:
        raise WireError("a quantized tensor cannot be sent; call .dequantize() first")
    flat = tensor.detach().resolve_conj().resolve_neg().cpu().contiguous()
    if sys.byteorder == "big":  # pragma: no cover - no big-endian CI
        flat = swap_byte_order(flat)
    return flat.reshape(-1).view(torch.uint8)


def _element_bytes(
    proto: TensorProto, frame: bytes | bytearray | memoryview | None, expected: int
) -> bytearray | memoryview:
    """A writable buffer with exactly the tensor's ``expected`` element bytes."""
    if proto.frame_length:
        if proto.data:
            raise WireError("a tensor has both inline data and a frame; the sender is broken")
        if frame is None:
            raise WireError(
                "a framed tensor arrived without its frame: decode the message with "
                "schemas.tensor_codec.decode_framed and pass the frame"
            )
        view = memoryview(frame).cast("B")
        if len(view) != proto.frame_length:
            raise WireError(
                f"tensor frame has {len(view)} bytes, its header says {proto.frame_length}"
            )
    else:
        if frame is not None:
            raise WireError("a frame was given for a tensor that carries its data inline")
        view = memoryview(proto.data)
    if len(view) != expected:
        raise WireError(
            f"tensor of dtype {proto.dtype} and shape {list(proto.shape)} needs {expected} "
            f"bytes, the message has {len(view)}"
        )
    if view.readonly:
        return bytearray(view)
    return view


def framed_tensor_protos(message: Message) -> list[TensorProto]:
    """Every ``TensorProto`` with ``frame_length > 0`` in ``message``, in frame order.

    The order is depth-first, fields by field number, repeated fields and map values (by
    sorted key) in order; it is the order of the frames written by :func:`encode_framed`.
    """
    found: list[TensorProto] = []
    _walk(message, found)
    return found


def _walk(message: Message, found: list[TensorProto]) -> None:
    if isinstance(message, TensorProto):
        if message.frame_length:
            found.append(message)
        return
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            value_field = entry.fields_by_name["value"]
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                for key in sorted(value):
                    _walk(value[key], found)
        elif field.is_repeated:
            for item in value:
                _walk(item, found)
        else:
            _walk(value, found)


def encode_framed(message: Message, tensors: Sequence[torch.Tensor]) -> bytes:
    """The message followed by the raw bytes of its framed tensors (see the module layout),
    joined into one ``bytes`` (:func:`encode_framed_parts` without the join).

    Examples
    --------
    >>> import torch
    >>> t = torch.ones(4)
    >>> data = encode_framed(tensor_to_proto(t, framed=True), [t])
    >>> proto, frames = decode_framed(data, TensorProto)
    >>> tensor_from_proto(proto, frames[0])
    tensor([1., 1., 1., 1.])
    """
    return bytes(encode_framed_parts(message, tensors))


class FramedParts:
    """Framed data as its parts, not joined: header and message, paddings, and each
    tensor's bytes as a view of the tensor's own memory.

    ``bytes(parts)`` joins them (one copy of everything); :meth:`pieces` cuts them into
    message-sized ``bytes`` pieces, each copied once from the parts, so a large tensor is
    never copied whole into one ``bytes`` before it is published in chunks.

    Examples
    --------
    >>> parts = FramedParts([b"ab", memoryview(b"cdefg")])
    >>> len(parts), bytes(parts), list(parts.pieces(3))
    (7, b'abcdefg', [b'abc', b'def', b'g'])
    """

    __slots__ = ("_size", "message", "parts")

    def __init__(self, parts: Sequence[bytes | memoryview], message: Message | None = None) -> None:
        self.parts = [memoryview(p).cast("B") for p in parts]
        self._size = sum(len(p) for p in self.parts)
        self.message = message
        """The message the parts encode (read it without joining and parsing the parts)."""

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def pieces(self, size: int) -> Iterator[bytes]:
        """Consecutive pieces of at most ``size`` bytes (one piece when all fit)."""
        piece: list[memoryview] = []
        room = size
        for part in self.parts:
            while len(part):
                take = part[:room]
                piece.append(take)
                part = part[len(take) :]
                room -= len(take)
                if room == 0:
                    yield b"".join(piece)
                    piece, room = [], size
        if piece or self._size == 0:
            yield b"".join(piece)


def encode_framed_parts(message: Message, tensors: Sequence[torch.Tensor]) -> FramedParts:
    """The message followed by the raw bytes of its framed tensors, as parts not joined.

    The tensors' parts are views of their own memory (no copy; a tensor that is not
    contiguous little-endian is copied once): keep the tensors unchanged until the parts
    are written out. :func:`encode_framed` joins them.

    ``tensors`` are the tensors encoded with ``tensor_to_proto(t, framed=True)``, in the
    order of :func:`framed_tensor_protos` (empty tensors may be listed; they have no frame).
    Each is checked against its proto's dtype, shape and ``frame_length``.

    Examples
    --------
    >>> import torch
    >>> t = torch.ones(4)
    >>> parts = encode_framed_parts(tensor_to_proto(t, framed=True), [t])
    >>> proto, frames = decode_framed(bytes(parts), TensorProto)
    >>> tensor_from_proto(proto, frames[0])
    tensor([1., 1., 1., 1.])
    """
    protos = framed_tensor_protos(message)
    nonempty = [t for t in tensors if t.numel() > 0]
    if len(protos) != len(nonempty):
        raise WireError(
            f"the message has {len(protos)} framed tensors but {len(nonempty)} non-empty "
            "tensors were given; pass exactly the tensors encoded with framed=True"
        )
    body = message.SerializeToString()
    parts: list[bytes | memoryview] = [_HEADER.pack(FRAME_MAGIC, len(body)), body]
    offset = _HEADER.size + len(body)
    for index, (proto, tensor) in enumerate(zip(protos, nonempty, strict=True)):
        if (
            proto.dtype != dtype_name(tensor.dtype)
            or list(proto.shape) != list(tensor.shape)
            or proto.frame_length != tensor.numel() * tensor.element_size()
        ):
            raise WireError(
                f"framed tensor {index} is {proto.dtype}{list(proto.shape)} in the message "
                f"but {dtype_name(tensor.dtype)}{list(tensor.shape)} was given; keep the "
                "tensors in the order of schemas.tensor_codec.framed_tensor_protos"
            )
        padding = -offset % FRAME_ALIGN
        parts.append(bytes(padding))
        parts.append(_byte_view(tensor).numpy().data)
        offset += padding + proto.frame_length
    return FramedParts(parts, message)


def is_framed(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` was written by :func:`encode_framed` (not a plain protobuf)."""
    return bytes(memoryview(data)[: len(FRAME_MAGIC)]) == FRAME_MAGIC


def decode_framed(
    data: bytes | bytearray | memoryview, message_type: type[M]
) -> tuple[M, list[memoryview]]:
    """Split framed data into the parsed message and its frames (no copy of the frames).

    Pass a ``bytearray`` for zero-copy writable tensors; frames of ``bytes`` are read-only
    and :func:`tensor_from_proto` copies them once.

    Raises
    ------
    WireError
        Missing magic, truncated data, an undecodable message, or trailing bytes.
    """
    view = memoryview(data).cast("B")
    if len(view) < _HEADER.size or not is_framed(view):
        raise WireError("not framed fedplan data (missing header); was it sent by fedplan?")
    _, length = _HEADER.unpack(view[: _HEADER.size])
    end = _HEADER.size + length
    if end > len(view):
        raise WireError(f"framed data truncated: header announces {length} message bytes")
    message = message_type()
    try:
        message.ParseFromString(bytes(view[_HEADER.size : end]))
    except DecodeError as exc:
        raise WireError(f"could not decode the framed {message_type.__name__}: {exc}") from None
    frames: list[memoryview] = []
    offset = end
    for proto in framed_tensor_protos(message):
        offset += -offset % FRAME_ALIGN
        stop = offset + proto.frame_length
        if stop > len(view):
            raise WireError("framed data truncated: a tensor frame is incomplete")
        frames.append(view[offset:stop])
        offset = stop
    if offset != len(view):
        raise WireError(f"framed data has {len(view) - offset} unexpected trailing bytes")
    return message, frames


def inline_frames(message: Message, frames: Sequence[bytes | bytearray | memoryview]) -> None:
    """Move frames into their protos' ``data`` in place (one copy), clearing ``frame_length``.

    For code that only handles inline tensors; the zero-copy path is
    ``tensor_from_proto(proto, frame)``.
    """
    protos = framed_tensor_protos(message)
    if len(protos) != len(frames):
        raise WireError(f"{len(protos)} framed tensors but {len(frames)} frames")
    for proto, frame in zip(protos, frames, strict=True):
        if len(memoryview(frame)) != proto.frame_length:
            raise WireError("a tensor frame does not match its frame_length")
        proto.data = bytes(frame)
        proto.frame_length = 0
