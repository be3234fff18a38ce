"""Torch ops on pointers: each runs on the pointers' device as one ``RunOp`` command."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from producer.plans.refusals import is_inplace
from producer.plans.seams import PlanHost, RemoteTensor
from schemas import allowlist
from schemas.errors import OpNotAllowedError, PlanInputError
from schemas.tree import tree_leaves

_RETURNS_NONE = frozenset({"Tensor.backward", "torch._C._set_grad_enabled"})
"""Ops whose result is ``None``: the call waits for the device and returns ``None``."""

TorchDispatch = Callable[[Callable[..., Any], Sequence[Any], Mapping[str, Any]], Any]
"""``dispatch(func, args, kwargs)``: where a class sends the torch calls it takes over."""


def torch_function_calling(dispatch: TorchDispatch) -> classmethod[Any, ..., Any]:
    """A ``__torch_function__`` classmethod that hands every torch call to ``dispatch``.

    Examples
    --------
    >>> import torch
    >>> class Echo:
    ...     __torch_function__ = torch_function_calling(lambda f, a, k: f.__name__)
    >>> torch.abs(Echo())
    'abs'
    """

    def torch_function(
        cls: type,
        func: Callable[..., Any],
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        return dispatch(func, args, kwargs or {})

    return classmethod(torch_function)


def op_name(func: Callable[..., Any]) -> str:
    """The allow-list name of a torch function or tensor method (``Tensor.add``, ``torch.abs``)."""
    name = allowlist.name_of(func)
    if name is None:
        raise OpNotAllowedError(
            f"{func!r} is not an allow-listed op; devices will not run it. Use allowed torch "
            "ops, or get() the tensor and compute locally"
        )
    return name


def run_torch_function(
    func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> Any:
    """``__torch_function__`` of ``PointerTensor``: run ``func`` where the pointers live."""
    return run_remote(op_name(func), args, kwargs)


def tensor_method(pointer: RemoteTensor, name: str) -> Any:
    """``ptr.<name>``: an allow-listed tensor method bound to the pointer, or a property read.

    A property (``ptr.grad``, ``ptr.data``) is read on the device at once and comes back as
    a pointer to its value.
    """
    target = f"Tensor.{name}"
    if allowlist.is_allowed(f"{target}.__get__"):
        return run_remote(f"{target}.__get__", (pointer,), {})
    if not allowlist.is_allowed(target):
        raise AttributeError(
            f"PointerTensor has no attribute {name!r} ({target} is not an allow-listed op)"
        )
    return functools.partial(_method, target, pointer)


def _method(target: str, pointer: RemoteTensor, *args: Any, **kwargs: Any) -> Any:
    return run_remote(target, (pointer, *args), kwargs)


def run_remote(target: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Run one allow-listed op on the device that holds every pointer among the arguments.

    A sent module's parameters among the arguments must be swapped for their pointers first
    (``producer.compat.remote_module`` does).
    """
    if not allowlist.is_allowed(target):
        raise OpNotAllowedError(f"{target} is not in the allow-list; it cannot run on a device")
    device = _device_of((args, kwargs))
    result = device.run_op(target, args, kwargs)  # under no_grad here, no_grad there too
    if target in _RETURNS_NONE or target.endswith(".__set__"):
        result.wait()
        return None
    if is_inplace(target):
        result.wait()  # nobody reads an in-place op's result: report its failure here
    return result


def _device_of(values: Any) -> PlanHost:
    found = tree_leaves(values, keep=lambda v: isinstance(v, RemoteTensor))
    if not found:
        raise PlanInputError("a remote op needs at least one PointerTensor argument")
    first = found[0]
    for other in found[1:]:
        if other.location is not first.location:
            raise PlanInputError(
                f"pointers on different devices in one op: {first.id} on "
                f"{first.location.id!r} and {other.id} on {other.location.id!r}; move one "
                "with ptr.move(device) first"
            )
    return first.location
