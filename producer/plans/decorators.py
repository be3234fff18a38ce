"""The decorators that make plans: ``func2plan`` for functions, ``method2plan`` for methods."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import Any, overload

import torch
from torch import nn

from producer.plans.plan import Plan, State
from schemas.errors import PlanBuildError, PlanShapeError


def _examples(
    args_shape: Sequence[Sequence[int]], names: Sequence[str]
) -> tuple[tuple[torch.Tensor, ...], list[tuple[int, ...]]]:
    """``torch.ones`` examples for ``args_shape`` (``-1`` -> size 2, symbolic on replay)."""
    examples, dynamic = [], []
    for index, shape in enumerate(args_shape):
        dims = _checked_shape(shape, names[index] if index < len(names) else f"args[{index}]")
        examples.append(torch.ones(tuple(2 if d == -1 else d for d in dims)))
        dynamic.append(tuple(i for i, d in enumerate(dims) if d == -1))
    return tuple(examples), dynamic


def _checked_shape(shape: Any, name: str) -> tuple[int, ...]:
    """The dims of one ``args_shape`` entry; ``PlanShapeError`` (a ``ValueError``) if invalid."""
    if isinstance(shape, str | bytes) or not isinstance(shape, Sequence):
        raise PlanShapeError(
            f"args_shape for argument {name!r} must be a sequence of sizes such as (-1, 3), "
            f"got {shape!r}"
        )
    for dim, size in enumerate(shape):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral):
            raise PlanShapeError(
                f"args_shape for argument {name!r}: dimension {dim} is {size!r}, not an "
                "integer; use a size >= 0, or -1 for any size"
            )
        if size < -1:
            raise PlanShapeError(
                f"args_shape for argument {name!r}: dimension {dim} is {size}; use a "
                "size >= 0, or -1 for any size"
            )
    return tuple(int(size) for size in shape)


@overload
def func2plan(function: Callable[..., Any], /) -> Plan: ...


@overload
def func2plan(
    function: None = None,
    /,
    *,
    args_shape: Sequence[Sequence[int]] | None = None,
    state: Sequence[torch.Tensor] | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], Plan]: ...


def func2plan(
    function: Callable[..., Any] | None = None,
    /,
    *,
    args_shape: Sequence[Sequence[int]] | None = None,
    state: Sequence[torch.Tensor] | None = None,
    name: str | None = None,
) -> Plan | Callable[[Callable[..., Any]], Plan]:
    """Turn a function into a :class:`Plan` (decorator, with or without parentheses).

    With ``args_shape`` the plan is built at once on ``torch.ones`` examples; ``-1`` dims
    are symbolic (any size on replay); any other negative or non-integer size raises
    ``PlanShapeError`` (a ``ValueError``) naming the argument and the dimension. ``state``
    tensors are read inside the function with ``state.read()`` (a parameter named
    ``state``) and are named ``state.0``, ``state.1``... The plan is called like the
    function: keyword arguments bind by parameter name and defaults apply.

    Examples
    --------
    >>> @func2plan(args_shape=[(-1, 2)])
    ... def double_abs(x):
    ...     return torch.abs(x + x)
    >>> double_abs.is_built
    True
    >>> double_abs(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    tensor([[2., 4.],
            [6., 1.]])
    >>> @func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    ... def plan_abs(x, state):
    ...     bias, = state.read()
    ...     return x.abs() + bias
    >>> plan_abs(torch.tensor([-1, 0]))
    tensor([2, 1])
    """

    def decorate(fn: Callable[..., Any]) -> Plan:
        plan = Plan(name or fn.__name__, function=fn, state=State(list(state or ())))
        if args_shape is not None:
            names = plan._target()[1]
            if len(names) < len(args_shape):
                raise PlanBuildError(
                    f"args_shape gives {len(args_shape)} shapes but {fn.__name__} takes "
                    f"{len(names)} positional arguments",
                    plan_name=plan.name,
                )
            examples, dynamic = _examples(args_shape, names)
            plan._dynamic = dict(zip(names, dynamic, strict=False))
            plan.build(*examples)
        return plan

    if function is not None:
        return decorate(function)
    return decorate


class method2plan:  # noqa: N801 - decorator named like PySyft's
    """Decorate an ``nn.Module`` method so that ``module.<method>`` is a :class:`Plan`.

    The plan is bound to the module instance: its state is the module's parameters and
    buffers, by ``state_dict`` name.

    Examples
    --------
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc1 = nn.Linear(2, 3)
    ...     @method2plan
    ...     def forward(self, x):
    ...         return self.fc1(x).relu()
    >>> net = Net()
    >>> net.forward.build(torch.ones(2)).is_built
    True
    """

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        functools.update_wrapper(self, function)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = name

    def __get__(self, instance: nn.Module | None, owner: type | None = None) -> Any:
        if instance is None:
            return self
        plan = instance.__dict__.get(self.attribute)
        if plan is None:
            plan = Plan(self.function.__name__, function=self.function, bound_module=instance)
            instance.__dict__[self.attribute] = plan
        return plan
