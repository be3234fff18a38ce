"""Pointers: server-side handles to tensors and plans that live on a device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from producer.plans.seams import BuiltPlan, RemoteTensor
from producer.remote.collector import PendingCommand
from producer.remote.ops import (
    run_remote,
    run_torch_function,
    tensor_method,
    torch_function_calling,
)
from schemas.command_pb2 import ObjectInfo
from schemas.errors import ObjectNotFound, PlanInputError, PolicyError
from schemas.tensor_codec import dtype_from_name, tensor_from_proto
from schemas.value_codec import value_from_proto
from schemas.wire import new_id

if TYPE_CHECKING:
    from producer.remote.device import Device

POINTER_ATTR = "_fedplan_pointer"
"""Attribute of a local tensor (a sent module's parameter) naming its remote pointer."""


def pointer_of(value: Any) -> PointerTensor | None:
    """The pointer behind a sent module's parameter or buffer; ``None`` for anything else."""
    if isinstance(value, torch.Tensor):
        pointer = value.__dict__.get(POINTER_ATTR)
        return pointer if isinstance(pointer, PointerTensor) else None
    return None


class PointerTensor(RemoteTensor):
    """A handle to a tensor (or a plan's Python result) stored on a device under ``id``.

    Pointers to results exist before the device has run anything: their metadata (shape,
    dtype) arrives with the reply and reading it blocks until then. ``get()`` brings the
    value back and removes the remote copy. A result of a plan or op whose pointer is
    dropped without ``get()`` is deleted from the device (with the next command sent);
    objects sent or found with ``search`` stay until deleted.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> with fp.connect() as fleet:
    ...     bob = fleet.device("bob")
    ...     x = bob.send_tensor(torch.tensor([1, 2, 3]))
    ...     y = bob.send_tensor(torch.tensor([5, 4, 3]))
    ...     (x + y).get()
    tensor([6, 6, 6])
    """

    def __init__(
        self,
        id: str,
        location: Device,
        *,
        pending: PendingCommand | None = None,
        info: ObjectInfo | None = None,
        tags: tuple[str, ...] = (),
        shape: torch.Size | None = None,
        dtype: torch.dtype | None = None,
        description: str = "",
        owned: bool = False,
    ) -> None:
        self.id = id
        self.location: Device = location
        self.pointer_id = new_id()
        self.tags = tags
        self.description = description
        self._shape = shape
        self._shape_withheld = False
        self._dtype = dtype
        self._kind = "tensor"
        self._pending = pending
        self._value: Any = None
        self._has_value = False
        self._stale = False  # a later command named this object: a value in its reply is old
        self._gone = False
        self._owned = owned  # a result this pointer created: deleted remotely when dropped
        self._points_to: tuple[str, str] | None = None  # kind "pointer": (device, object id)
        if info is not None:
            self._take(info)

    # -- metadata ----------------------------------------------------------------------------

    def _take(self, info: ObjectInfo, pending: PendingCommand | None = None) -> None:
        self._kind = info.kind or "tensor"
        if info.tags:
            self.tags = tuple(info.tags)
        self.description = info.description or self.description
        if self._kind == "value":
            self._value = value_from_proto(info.python_value)
            self._has_value = True
            return
        if self._kind == "pointer":
            self._points_to = (info.points_to_device, info.points_to_id)
        self._shape_withheld = info.shape_withheld
        self._shape = None if info.shape_withheld else torch.Size(info.shape)
        self._dtype = dtype_from_name(info.dtype)
        if info.has_value and not self._stale:
            self._value = pending.tensor(info) if pending else tensor_from_proto(info.value)
            self._has_value = True

    def _drop_carried_value(self) -> None:
        """Forget a tensor value that came with the reply: a later command may change it."""
        self._stale = True
        if self._kind != "value":  # a Python result lives only here, never on the device
            self._value, self._has_value = None, False

    def wait(self, timeout: float | None = None) -> PointerTensor:
        """Block until the device has produced this object; raise its typed error if it failed."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                self._take(pending.object_info(self.id, self._timeout(timeout)), pending)
            except BaseException:
                self._pending = pending  # waiting again raises the same error
                raise
            if all(r == self.id for r in pending.result_ids):
                self.location.release(pending.command_id)
        return self

    def raise_if_failed(self) -> None:
        """Raise the device's error now if the command producing this object already failed."""
        pending = self._pending
        if pending is not None and pending.done() and pending.exception() is not None:
            self.wait()

    def resolved(self, timeout: float | None = None) -> Any:
        """Wait; a Python result (``None``, a number) comes back as itself, a tensor as ``self``.

        ``ptr.grad.resolved() is None`` tells whether the remote tensor has a gradient.
        """
        self.wait(timeout)
        return self.get() if self._kind == "value" else self

    @property
    def ready(self) -> bool:
        """Whether the reply for this object has arrived (success or error)."""
        return self._pending is None or self._pending.done()

    @property
    def shape(self) -> torch.Size:
        """The remote tensor's shape (waits for the device's reply if needed)."""
        self.wait()
        if self._shape is None:
            if self._shape_withheld:
                raise PolicyError(
                    f"device {self.location.id!r} withholds the shape of {self.id!r}: it was "
                    "derived from private data, and a shape can depend on the values "
                    "(docs/security.md); an approved plan's outputs carry their shapes",
                    device_id=self.location.id,
                )
            raise TypeError(f"object {self.id!r} is a Python value, not a tensor")
        return self._shape

    @property
    def known_shape(self) -> torch.Size | None:
        """The shape if the device said it (``None``: a Python value, or withheld because
        the value was derived from private data), without raising."""
        self.wait()
        return self._shape

    @property
    def dtype(self) -> torch.dtype | None:
        """The remote tensor's dtype (waits for the device's reply if needed)."""
        self.wait()
        return self._dtype

    @property
    def is_sparse(self) -> bool:
        """Always ``False``: devices hold dense tensors."""
        return False

    @property
    def layout(self) -> torch.layout:
        """Always ``torch.strided``: devices hold dense tensors."""
        return torch.strided

    def is_complex(self) -> bool:
        """Whether the remote dtype is complex (from metadata, no command)."""
        return bool(self.dtype is not None and self.dtype.is_complex)

    def is_floating_point(self) -> bool:
        """Whether the remote dtype is floating point (from metadata, no command)."""
        return bool(self.dtype is not None and self.dtype.is_floating_point)

    def size(self, dim: int | None = None) -> Any:
        """Like ``Tensor.size``: the shape, or one dimension of it."""
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Any:
        raise TypeError("a PointerTensor cannot be iterated here; get() it or use unbind")

    def __bool__(self) -> bool:
        raise TypeError(
            "the truth value of a remote tensor is on the device; get() it first "
            "(a plan records such a branch as a guard)"
        )

    # -- values ------------------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> Any:
        """Bring the value back and remove it from the device; a second ``get`` raises.

        A small plan output came back with the plan's reply: ``get()`` then returns it at
        once and its remote copy is deleted with the next command sent to the fleet.
        Once any command has named this object (an in-place op, a move, another plan call),
        ``get()`` fetches the device's current value instead.

        Raises
        ------
        ObjectNotFound
            The object was already fetched, deleted, or never stored.
        """
        self.wait(timeout)
        if self._kind == "value":
            if self._gone:
                raise ObjectNotFound(
                    f"the value {self.id!r} was already fetched with get()",
                    device_id=self.location.id,
                )
            self._gone = True
            return self._value
        if self._has_value:
            value, self._value, self._has_value = self._value, None, False
            self.location.discard(self.id)  # rides the next command
        else:
            value = self.location.fetch(self.id, delete=True, timeout=self._timeout(timeout))
        self._gone = True
        return value

    @property
    def points_to(self) -> tuple[str, str] | None:
        """For a pointer to a pointer: the (device id, object id) it names; else ``None``."""
        self.wait()
        return self._points_to

    def send(self, device: Device) -> PointerTensor:
        """Give ``device`` a pointer to this object: a pointer to a pointer (seed 003).

        The value stays where it is; ``get()`` on the result returns a pointer to it, and
        ``remote_get()`` has the value sent straight to ``device`` (not through the server).
        """
        return device.send_pointer(self)

    def remote_get(self) -> PointerTensor:
        """For a pointer to a pointer: move the value it names to where the pointer is.

        The device holding the value publishes it to this pointer's device itself; this
        pointer then points at the value.
        """
        target = self.points_to
        if target is None:
            raise PlanInputError(
                f"{self.id} on {self.location.id!r} is not a pointer to a pointer; "
                "use get() or move() instead"
            )
        device_id, object_id = target
        source = self.location.peer(device_id)
        source.move_object(object_id, self.location, new_id=self.id, timeout=self._timeout(None))
        self._kind, self._points_to = "tensor", None
        return self

    def copy(self) -> PointerTensor:
        """A new, independent copy of the remote tensor on the same device."""
        return self.location.run_op("Tensor.clone", (self,), {})

    def move(self, device: Device) -> PointerTensor:
        """Move the object to another device (device to device, not through the server)."""
        self.location.move_object(self.id, device, timeout=self._timeout(None))
        self.location = device
        return self

    def delete(self) -> None:
        """Delete the remote object (nothing happens if it is gone already)."""
        self.location.delete_objects([self.id])
        self._gone = True

    def __del__(self) -> None:
        if self._owned and not self._gone:
            with contextlib.suppress(Exception):  # never raise from a finalizer
                self.location.discard(self.id)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.location.timeout if timeout is None else timeout

    # -- remote ops --------------------------------------------------------------------------

    __torch_function__ = torch_function_calling(run_torch_function)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return tensor_method(self, name)

    def __repr__(self) -> str:
        if self._pending is not None and self._pending.done():
            with contextlib.suppress(Exception):  # repr must not raise; get() reports it
                self.wait()
        text = f"[PointerTensor | me:{self.pointer_id} -> {self.location.id}:{self.id}]"
        if self.tags:
            text += "\n\tTags: " + " ".join(self.tags)
        if self._points_to is not None:
            text = text[:-1] + f" -> {self._points_to[0]}:{self._points_to[1]}]"
        if self._shape is not None:
            text += f"\n\tShape: {self._shape}"
        return text

    __str__ = __repr__


def _binary(name: str) -> Callable[[PointerTensor, Any], Any]:
    def op(self: PointerTensor, other: Any) -> Any:
        return run_remote(f"Tensor.{name}", (self, other), {})

    op.__name__ = name
    return op


def _unary(name: str) -> Callable[[PointerTensor], Any]:
    def op(self: PointerTensor) -> Any:
        return run_remote(f"Tensor.{name}", (self,), {})

    op.__name__ = name
    return op


for _name in (
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__matmul__", "__rmatmul__", "__pow__", "__rpow__", "__mod__",
    "__floordiv__", "__lt__", "__le__", "__gt__", "__ge__", "__and__", "__or__", "__xor__",
    "__iadd__", "__isub__", "__imul__", "__itruediv__", "__getitem__",
):  # fmt: skip
    setattr(PointerTensor, _name, _binary(_name))
for _name in ("__neg__", "__abs__", "__invert__", "__pos__"):
    setattr(PointerTensor, _name, _unary(_name))


class PointerPlan:
    """A plan stored on a device; calling it runs the plan there with one command.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> @fp.func2plan(args_shape=[(-1,)])
    ... def double_abs(x):
    ...     return torch.abs(x + x)
    >>> with fp.connect() as fleet:
    ...     device_1 = fleet.device("device_1")
    ...     pointer_plan = double_abs.send(device_1)
    ...     pointer_plan(device_1.send_tensor(torch.tensor([1.0, -2.0]))).get()
    tensor([2., 4.])
    """

    def __init__(
        self, plan: BuiltPlan, location: Device, *, pending: PendingCommand | None
    ) -> None:
        self.plan = plan
        self.id: str = plan.id
        self.location: Device = location
        self.pointer_id = new_id()
        self._pending = pending

    def wait(self, timeout: float | None = None) -> PointerPlan:
        """Block until the device has stored the plan; raise its typed error if it refused."""
        if self._pending is not None:
            self._pending.reply(self.location.timeout if timeout is None else timeout)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the plan on the device; returns pointers (in the plan's output structure) at once."""
        return self.run(*args, **kwargs)

    def run(self, *args: Any, return_values: bool = False, **kwargs: Any) -> Any:
        """Like calling the pointer plan; ``return_values`` puts the outputs in the reply.

        With ``return_values`` the results' ``get()`` needs no second round trip (the
        device still stores them until then).
        """
        if self._pending is not None and self._pending.done():
            self._pending.reply(0)  # a refused plan raises its error here, not a NOT_FOUND
        args, kwargs = self.plan.bind_arguments(args, kwargs)  # as the traced function binds
        return self.location.run_plan(self.plan, args, kwargs, return_values=return_values)

    def get(self, *, delete: bool = False, timeout: float | None = None) -> Any:
        """Bring the plan back with the device's current state loaded into the local plan."""
        self.wait(timeout)
        ir = self.location.fetch_plan(self.id, delete=delete, timeout=timeout)
        self.plan.load_state(ir.state_values)
        return self.plan

    def __repr__(self) -> str:
        return f"[PointerPlan | me:{self.pointer_id} -> {self.location.id}:{self.id}]"
