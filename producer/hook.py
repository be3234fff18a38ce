"""``fp.hook(torch)``: opt-in ``Tensor.tag`` and ``Tensor.send`` methods, as in PySyft."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from producer.sending import send
from producer.tagging import tag

if TYPE_CHECKING:
    from producer.device import Device
    from producer.pointers import PointerTensor

_MARK = "_fedplan_hooked"


def _tensor_tag(self: torch.Tensor, *tags: str) -> torch.Tensor:
    return tag(self, *tags)


def _tensor_send(self: torch.Tensor, device: Device) -> PointerTensor:
    return send(self, device)


def hook(torch_module: ModuleType = torch) -> ModuleType:
    """Add ``Tensor.tag(*tags)`` and ``Tensor.send(device)`` to torch; calling it again is harmless.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> _ = fp.hook(torch)
    >>> fp.tags_of(torch.tensor([1.0]).tag("input_data"))
    ('input_data',)
    """
    tensor_cls: Any = torch_module.Tensor
    if getattr(tensor_cls, _MARK, False):
        return torch_module
    for name in ("tag", "send"):
        if hasattr(tensor_cls, name):
            raise AttributeError(
                f"torch.Tensor already has {name!r}; fp.hook would hide it. Use fp.tag and "
                "fp.send instead"
            )
    tensor_cls.tag = _tensor_tag
    tensor_cls.send = _tensor_send
    setattr(tensor_cls, _MARK, True)
    return torch_module
