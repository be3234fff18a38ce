"""The fedplan exception tree, shared by server and devices, and its wire error codes.

::

    FedplanError                      root: every fedplan failure; fields device_id, plan_id,
    │                                 plan_name, op_index (None where they do not apply)
    ├── PlanBuildError                tracing refused the function or the self-check failed
    ├── PlanNotBuiltError             (also RuntimeError) send/call of an unbuilt plan
    ├── PlanInputError                (also TypeError) wrong number/structure of arguments
    ├── PlanShapeError                (also ValueError) ndim/dtype/size the trace relied on
    ├── PlanGuardError                (also ValueError) a guard recorded at build broke
    ├── OpNotAllowedError             a plan names an op outside the allow-list
    ├── PlanExecutionError            an allowed op raised while the plan ran
    ├── ObjectNotFound                (also KeyError) no object/plan under that id
    ├── WireError                     a message could not be decoded
    │   └── SchemaVersionError        a message of a schema version this side does not speak
    ├── MessageRefused                a device's gate refused a message before running it
    ├── TimeLimitError                a command ran past the device's time limit
    ├── MemoryLimitError              (also MemoryError) a command passed its memory limit
    ├── PolicyError                   the device's owner policy refused the command
    ├── DeviceError                   anything else a device reported
    │   ├── StoreFullError            a device store bound (bytes, reply size) would be passed
    │   └── PlanTooLargeError         a plan over the device's op count or size limit
    ├── ReplyTimeout                  (also TimeoutError) no reply within the caller's timeout
    └── TransportError                the transport failed (broker down, publish refused)
        ├── DeviceNotFound            no queue for that device
        ├── BrokerUnavailable         cannot reach the broker
        └── PublishTimeout            (also TimeoutError) a publish outlived confirm_timeout

Every class has a stable wire ``code`` (unique: a class defining a code another class has
is refused at import, and every subclass, wherever it is defined, is registered under its
code); a device turns an exception into ``(code, message,
fields)`` and the server raises the same class again with :func:`error_from_code`.

Example
-------
>>> err = error_from_code("GUARD_FAILED", "guard failed at f.py:3", device_id="d1")
>>> isinstance(err, PlanGuardError), err.device_id
(True, 'd1')
"""

from __future__ import annotations

from typing import Any, ClassVar

_BY_CODE: dict[str, type[FedplanError]] = {}
"""Every error class by its wire code (filled as classes are defined)."""


class FedplanError(Exception):
    """Root of every fedplan error; carries where it happened when known."""

    code: ClassVar[str] = "INTERNAL"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            other = _BY_CODE.setdefault(cls.code, cls)
            if other is not cls:
                raise TypeError(f"{cls.__name__}: wire code {cls.code!r} is {other.__name__}'s")

    def __init__(
        self,
        message: str = "",
        *,
        device_id: str | None = None,
        plan_id: str | None = None,
        plan_name: str | None = None,
        op_index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.device_id = device_id
        self.plan_id = plan_id
        self.plan_name = plan_name
        self.op_index = op_index

    def fields(self) -> dict[str, Any]:
        """The location fields that are set, for logging and the wire."""
        names = ("device_id", "plan_id", "plan_name", "op_index")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def __str__(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.fields().items())
        return f"{self.message} [{where}]" if where else self.message

    def __reduce__(self) -> tuple[Any, ...]:  # keep fields when copied across threads
        return (_rebuild, (type(self), self.message, self.fields()))


_BY_CODE[FedplanError.code] = FedplanError


def _rebuild(cls: type[FedplanError], message: str, fields: dict[str, Any]) -> FedplanError:
    return cls(message, **fields)


class PlanBuildError(FedplanError):
    """Tracing refused the function, or the build self-check found a difference."""

    code = "BUILD_FAILED"


class PlanNotBuiltError(FedplanError, RuntimeError):
    """A plan was sent or run before being built (the message alone, as PySyft printed it)."""

    code = "NOT_BUILT"

    def __str__(self) -> str:
        return self.message


class PlanInputError(FedplanError, TypeError):
    """The call's arguments do not match the plan's inputs (count, structure, constants)."""

    code = "BAD_INPUT"


class PlanShapeError(FedplanError, ValueError):
    """An input breaks what the trace relied on: number of dims, a dtype or a size."""

    code = "BAD_SHAPE"


class PlanGuardError(FedplanError, ValueError):
    """A guard recorded during tracing does not hold for this call."""

    code = "GUARD_FAILED"


class OpNotAllowedError(FedplanError):
    """A plan or command names an op that is not in the allow-list."""

    code = "OP_NOT_ALLOWED"


class PlanExecutionError(FedplanError):
    """An allowed op raised while the plan ran."""

    code = "EXECUTION_FAILED"


class ObjectNotFound(FedplanError, KeyError):
    """No object or plan is stored under the id asked for."""

    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would repr() the message
        return FedplanError.__str__(self)


class WireError(FedplanError):
    """A message could not be decoded."""

    code = "DECODE_FAILED"


class SchemaVersionError(WireError):
    """A message uses a schema version this side does not speak."""

    code = "UNSUPPORTED_SCHEMA"


class DeviceError(FedplanError):
    """A device reported a failure that has no more specific class."""

    code = "DEVICE_ERROR"


class TransportError(FedplanError):
    """The transport failed: broker unreachable, publish refused, connection lost."""

    code = "TRANSPORT"


class DeviceNotFound(TransportError):
    """There is no device (no queue) under that id."""

    code = "DEVICE_NOT_FOUND"


class BrokerUnavailable(TransportError):
    """The broker cannot be reached."""

    code = "BROKER_UNAVAILABLE"


class MessageRefused(FedplanError):
    """A device's gate refused a message before running it: a forbidden header, content
    type, encoding or size; the message went to the dead-letter queue unrun."""

    code = "MESSAGE_REFUSED"


class TimeLimitError(FedplanError):
    """A command ran past the device's time limit and was stopped (no result was kept)."""

    code = "TIME_LIMIT"


class MemoryLimitError(FedplanError, MemoryError):
    """A command needed more memory than the device lets it use (its pool process's memory
    limit, ``FEDPLAN_POOL_MEMORY_LIMIT``, or the policy's ``max_alloc_bytes`` budget while it
    ran); it was stopped and kept no result. The device serves on."""

    code = "MEMORY_LIMIT"


class ReplyTimeout(FedplanError, TimeoutError):
    """No reply came within the caller's timeout (also a builtin ``TimeoutError``).

    The command may still run; its reply, if it comes later, is kept (see
    ``producer.remote.collector``) and can be claimed by its command or result id.
    """

    code = "REPLY_TIMEOUT"


class PublishTimeout(TransportError, TimeoutError):
    """A publish was not confirmed by the broker within ``confirm_timeout``.

    Only that call fails; the transport stays usable. The rest of a chunked command is not
    sent, but pieces the broker already took (or a single message) may still arrive.
    """

    code = "PUBLISH_TIMEOUT"


class StoreFullError(DeviceError):
    """A command would take the device store over one of its bounds; it changed nothing."""

    code = "STORE_FULL"


class PlanTooLargeError(DeviceError):
    """A plan has more ops, or more encoded bytes, than the device accepts."""

    code = "PLAN_TOO_LARGE"


class AuditUnavailable(DeviceError):
    """The device could not record the command in its audit log, so it sent nothing of its
    results (the command's effects are kept: sent again with the same command id once the
    log works, it gets its reply)."""

    code = "AUDIT_UNAVAILABLE"


class PolicyError(FedplanError, PermissionError):
    """The device's policy (its owner's rules) refused the command: the message names the
    object, the producer and the rule (``fedplan device policy`` on the device shows them)."""

    code = "POLICY_REFUSED"


class LoopLimitError(PlanInputError):
    """A plan's loop would run more steps than the device allows (``FEDPLAN_MAX_LOOP_STEPS``:
    epochs times batches per epoch); nothing ran. Also a ``PlanInputError``."""

    code = "LOOP_LIMIT"


def error_from_code(code: str, message: str, **fields: Any) -> FedplanError:
    """The exception for a wire error code (``DeviceError`` for codes this side lacks)."""
    cls = _BY_CODE.get(code, DeviceError)
    return cls(message, **{k: v for k, v in fields.items() if v is not None})
