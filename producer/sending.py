"""``fp.send``: copy a local tensor to a device and get a pointer to the copy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from producer.device import Device
    from producer.pointers import PointerTensor


def send(tensor: torch.Tensor, device: Device) -> PointerTensor:
    """Store a copy of ``tensor`` (with its tags) on ``device``; local and remote are independent.

    Examples
    --------
    >>> import torch
    >>> import producer as fp
    >>> with fp.connect() as fleet:
    ...     ptr = fp.send(torch.tensor([1, 2, 3]), fleet.device("bob"))
    ...     ptr.get()
    tensor([1, 2, 3])
    """
    return device.send_tensor(tensor)
