"""Building a device's replies: object metadata, success and typed-error replies."""

from __future__ import annotations

import logging

import torch

from consumer.store.base import StoredObject
from schemas.command_pb2 import Command, ErrorInfo, ObjectInfo, Ok, Reply
from schemas.errors import DeviceError, FedplanError, PlanExecutionError
from schemas.ir import SCHEMA_VERSION, DType
from schemas.wire import decode_command, encode_reply, error_to_proto

log = logging.getLogger(__name__)


def tensor_info(obj: StoredObject) -> ObjectInfo:
    """Metadata of a stored tensor (no value)."""
    return ObjectInfo(
        id=obj.id,
        tags=list(obj.tags),
        description=obj.description,
        dtype=DType.of(obj.tensor.dtype).name,
        shape=list(obj.tensor.shape),
        kind="tensor",
    )


def plan_info(plan_id: str, name: str) -> ObjectInfo:
    """Metadata of a stored plan."""
    return ObjectInfo(id=plan_id, kind="plan", description=name)


def result_ids_of(command: Command) -> list[str]:
    """The ids a command names for its results (the keys of the server's futures)."""
    body = command.WhichOneof("body")
    if body in ("run_plan", "run_op"):
        return list(getattr(command, body).result_ids)
    if body in ("store_object", "store_pointer", "get_object"):
        return [getattr(command, body).id]
    if body == "move_object":
        return [command.move_object.new_id or command.move_object.id]
    return []


def is_plain_read(command: Command) -> bool:
    """A ``GetObject``/``GetPlan`` that deletes nothing (safe to run again)."""
    body = command.WhichOneof("body")
    return body in ("get_object", "get_plan") and not getattr(command, body).delete


def ok_reply(device_id: str, command_id: str, result_ids: list[str], ok: Ok) -> Reply:
    """A success reply."""
    return Reply(
        schema_version=SCHEMA_VERSION,
        command_id=command_id,
        device_id=device_id,
        result_ids=result_ids,
        ok=ok,
    )


def error_reply(
    device_id: str,
    command_id: str,
    result_ids: list[str],
    exc: BaseException,
    wrap: type[FedplanError] = DeviceError,
) -> Reply:
    """A typed error reply; an exception from outside the error tree is wrapped in ``wrap``."""
    if not isinstance(exc, FedplanError):
        exc = wrap(f"{type(exc).__name__}: {exc}", device_id=device_id)
    if exc.device_id is None:
        exc.device_id = device_id
    try:
        info = error_to_proto(exc, device_id=device_id)
    except Exception:
        info = ErrorInfo(code=exc.code, message=exc.message, device_id=device_id)
    return Reply(
        schema_version=SCHEMA_VERSION,
        command_id=command_id,
        device_id=device_id,
        result_ids=result_ids,
        error=info,
    )


def encode_safely(reply: Reply) -> bytes:
    """The encoded reply, or its plain protobuf if encoding fails (the server can read it).

    A reply to a command that could not be decoded has no command id, which the strict
    encoder refuses; it is sent as the plain protobuf.
    """
    if not reply.command_id:
        return reply.SerializeToString()
    try:
        return encode_reply(reply)
    except Exception:
        log.exception("encoding an error reply failed")
        return reply.SerializeToString()


def crashed_reply(device_id: str, data: bytes, deliveries: int, message_id: str) -> bytes:
    """The error reply to a command refused because running it killed the worker before.

    It carries the command's id and result ids (when the command decodes) so the server's
    futures fail with a :class:`~schemas.errors.PlanExecutionError` instead of waiting.
    """
    try:
        command: Command | None = decode_command(data)
    except Exception:
        command = None
    command_id = command.command_id if command is not None else message_id
    plan_id = command.run_plan.plan_id if command and command.HasField("run_plan") else None
    exc = PlanExecutionError(
        f"command {command_id} was delivered {deliveries} times and the worker died running "
        f"it {deliveries - 1} times; it was not run again and went to the dead-letter queue. "
        "Look for an op or input that exhausts the device's memory or crashes torch, and "
        "send a corrected command",
        device_id=device_id,
        plan_id=plan_id or None,
    )
    result_ids = result_ids_of(command) if command is not None else []
    return encode_safely(error_reply(device_id, command_id, result_ids, exc))


def own_result(tensor: torch.Tensor, state_ids: set[int]) -> torch.Tensor:
    """A plan's result tensor cut from the plan's graph, copied if it is live plan state."""
    out = tensor.detach()
    if id(tensor) in state_ids:
        out = out.clone()
    return out.requires_grad_(tensor.requires_grad) if out.is_floating_point() else out
