"""Keep stored objects from sharing memory with anything a later command may write through.

A tensor an op or plan returns may be a view of (or the very tensor of) one of its
arguments, of a plan's state or of its constants, and so share memory with it: an in-place
op on one changes the other without naming it. Three rules keep that from carrying private
values or changing what a producer may not change:

- the device's own data is handed to ops and plans as a copy (producers use it, never
  change it, not even through a view);
- a plan result that shares memory with the plan's state or constants is copied before it
  is stored (a producer cannot change a stored, possibly approved, plan through it);
- objects of a producer that share memory with an object an op or plan wrote private
  values into are marked private too (``TenantRules._taint_arguments``), so a view keeps
  following its base as in eager torch, and the taint follows the values.

Example
-------
>>> import torch
>>> x = torch.zeros(2)
>>> [r] = unshared([x.view(-1)], storages_of([x]))
>>> _ = r.add_(1)
>>> x
tensor([0., 0.])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def storage_of(tensor: torch.Tensor) -> int:
    """An identity of the memory a tensor lives in (shared by all its views; 0 when it
    holds no memory, e.g. an empty tensor)."""
    return int(tensor.untyped_storage().data_ptr())


def storages_of(tensors: Iterable[Any]) -> set[int]:
    """The storages of the tensors among ``tensors`` (other values, empty ones skipped)."""
    return {storage_of(t) for t in tensors if isinstance(t, torch.Tensor)} - {0}


def unshared(results: list[Any], storages: set[int]) -> list[Any]:
    """``results`` with every tensor that lives in one of ``storages`` replaced by a copy."""
    return [
        r.clone()  # a copy (still in the autograd graph, as the op's result was)
        if isinstance(r, torch.Tensor) and storage_of(r) in storages
        else r
        for r in results
    ]


__all__ = ["storage_of", "storages_of", "unshared"]
