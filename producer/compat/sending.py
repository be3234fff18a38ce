"""``fp.send``: copy a local tensor or module to a device, or give a device a pointer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, overload

import torch
from torch import nn

from producer.compat.remote_module import send_module
from producer.plans.plan import Plan
from producer.remote.pointers import PointerTensor

if TYPE_CHECKING:
    from producer.remote.device import Device

M = TypeVar("M", bound=nn.Module)


@overload
def send(obj: torch.Tensor, device: Device) -> PointerTensor: ...
@overload
def send(obj: PointerTensor, device: Device) -> PointerTensor: ...
@overload
def send(obj: M, device: Device) -> M: ...


def send(obj: Any, device: Device) -> Any:
    """Send ``obj`` to ``device``; local and remote copies are independent afterwards.

    - a tensor: a copy (with its tags) is stored on the device; returns a ``PointerTensor``;
    - an ``nn.Module``: its parameters and buffers go to the device and the same module
      object is returned, now computing there (``fp.get_module`` brings it back);
    - a built ``fp.Plan``: stored on the device like ``plan.send(device)``; returns a
      ``PointerPlan``;
    - a ``PointerTensor``: the device gets a pointer to that pointer's object (the value
      stays where it is); returns a pointer to that pointer.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> with fp.connect() as fleet:
    ...     ptr = fp.send(torch.tensor([1, 2, 3]), fleet.device("bob"))
    ...     ptr.get()
    tensor([1, 2, 3])
    """
    if isinstance(obj, PointerTensor):
        return device.send_pointer(obj)
    if isinstance(obj, Plan):
        return obj.send(device)  # a plan is stored whole and returns a PointerPlan
    if isinstance(obj, nn.Module):
        return send_module(obj, device)
    return device.send_tensor(obj)
