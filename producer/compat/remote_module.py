"""``model.send(device)``: an ``nn.Module`` whose parameters and buffers live on a device."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from producer.remote.ops import run_remote, torch_function_calling
from producer.remote.pointers import POINTER_ATTR, PointerTensor, pointer_of
from schemas import allowlist
from schemas.errors import OpNotAllowedError, PlanInputError
from schemas.tree import tree_map

if TYPE_CHECKING:
    from producer.remote.device import Device

M = TypeVar("M", bound=nn.Module)

_LOCAL = frozenset(
    {
        "Tensor.shape.__get__", "Tensor.dtype.__get__", "Tensor.device.__get__",
        "Tensor.is_leaf.__get__", "Tensor.requires_grad.__get__", "Tensor.is_sparse.__get__",
        "Tensor.layout.__get__",
        "Tensor.ndim.__get__", "Tensor.is_cpu.__get__", "Tensor.is_cuda.__get__",
        "Tensor.itemsize.__get__", "Tensor.nbytes.__get__", "Tensor.size", "Tensor.dim",
        "Tensor.numel", "Tensor.nelement", "Tensor.is_complex", "Tensor.is_floating_point",
        "torch.is_complex", "torch.is_floating_point", "torch.numel",
    }
)  # fmt: skip
"""Metadata a remote parameter answers from its local twin (same shape and dtype)."""

_LOCAL_SPECIAL: dict[Callable[..., Any], Callable[..., Any]] = {
    torch.Tensor.__hash__: id,  # optimizers key their state by parameter
    torch.Tensor.__repr__: lambda t, *a, **k: _describe(t),
    torch.Tensor.__format__: lambda t, *a, **k: _describe(t),
}


def _describe(tensor: torch.Tensor) -> str:
    pointer = pointer_of(tensor)
    where = "?" if pointer is None else f"{pointer.location.id}:{pointer.id}"
    with torch._C.DisableTorchFunctionSubclass():
        return f"(remote {type(tensor).__name__} -> {where}, shape {tuple(tensor.shape)})"


def _dispatch(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """Run a torch call on remote parameters: metadata locally, everything else on the device."""
    special = _LOCAL_SPECIAL.get(func)
    if special is not None:
        return special(*args, **kwargs)
    name = allowlist.name_of(func)
    if name in _LOCAL:
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    if name is None:
        raise OpNotAllowedError(
            f"{func!r} is not an allow-listed op, and this tensor's value lives on a device; "
            "bring the module back with model.get() (fp.get_module) first"
        )
    if name == "Tensor.requires_grad_":
        with torch._C.DisableTorchFunctionSubclass():  # mirror it: requires_grad is read here
            func(*args, **kwargs)
    args, kwargs = tree_map(_swap, (tuple(args), dict(kwargs)))  # parameters -> pointers
    if name == "Tensor.grad.__get__":
        # ``if p.grad is not None`` (optimizers) needs to know whether a gradient exists
        return run_remote(name, args, kwargs).resolved()
    return run_remote(name, args, kwargs)


def _swap(value: Any) -> Any:
    pointer = pointer_of(value)
    return value if pointer is None else pointer


class RemoteParameter(nn.Parameter):
    """A module parameter whose value lives on a device (the class it has while sent).

    Torch calls on it run on the device (one command each, like pointers); shape and dtype
    are answered locally. ``fp.get_module`` turns it back into a plain ``nn.Parameter``.
    """

    __torch_function__ = torch_function_calling(_dispatch)


class RemoteBuffer(torch.Tensor):
    """A module buffer whose value lives on a device (see :class:`RemoteParameter`)."""

    __torch_function__ = torch_function_calling(_dispatch)


class SentModule:
    """Mixed into a module's class while it is sent: ``model.get()`` brings it back.

    ``fp.send(model, dev)`` returns the same module object, now an instance of a subclass
    of its own class (``isinstance`` checks and the module's methods are unchanged);
    ``get()`` restores the class as ``fp.get_module`` does.
    """

    def get(self, *, with_grads: bool = True) -> Any:
        """Bring the parameters back from the device (``fp.get_module(self)``)."""
        assert isinstance(self, nn.Module)
        return get_module(self, with_grads=with_grads)


_SENT_CLASSES: dict[type, type] = {}


def _mark_sent(module: nn.Module) -> None:
    cls = type(module)
    if issubclass(cls, SentModule):
        return
    sent = _SENT_CLASSES.get(cls)
    if sent is None:
        body = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        sent = _SENT_CLASSES.setdefault(cls, type(cls.__name__, (cls, SentModule), body))
    module.__class__ = sent


def _mark_local(module: nn.Module) -> None:
    cls = type(module)
    if issubclass(cls, SentModule) and cls in _SENT_CLASSES.values():
        module.__class__ = cls.__bases__[0]


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of the module once (shared ones once)."""
    seen: set[int] = set()
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def is_remote(module: nn.Module) -> bool:
    """Whether the module's parameters currently live on a device."""
    return any(pointer_of(t) is not None for t in _tensors(module))


def location_of(module: nn.Module) -> Device | None:
    """The device holding the module's parameters, or ``None`` when it is local."""
    for tensor in _tensors(module):
        pointer = pointer_of(tensor)
        if pointer is not None:
            return pointer.location
    return None


def send_module(module: M, device: Device) -> M:
    """Put the module's parameters and buffers on ``device``; the module object stays the same.

    Each parameter keeps its identity (an optimizer made before still updates it) but its
    value lives on the device: a forward pass with pointer inputs, ``loss.backward()`` and
    ``optimizer.step()`` run there, op by op. A module already on another device is moved
    there directly (device to device); on the same device nothing is sent. A sent module
    that is dropped without ``get`` has its remote copies deleted (with the next command).
    The returned module has ``get()`` (as in the seeds) until it is brought back.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> from torch import nn
    >>> with fp.connect() as fleet:
    ...     bob = fleet.device("bob")
    ...     model = nn.Linear(2, 1)
    ...     _ = model.weight.data.fill_(1.0), model.bias.data.fill_(0.5)
    ...     _ = fp.send(model, bob)
    ...     out = model(fp.send(torch.tensor([[1.0, 2.0]]), bob))
    ...     result = out.get().detach()
    ...     model.get() is model
    True
    >>> result
    tensor([[3.5000]])
    """
    current = location_of(module)
    if current is not None:
        return move_module(module, device)
    for tensor in _tensors(module):
        value = tensor.detach().requires_grad_(tensor.requires_grad)
        pointer = device.send_tensor(value, owned=True)  # a dropped module frees the device
        setattr(tensor, POINTER_ATTR, pointer)
        tensor.__class__ = RemoteParameter if isinstance(tensor, nn.Parameter) else RemoteBuffer
    for tensor in _tensors(module):
        _pointer(tensor).wait()  # a refused parameter fails here, not at the first forward
    _mark_sent(module)
    return module


def get_module(module: M, *, with_grads: bool = True) -> M:
    """Bring the parameters (and their gradients) back into the module; the device drops them.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> from torch import nn
    >>> with fp.connect() as fleet:
    ...     model = nn.Linear(2, 1)
    ...     before = model.weight.detach().clone()
    ...     _ = fp.get_module(fp.send(model, fleet.device("bob")))
    ...     torch.equal(model.weight.detach(), before)
    True
    """
    remote = [t for t in _tensors(module) if pointer_of(t) is not None]
    grads: dict[int, PointerTensor] = {}
    if with_grads:
        for tensor in remote:
            if isinstance(tensor, nn.Parameter) and tensor.requires_grad:
                grads[id(tensor)] = run_remote("Tensor.grad.__get__", (_pointer(tensor),), {})
    values = {id(t): _pointer(t).get() for t in remote}
    for tensor in remote:
        grad = grads.get(id(tensor))
        grad_value = None if grad is None else grad.resolved()
        if grad is not None and grad_value is not None:
            grad_value = grad_value.get()
        delattr(tensor, POINTER_ATTR)
        tensor.__class__ = nn.Parameter if isinstance(tensor, nn.Parameter) else torch.Tensor
        with torch.no_grad():
            tensor.data = values[id(tensor)].detach()
            if isinstance(tensor, nn.Parameter):
                tensor.grad = grad_value.detach() if isinstance(grad_value, torch.Tensor) else None
    _mark_local(module)
    return module


def move_module(module: M, device: Device) -> M:
    """Move a sent module's parameters to another device, device to device."""
    for tensor in _tensors(module):
        pointer = pointer_of(tensor)
        if pointer is None:
            raise PlanInputError(
                "this module is not on a device; send it with fp.send(model, device) first"
            )
        if pointer.location is not device:
            pointer.move(device)
    return module


def copy_module(module: M) -> M:
    """An independent deep copy of a local module (the seeds' ``model.copy()``)."""
    if is_remote(module):
        raise PlanInputError(
            "cannot copy a module whose parameters live on a device; copy it before sending, "
            "or get() it back first"
        )
    return copy.deepcopy(module)


def _pointer(tensor: torch.Tensor) -> PointerTensor:
    pointer = pointer_of(tensor)
    assert pointer is not None
    return pointer


__all__ = [
    "RemoteBuffer",
    "RemoteParameter",
    "SentModule",
    "copy_module",
    "get_module",
    "is_remote",
    "location_of",
    "move_module",
    "send_module",
]
