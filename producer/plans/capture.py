"""``trace``: run a function once under a :class:`~producer.plans.tracer.Tracer` into an IR."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from producer.plans.refusals import custom_function_output, stateful_optimizers_refused
from producer.plans.tracer import Tracer, inline_plans, tensors_in
from schemas.errors import PlanBuildError
from schemas.ir import InputSpec, Op, PlanIR, Value
from schemas.tree import Path, format_path, tree_map_with_path


@dataclass
class Trace:
    """What :func:`trace` produced: the IR and the outputs of the traced (eager) run."""

    ir: PlanIR
    outputs: Any


def _warn_on_baked_outputs(name: str, outputs: Any, data_reads: list[Any]) -> None:
    leaves = outputs if isinstance(outputs, tuple | list) else (outputs,)
    if any(any(leaf is read for read in data_reads) for leaf in leaves):
        warnings.warn(
            f"plan {name!r} returns a Python number read from tensor data (item(), "
            "tolist()): it is fixed at build and guarded, so calls with other data raise "
            "PlanGuardError; return the tensor instead (loss.detach())",
            stacklevel=4,
        )


def _pattern(
    tracer: Tracer,
    value: Any,
    path: str,
    dynamic: Callable[[str, torch.Tensor], Sequence[int]] | None,
) -> Value:
    """The input pattern for one argument: tensor leaves get slots and input specs."""

    def leaf(keys: Path, value: Any) -> Value:
        if not isinstance(value, torch.Tensor):
            return tracer.lower(value)
        where = format_path(path, keys)
        ref = tracer.bind(value)
        tracer.specs[ref.slot] = InputSpec(slot=ref.slot, path=where, ndim=value.dim())
        dims = range(value.dim()) if dynamic is None else dynamic(where, value)
        tracer.dynamic.update((ref.slot, d % max(value.dim(), 1)) for d in dims)
        return ref

    return tree_map_with_path(leaf, value)


def trace(
    fn: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any] | None = None,
    *,
    name: str,
    state: Mapping[str, torch.Tensor] | None = None,
    arg_names: Sequence[str] = (),
    dynamic: Callable[[str, torch.Tensor], Sequence[int]] | None = None,
    symbolic: bool = True,
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> Trace:
    """Run ``fn(*args, **kwargs)`` once under a :class:`Tracer` and return its ``PlanIR``.

    Parameters
    ----------
    fn
        The function to trace; it runs for real on ``args`` and the ``state`` tensors.
    args, kwargs
        Example inputs: (nested tuples/lists/dicts of) tensors and Python constants.
    name
        The plan's name.
    state
        Named state tensors ``fn`` uses (parameters, buffers), traced by identity: ``fn``
        must use these very objects.
    arg_names
        Names of the positional inputs for error messages (``x``); default ``args[i]``.
    dynamic
        ``(path, tensor) -> dims`` that are symbolic for an input tensor; default all.
        Sizes read on other dims are recorded in the input specs.
    symbolic
        ``False`` turns off symbolic sizes: every size read is guarded.
    optimizers
        Optimizers made before the trace whose state is part of ``state``: they may step
        (other stateful ones made before the trace are refused).

    Examples
    --------
    >>> t = trace(lambda x: torch.abs(x + x), (torch.tensor([1.0, -2.0]),), name="f")
    >>> [op.target for op in t.ir.ops]
    ['Tensor.add', 'torch.abs']
    """
    tracer = Tracer(symbolic=symbolic)
    kwargs = dict(kwargs or {})
    names = [arg_names[i] if i < len(arg_names) else f"args[{i}]" for i in range(len(args))]
    inputs = tuple(_pattern(tracer, a, n, dynamic) for a, n in zip(args, names, strict=True))
    kwinputs = {k: _pattern(tracer, v, k, dynamic) for k, v in kwargs.items()}
    state_slots: dict[str, int] = {}
    for key, tensor in (state or {}).items():
        state_slots[key] = tracer.bind(tensor).slot
        tracer.state_slots.add(state_slots[key])
    grad_enabled = torch.is_grad_enabled()
    if not grad_enabled:  # built under no_grad: replay must start the same way
        tracer.ops.append(Op("torch._C._set_grad_enabled", (False,), {}, None))
    try:
        with inline_plans(), stateful_optimizers_refused(optimizers), tracer:
            outputs = fn(*args, **kwargs)
    except BaseException:
        tracer.release()
        raise
    finally:
        torch.set_grad_enabled(grad_enabled)
    try:
        if any(custom_function_output(t) for t in tensors_in(outputs)):
            raise PlanBuildError(
                f"{name}: an output comes from a custom torch.autograd.Function, whose "
                "backward a plan cannot hold; write it with allow-listed torch ops"
            )
        output_pattern = tracer.lower(outputs)
        _warn_on_baked_outputs(name, outputs, tracer.data_reads)
        ir = PlanIR(
            name=name,
            inputs=inputs,
            kwinputs=kwinputs,
            ops=tracer.ops,
            outputs=output_pattern,
            num_slots=tracer.num_slots,
            input_specs=sorted(tracer.specs.values(), key=lambda s: s.slot),
            state=state_slots,
            constants=dict(tracer.constants),
        )
    finally:
        tracer.release()
    return Trace(ir=ir, outputs=outputs)
