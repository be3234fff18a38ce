"""Tags and descriptions on local tensors, sent along when the tensor goes to a device."""

from __future__ import annotations

from typing import TypeVar

import torch

T = TypeVar("T", bound=torch.Tensor)

_TAGS = "_fedplan_tags"
_DESCRIPTION = "_fedplan_description"


def tag(tensor: T, *tags: str) -> T:
    """Add tags to a tensor (kept on the tensor object) and return the same tensor.

    Examples
    --------
    >>> import torch
    >>> x = tag(torch.tensor([-1, 2.0]), "input_data")
    >>> tags_of(x)
    ('input_data',)
    """
    for t in tags:
        if not isinstance(t, str) or not t:
            raise TypeError(f"a tag is a non-empty string, got {t!r}")
    current = tags_of(tensor)
    setattr(tensor, _TAGS, current + tuple(t for t in tags if t not in current))
    return tensor


def describe(tensor: T, description: str) -> T:
    """Attach a description to a tensor and return the same tensor."""
    setattr(tensor, _DESCRIPTION, str(description))
    return tensor


def tags_of(tensor: torch.Tensor) -> tuple[str, ...]:
    """The tags given to a tensor with :func:`tag` (empty when none)."""
    return tuple(getattr(tensor, _TAGS, ()))


def description_of(tensor: torch.Tensor) -> str:
    """The description given with :func:`describe` (empty when none)."""
    return str(getattr(tensor, _DESCRIPTION, ""))
