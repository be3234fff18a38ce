"""Command and Reply messages as bytes, errors as ``ErrorInfo``, and fresh ids.

Encoders stamp ``schema_version`` and check the message is complete; decoders turn any
garbage into ``WireError`` and a foreign version into ``SchemaVersionError``. Messages with
large tensors may be *framed* (raw tensor bytes after the protobuf, see
:mod:`schemas.tensor_codec`): :func:`encode_command` frames when given tensors, and every
decoder accepts framed data. :func:`decode_command` inlines the frames (one copy);
:func:`decode_command_framed` returns them as zero-copy views for
``tensor_from_proto(proto, frame)``.

Examples
--------
>>> from schemas.command_pb2 import Command, GetObject
>>> cmd = Command(command_id=new_id(), device_id="alice", get_object=GetObject(id="x"))
>>> decode_command(encode_command(cmd)).get_object.id
'x'
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError

from schemas.command_pb2 import Command, ErrorInfo, Reply
from schemas.errors import FedplanError, WireError, error_from_code
from schemas.ir import SCHEMA_VERSION
from schemas.plan_codec import check_schema_version
from schemas.tensor_codec import (
    FramedParts,
    decode_framed,
    encode_framed_parts,
    framed_tensor_protos,
    inline_frames,
    is_framed,
    tensor_from_proto,
)

M = TypeVar("M", Command, Reply)


def new_id() -> str:
    """A random id of 16 hex characters for commands and objects.

    Examples
    --------
    >>> len(new_id())
    16
    """
    return secrets.token_hex(8)


def encode_command(command: Command, tensors: Sequence[torch.Tensor] = ()) -> bytes:
    """Serialize a command (framed when ``tensors`` are given for its framed tensor protos).

    Sets ``schema_version`` when it is 0. Raises ``WireError`` when the command has no
    ``command_id`` or no body.
    """
    return bytes(encode_command_parts(command, tensors))


def encode_command_parts(
    command: Command, tensors: Sequence[torch.Tensor] = ()
) -> bytes | FramedParts:
    """Like :func:`encode_command`, but framed data is returned as its parts, not joined:
    the tensors' bytes stay views of their memory until a transport cuts the parts into
    message-sized pieces (see :class:`schemas.tensor_codec.FramedParts`).

    Examples
    --------
    >>> from schemas.command_pb2 import StoreObject
    >>> from schemas.tensor_codec import tensor_to_proto
    >>> t = torch.ones(2)
    >>> cmd = Command(command_id="c1", store_object=StoreObject(id="x"))
    >>> cmd.store_object.tensor.CopyFrom(tensor_to_proto(t, framed=True))
    >>> parts = encode_command_parts(cmd, [t])
    >>> decode_command(bytes(parts)).store_object.id
    'x'
    """
    if not command.command_id:
        raise WireError("a command needs a command_id; set it with schemas.wire.new_id()")
    if command.WhichOneof("body") is None:
        raise WireError("a command needs a body (store_object, run_plan, ...)")
    return _encode(command, tensors)


def decode_command(data: bytes | bytearray | memoryview | FramedParts) -> Command:
    """Parse a command (framed data has its frames copied inline into the tensor protos).

    Raises
    ------
    WireError
        The bytes are not a fedplan ``Command`` or it has no body.
    SchemaVersionError
        The command comes from a fedplan speaking another schema version.
    """
    command, frames = decode_command_framed(data)
    if frames:
        inline_frames(command, frames)
    return command


def decode_command_framed(
    data: bytes | bytearray | memoryview | FramedParts,
) -> tuple[Command, list[memoryview]]:
    """Parse a command and return its tensor frames without copying them.

    The frames belong, in order, to ``schemas.tensor_codec.framed_tensor_protos(command)``;
    pass a ``bytearray`` to get writable, zero-copy tensors from ``tensor_from_proto``.
    """
    command, frames = _decode(data, Command)
    if command.WhichOneof("body") is None:
        raise WireError("the command has no body; is the sender a newer fedplan?")
    return command, frames


def encode_reply(reply: Reply, tensors: Sequence[torch.Tensor] = ()) -> bytes:
    """Serialize a reply; ``WireError`` when it has no ``command_id`` or no outcome."""
    return bytes(encode_reply_parts(reply, tensors))


def encode_reply_parts(reply: Reply, tensors: Sequence[torch.Tensor] = ()) -> bytes | FramedParts:
    """Like :func:`encode_reply`, but framed data is returned as its parts, not joined (the
    tensors' bytes stay views of their memory, see ``FramedParts``).

    Examples
    --------
    >>> from schemas.command_pb2 import ObjectInfo, Ok
    >>> from schemas.tensor_codec import tensor_to_proto
    >>> t = torch.ones(2)
    >>> info = ObjectInfo(id="x", has_value=True, value=tensor_to_proto(t, framed=True))
    >>> parts = encode_reply_parts(Reply(command_id="c1", ok=Ok(objects=[info])), [t])
    >>> parts.message.command_id, decode_reply_values(bytes(parts))[1]["x"]
    ('c1', tensor([1., 1.]))
    """
    if not reply.command_id:
        raise WireError("a reply needs the command_id of the command it answers")
    if reply.WhichOneof("outcome") is None:
        raise WireError("a reply needs an outcome: ok or error")
    return _encode(reply, tensors)


def decode_reply(data: bytes | bytearray | memoryview | FramedParts) -> Reply:
    """Parse a reply (frames copied inline); ``WireError``/``SchemaVersionError`` as above."""
    reply, frames = decode_reply_framed(data)
    if frames:
        inline_frames(reply, frames)
    return reply


def decode_reply_framed(
    data: bytes | bytearray | memoryview | FramedParts,
) -> tuple[Reply, list[memoryview]]:
    """Parse a reply and return its tensor frames without copying them."""
    reply, frames = _decode(data, Reply)
    if reply.WhichOneof("outcome") is None:
        raise WireError("the reply has no outcome; is the sender a newer fedplan?")
    return reply, frames


def decode_reply_values(
    data: bytes | bytearray | memoryview,
) -> tuple[Reply, dict[str, torch.Tensor]]:
    """Parse a reply and decode its objects' framed values straight from ``data``.

    Returns the reply and, by object id, the tensor of each object whose value travelled as
    a frame: a view of ``data`` when it is writable (a ``bytearray``: no copy at all), one
    copy otherwise, never through the protobuf ``bytes`` field. Those objects' ``value``
    keeps ``frame_length`` and no ``data``: read their tensor from the dict (any other
    frame, e.g. a second object of the same id, is inlined as :func:`decode_reply` does).

    Examples
    --------
    >>> from schemas.command_pb2 import ObjectInfo, Ok
    >>> from schemas.tensor_codec import tensor_to_proto
    >>> t = torch.arange(4.0)
    >>> info = ObjectInfo(id="x", has_value=True, value=tensor_to_proto(t, framed=True))
    >>> data = encode_reply(Reply(command_id="c1", ok=Ok(objects=[info])), [t])
    >>> reply, values = decode_reply_values(bytearray(data))
    >>> values["x"]
    tensor([0., 1., 2., 3.])
    """
    reply, frames = decode_reply_framed(data)
    values: dict[str, torch.Tensor] = {}
    if not frames:
        return reply, values
    protos = framed_tensor_protos(reply)
    if len(protos) != len(frames):
        raise WireError(f"{len(protos)} framed tensors but {len(frames)} frames")
    owners = [
        (info.id, info.value)
        for info in (reply.ok.objects if reply.WhichOneof("outcome") == "ok" else ())
        if info.value.frame_length
    ]
    for proto, frame in zip(protos, frames, strict=True):
        owner = next((oid for oid, value in owners if value is proto), None)
        if owner is not None and owner not in values:
            values[owner] = tensor_from_proto(proto, frame)
        else:
            inline_frames(proto, [frame])
    return reply, values


def error_to_proto(exc: BaseException, *, device_id: str) -> ErrorInfo:
    """Describe an exception for a reply.

    A ``FedplanError`` keeps its code, message and fields (its own ``device_id`` wins);
    any other exception becomes code ``"INTERNAL"`` with its type name and message.

    Examples
    --------
    >>> from schemas.errors import PlanGuardError
    >>> info = error_to_proto(PlanGuardError("guard failed", op_index=3), device_id="bob")
    >>> info.code, info.device_id, info.op_index, info.has_op_index
    ('GUARD_FAILED', 'bob', 3, True)
    """
    if isinstance(exc, FedplanError):
        info = ErrorInfo(
            code=exc.code,
            message=exc.message,
            device_id=exc.device_id or device_id,
            plan_id=exc.plan_id or "",
            plan_name=exc.plan_name or "",
        )
        if exc.op_index is not None:
            info.op_index = exc.op_index
            info.has_op_index = True
        return info
    return ErrorInfo(code="INTERNAL", message=f"{type(exc).__name__}: {exc}", device_id=device_id)


def error_from_proto(info: ErrorInfo) -> FedplanError:
    """The exception a reply's ``ErrorInfo`` describes, of the class its code names.

    Examples
    --------
    >>> from schemas.errors import ObjectNotFound
    >>> err = error_from_proto(error_to_proto(ObjectNotFound("no x"), device_id="bob"))
    >>> isinstance(err, ObjectNotFound), err.device_id
    (True, 'bob')
    """
    return error_from_code(
        info.code,
        info.message,
        device_id=info.device_id or None,
        plan_id=info.plan_id or None,
        plan_name=info.plan_name or None,
        op_index=info.op_index if info.has_op_index else None,
    )


def _encode(message: Command | Reply, tensors: Sequence[torch.Tensor]) -> bytes | FramedParts:
    if message.schema_version == 0:
        message.schema_version = SCHEMA_VERSION
    if tensors:
        return encode_framed_parts(message, tensors)
    return message.SerializeToString()


def _decode(
    data: bytes | bytearray | memoryview | FramedParts, kind: type[M]
) -> tuple[M, list[memoryview]]:
    what = kind.__name__
    if isinstance(data, FramedParts):  # a tap on what is about to be sent: join it
        data = bytes(data)
    if is_framed(data):
        message, frames = decode_framed(data, kind)
    else:
        message, frames = kind(), []
        try:
            message.ParseFromString(bytes(data))
        except DecodeError as exc:
            raise WireError(f"could not decode a fedplan {what}: {exc}") from None
    if message.schema_version == 0:
        raise WireError(f"not a fedplan {what} (no schema_version); check who sent it")
    check_schema_version(message.schema_version, what)
    return message, frames
