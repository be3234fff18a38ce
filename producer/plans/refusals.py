"""What plans refuse at build (custom autograd, stateful optimizers...) and where in user code."""

from __future__ import annotations

import contextlib
import functools
import linecache
import os
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from schemas.errors import PlanBuildError

_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__",
                    "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                    "__ilshift__", "__irshift__", "__setitem__"}  # fmt: skip
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SKIP_DIRS = (
    os.path.dirname(torch.__file__) + os.sep,
    *(os.path.join(_ROOT, pkg) + os.sep for pkg in ("producer", "schemas", "consumer")),
    sysconfig.get_paths()["stdlib"] + os.sep,
    "<frozen",
)


def user_source() -> str:
    """``"file.py:LINE: code"`` of the innermost frame outside torch, fedplan and stdlib."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not filename.startswith(_SKIP_DIRS):
            code = linecache.getline(filename, frame.f_lineno).strip()
            return f"{os.path.basename(filename)}:{frame.f_lineno}: {code}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<unknown>"


def is_inplace(name: str) -> bool:
    """Whether an op name writes into its first argument (``add_``, ``__iadd__``, setters)."""
    method = name.rsplit(".", 1)[-1]
    return (
        name.endswith(".__set__")
        or method in _INPLACE_DUNDERS
        or (method.endswith("_") and not method.endswith("__"))
    )


def custom_function_output(t: torch.Tensor) -> bool:
    """Whether ``t`` came out of a custom ``torch.autograd.Function``."""
    return isinstance(t.grad_fn, torch.autograd.function.BackwardCFunction)


def refuse_custom_function(t: torch.Tensor) -> None:
    """``PlanBuildError`` with the remedy if ``t`` came out of a custom autograd Function."""
    if custom_function_output(t):
        raise PlanBuildError(
            f"{user_source()}: a custom torch.autograd.Function ({type(t.grad_fn).__name__}) "
            "cannot be part of a plan: its backward would be lost. Write it with "
            "allow-listed torch ops (autograd differentiates them)."
        )


def refuse_stateful_optimizer(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Refuse a step of an optimizer that keeps state between calls (only plain SGD passes)."""
    if isinstance(optimizer, torch.optim.SGD) and all(
        not g.get("momentum") for g in optimizer.param_groups
    ):
        return
    raise PlanBuildError(
        f"{user_source()}: {type(optimizer).__name__} was created outside the plan and keeps "
        "state between steps (momentum, moments) that a plan would silently re-create on "
        "every call; use torch.optim.SGD without momentum, or create the optimizer inside "
        "the plan's function (its state then lives for one call, as in eager code)"
    )


_LOCAL = threading.local()
_INSTALL_LOCK = threading.Lock()


def _record_creation(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def recording_init(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        created = getattr(_LOCAL, "created", None)
        if created is not None:  # this thread is tracing
            created.append(self)

    recording_init.__fedplan_records__ = True  # type: ignore[attr-defined]
    return recording_init


@contextlib.contextmanager
def stateful_optimizers_refused(
    allowed: Sequence[torch.optim.Optimizer] = (),
) -> Iterator[None]:
    """While tracing on this thread, refuse steps of stateful optimizers made before it.

    Optimizers created during the trace live for one call, as in eager code, so any of
    them may step; so may the ``allowed`` ones, whose state is plan state. To tell them
    apart, ``Optimizer.__init__`` is wrapped once (a no-op for threads not tracing).
    """
    with _INSTALL_LOCK:
        init = torch.optim.Optimizer.__init__
        if not getattr(init, "__fedplan_records__", False):
            torch.optim.Optimizer.__init__ = _record_creation(init)  # type: ignore[method-assign]
    outer = getattr(_LOCAL, "created", None)
    created: list[torch.optim.Optimizer] = list(allowed)
    _LOCAL.created = created
    thread = threading.get_ident()

    def pre_hook(optimizer: torch.optim.Optimizer, *_: Any) -> None:
        if threading.get_ident() == thread and not any(o is optimizer for o in created):
            refuse_stateful_optimizer(optimizer)

    handle = register_optimizer_step_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()
        _LOCAL.created = outer
