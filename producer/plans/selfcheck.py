"""Build-time self-check: traced plans must replay like eager code (docs/tracing.md §6.5)."""

from __future__ import annotations

import contextlib
import gc
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils import swap_tensors

from producer.plans.tracer import inline_plans
from schemas.errors import FedplanError, PlanBuildError
from schemas.tree import tree_map

Replay = Callable[[tuple[Any, ...], dict[str, Any], Mapping[str, torch.Tensor]], Any]
"""Runs the traced plan: ``(args, kwargs, state) -> outputs``."""

RTOL, ATOL = 1e-5, 1e-6
_SEED = 20190301


def clone_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached copy that keeps ``requires_grad`` (a fresh leaf)."""
    copy = t.detach().clone()
    if t.requires_grad:
        copy.requires_grad_(True)
    return copy


def clone_tree(value: Any) -> Any:
    """``value`` with every tensor leaf replaced by :func:`clone_tensor`."""
    return tree_map(_clone_leaf, value)


def _clone_leaf(value: Any) -> Any:
    return clone_tensor(value) if isinstance(value, torch.Tensor) else value


def _swap_all(live: Sequence[torch.Tensor], stand_ins: Sequence[torch.Tensor]) -> bool:
    """Swap every pair, or none (``False``) when autograd still references a live tensor.

    ``swap_tensors`` would poison (or refuse) a tensor that a live autograd graph uses, so
    any tensor with more than one reference to its implementation is not swapped.
    """
    if any(t._use_count() > 1 for t in (*live, *stand_ins)):  # type: ignore[attr-defined]
        return False
    done: list[tuple[torch.Tensor, torch.Tensor]] = []
    for real, other in zip(live, stand_ins, strict=True):
        try:
            swap_tensors(real, other)
        except RuntimeError:
            for r, o in reversed(done):
                swap_tensors(r, o)
            return False
        done.append((real, other))
    return True


def _swap_back(live: Sequence[torch.Tensor], stand_ins: Sequence[torch.Tensor]) -> None:
    for real, other in zip(live, stand_ins, strict=True):
        try:
            swap_tensors(real, other)
        except RuntimeError:  # a reference cycle still holds the graph: collect it
            gc.collect()
            swap_tensors(real, other)


@contextlib.contextmanager
def swapped(live: Sequence[torch.Tensor], stand_ins: Sequence[torch.Tensor]) -> Iterator[None]:
    """Let the ``live`` tensor objects hold the stand-ins' contents for the block.

    Code that holds the live objects (a module, an optimizer) works on the stand-in data;
    on exit the live objects get their own data (and ``.grad``) back and the stand-ins hold
    whatever the block left. Uses ``torch.utils.swap_tensors``; when a live autograd graph
    still references a live tensor, the block runs on the live tensors themselves (the
    stand-ins must then be clones of them) and values it changed are copied back after.
    """
    live, stand_ins = list(live), list(stand_ins)
    if _swap_all(live, stand_ins):
        try:
            yield
        except BaseException as exc:
            traceback.clear_frames(exc.__traceback__)  # frames may hold the autograd graph
            raise
        finally:
            _swap_back(live, stand_ins)
        return
    # Copy mode: the stand-ins are clones of the live values (every caller's case), so the
    # block runs on the live tensors and only what it changed is restored afterwards.
    saved = [(t.detach().clone(), t.grad, t._version) for t in live]
    for real in live:
        real.grad = None
    try:
        yield
    finally:
        with torch.no_grad():
            for (value, grad, version), real, other in zip(saved, live, stand_ins, strict=True):
                other.copy_(real)
                other.grad = real.grad
                if real._version != version:
                    real.copy_(value)
                real.grad = grad


def _clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _differences(path: str, eager: Any, replay: Any, found: list[str]) -> None:
    if isinstance(eager, torch.Tensor) and isinstance(replay, torch.Tensor):
        if eager.shape != replay.shape or eager.dtype != replay.dtype:
            found.append(
                f"{path}: eager {tuple(eager.shape)} {eager.dtype}, "
                f"plan {tuple(replay.shape)} {replay.dtype}"
            )
        elif not torch.allclose(
            eager.detach().double(), replay.detach().double(), RTOL, ATOL, equal_nan=True
        ):
            diff = (eager.detach().double() - replay.detach().double()).abs().max().item()
            found.append(f"{path}: max difference {diff:.3g}")
    elif isinstance(eager, tuple | list) and isinstance(replay, tuple | list):
        if len(eager) != len(replay):
            found.append(f"{path}: eager has {len(eager)} items, plan {len(replay)}")
        for i, (e, r) in enumerate(zip(eager, replay, strict=False)):
            _differences(f"{path}[{i}]", e, r, found)
    elif isinstance(eager, dict) and isinstance(replay, dict):
        for key in eager.keys() | replay.keys():
            _differences(f"{path}[{key!r}]", eager.get(key), replay.get(key), found)
    elif type(eager) is not type(replay) or eager != replay:
        found.append(f"{path}: eager {eager!r}, plan {replay!r}")


def self_check(
    fn: Callable[..., Any],
    replay: Replay,
    state: Mapping[str, torch.Tensor],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    name: str,
    runs: int = 2,
) -> None:
    """Run ``fn`` eagerly ``runs`` times and the plan as often, on separate state clones.

    Both start from the same RNG seed (the caller's RNG state is restored afterwards) and
    clear state ``.grad`` around every call, as devices do. Outputs of every call and the
    final state must agree within ``rtol=1e-5, atol=1e-6``.

    Raises
    ------
    PlanBuildError
        Listing the differences, or why the replay failed.

    Examples
    --------
    >>> f = lambda x: x * 2
    >>> self_check(f, lambda a, k, s: f(*a), {}, (torch.ones(2),), {}, name="f")
    """
    live = list(state.values())
    rng = torch.get_rng_state()
    grad_mode = torch.is_grad_enabled()
    try:
        eager_state = {k: clone_tensor(t) for k, t in state.items()}
        replay_state = {k: clone_tensor(t) for k, t in state.items()}
        eager_outs, replay_outs = [], []
        torch.manual_seed(_SEED)
        with swapped(live, list(eager_state.values())), inline_plans():
            for _ in range(runs):
                _clear_grads(live)
                eager_outs.append(clone_tree(fn(*clone_tree(args), **clone_tree(kwargs))))
                _clear_grads(live)
        torch.manual_seed(_SEED)
        for _ in range(runs):
            try:
                out = replay(clone_tree(args), clone_tree(dict(kwargs)), replay_state)
            except FedplanError as exc:
                raise PlanBuildError(
                    f"self-check of plan {name!r}: replaying the traced plan failed ({exc}); "
                    "the function probably depends on something tracing cannot see "
                    "(Python-side state, torch.manual_seed, randomness in a guard)"
                ) from exc
            replay_outs.append(clone_tree(out))
    finally:
        torch.set_rng_state(rng)
        torch.set_grad_enabled(grad_mode)
    found: list[str] = []
    for i, (e, r) in enumerate(zip(eager_outs, replay_outs, strict=True)):
        _differences(f"call {i + 1} output", e, r, found)
    for key in state:
        _differences(f"state {key!r}", eager_state[key], replay_state[key], found)
    if found:
        raise PlanBuildError(
            f"self-check of plan {name!r}: the traced plan does not replay like the eager "
            f"function: {'; '.join(found[:5])}. Likely causes: Python-side state changed "
            "by the function, torch.manual_seed inside it, unseeded randomness, or an "
            "operation tracing cannot see; keep plans to torch ops on inputs and state"
        )
