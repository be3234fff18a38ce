"""What plans need of devices, as types: ``producer/remote`` implements them, plans never import it.

- :class:`RemoteTensor`: the base class of tensors held on a device (``PointerTensor``); a plan
  called with one runs on its device, so ``isinstance(value, RemoteTensor)`` is how it tells.
- :class:`PlanHost`: a device as a plan and a torch op on pointers see it.
- :class:`BuiltPlan`: a plan as a device sees it (``fp.Plan`` is one).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from schemas.ir import PlanIR


class BuiltPlan(Protocol):
    """What a device needs of a plan to store and run it."""

    @property
    def id(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def is_built(self) -> bool: ...

    @property
    def ir(self) -> PlanIR: ...

    @property
    def structure(self) -> PlanIR: ...

    def load_state(self, values: Mapping[str, torch.Tensor]) -> None: ...

    def bind_arguments(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]: ...


class SentPlan(Protocol):
    """A plan stored on a device: calling it runs the plan there."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


class PlanHost(Protocol):
    """A device, as plans (``Plan.send``) and torch ops on pointers use it."""

    @property
    def id(self) -> str: ...

    def send_plan(self, plan: BuiltPlan, *, wait: bool = True, force: bool = False) -> SentPlan:
        """Store a built plan on the device (once)."""
        ...

    def run_op(self, target: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """Run one allow-listed op on the device's objects; a pointer to the result."""
        ...


class RemoteTensor(abc.ABC):
    """A tensor held by a device: where it is, its shape and dtype (metadata, no value).

    Examples
    --------
    >>> import producer as fp
    >>> issubclass(fp.PointerTensor, RemoteTensor)
    True
    """

    id: str
    location: PlanHost

    @property
    @abc.abstractmethod
    def shape(self) -> torch.Size:
        """The remote tensor's shape."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype | None:
        """The remote tensor's dtype (``None`` for a Python value)."""
