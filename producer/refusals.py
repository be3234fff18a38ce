"""What plans refuse at build (custom autograd, stateful optimizers...) and where in user code."""

from __future__ import annotations

import linecache
import os
import sys
import sysconfig
from typing import Any

import torch

from schemas.errors import PlanBuildError

_INPLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__",
                    "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                    "__ilshift__", "__irshift__", "__setitem__"}  # fmt: skip
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    """Optimizer step pre-hook active while tracing: only stateless SGD is allowed."""
    if isinstance(optimizer, torch.optim.SGD) and all(
        not g.get("momentum") for g in optimizer.param_groups
    ):
        return
    raise PlanBuildError(
        f"{user_source()}: {type(optimizer).__name__} keeps state between steps (momentum, "
        "moments) that a plan would silently re-create on every call; use "
        "torch.optim.SGD without momentum inside plans (or write the update with tensor "
        "ops on plan state)"
    )
