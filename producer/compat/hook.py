"""``fp.hook(torch)``: opt-in PySyft-style methods on tensors, modules and datasets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from producer.compat.federated_data import FederatedDataset, federate
from producer.compat.remote_module import copy_module, get_module, move_module
from producer.compat.sending import send
from producer.remote.tagging import tag

if TYPE_CHECKING:
    from producer.remote.device import Device
    from producer.remote.pointers import PointerTensor

_MARK = "_fedplan_hooked"


def _tensor_tag(self: torch.Tensor, *tags: str) -> torch.Tensor:
    return tag(self, *tags)


def _tensor_send(self: torch.Tensor, device: Device) -> PointerTensor:
    return send(self, device)


def _module_send(self: nn.Module, device: Device) -> nn.Module:
    return send(self, device)


def _dataset_federate(self: Dataset[Any], devices: Sequence[Device]) -> FederatedDataset:
    return federate(self, devices)


_METHODS: tuple[tuple[type, str, Callable[..., Any]], ...] = (
    (torch.Tensor, "tag", _tensor_tag),
    (torch.Tensor, "send", _tensor_send),
    (nn.Module, "send", _module_send),
    (nn.Module, "get", get_module),
    (nn.Module, "move", move_module),
    (nn.Module, "copy", copy_module),
    (Dataset, "federate", _dataset_federate),
)


def hook(torch_module: ModuleType = torch) -> ModuleType:
    """Add PySyft's methods to torch; calling it again is harmless.

    ``Tensor.tag(*tags)``, ``Tensor.send(device)``; ``Module.send(device)``,
    ``Module.get()``, ``Module.move(device)``, ``Module.copy()``; and
    ``Dataset.federate(devices)``. Without the hook use ``fp.tag``, ``fp.send``,
    ``fp.get_module``, ``fp.move_module``, ``fp.copy_module`` and ``fp.federate``.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> _ = fp.hook(torch)
    >>> fp.tags_of(torch.tensor([1.0]).tag("input_data"))
    ('input_data',)
    """
    if torch_module is not torch:
        raise TypeError("fp.hook takes the torch module: fp.hook(torch)")
    if getattr(torch.Tensor, _MARK, False):
        return torch_module
    for owner, name, _ in _METHODS:
        if hasattr(owner, name):
            raise AttributeError(
                f"{owner.__qualname__} already has {name!r}; fp.hook would hide it. Use the "
                "fp.* functions instead"
            )
    for owner, name, method in _METHODS:
        setattr(owner, name, method)
    setattr(torch.Tensor, _MARK, True)
    return torch_module
