"""Render a ``PlanIR`` as a readable Python-like listing (``plan.code``)."""

from __future__ import annotations

from schemas.ir import (
    Device,
    DType,
    EllipsisValue,
    MemoryFormat,
    NoExpect,
    Op,
    PlanIR,
    Ref,
    Slice,
    SymExpr,
    Value,
)

_INFIX = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%", "truediv": "/",
          "pow": "**"}  # fmt: skip


class _Names:
    """Slot -> readable name: inputs by path, state as ``self.<name>``, others ``_<n>``."""

    def __init__(self, ir: PlanIR) -> None:
        self.names: dict[int, str] = {}
        for spec in ir.input_specs:
            self.names[spec.slot] = spec.path if spec.path.isidentifier() else f"_{spec.slot}"
        for name, slot in ir.state.items():
            self.names[slot] = (
                f"self.{name}" if name.replace(".", "_").isidentifier() else f"state[{name!r}]"
            )
        for slot in ir.constants:
            self.names.setdefault(slot, f"const_{slot}")

    def __call__(self, slot: int) -> str:
        return self.names.get(slot, f"_{slot}")


def render_value(value: Value, name: _Names) -> str:
    """One argument, output or expected value as source text."""
    if isinstance(value, Ref):
        return name(value.slot)
    if isinstance(value, SymExpr):
        args = [render_value(a, name) for a in value.args]
        if value.op in _INFIX and len(args) == 2:
            return f"({args[0]} {_INFIX[value.op]} {args[1]})"
        if value.op == "neg":
            return f"-{args[0]}"
        return f"{value.op}({', '.join(args)})"
    if isinstance(value, DType):
        return f"torch.{value.name}"
    if isinstance(value, Device | MemoryFormat):
        return repr(value.name)
    if isinstance(value, EllipsisValue):
        return "..."
    if isinstance(value, Slice):
        parts = [
            render_value(v, name) if v is not None else ""
            for v in (value.start, value.stop, value.step)
        ]
        return ":".join(parts).rstrip(":") or ":"
    if isinstance(value, tuple):
        inner = ", ".join(render_value(v, name) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v, name) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {render_value(v, name)}" for k, v in value.items()) + "}"
    return repr(value)


def _render_op(op: Op, name: _Names) -> str:
    args = [render_value(a, name) for a in op.args]
    args += [f"{k}={render_value(v, name)}" for k, v in op.kwargs.items()]
    call = f"{op.target}({', '.join(args)})"
    if not isinstance(op.expect, NoExpect):
        return f"assert {call} == {render_value(op.expect, name)}  # {op.source}"
    if op.out is None:
        return call
    if isinstance(op.out, tuple | list):
        return f"{', '.join(render_value(o, name) for o in op.out)}, = {call}"
    return f"{render_value(op.out, name)} = {call}"


def render(ir: PlanIR) -> str:
    """The listing of a plan: a ``def`` with one line per op and the returned pattern.

    Examples
    --------
    >>> from schemas.ir import Op, PlanIR, Ref, InputSpec
    >>> ir = PlanIR("double_abs", (Ref(0),), [Op("Tensor.__add__", (Ref(0), Ref(0)), {},
    ...     Ref(1)), Op("torch.abs", (Ref(1),), {}, Ref(2))], Ref(2), 3,
    ...     input_specs=[InputSpec(0, "x", 1)])
    >>> print(render(ir))
    def double_abs(x):
        _1 = Tensor.__add__(x, x)
        _2 = torch.abs(_1)
        return _2
    """
    name = _Names(ir)
    params = [render_value(v, name) for v in ir.inputs]
    params += [f"{k}={render_value(v, name)}" for k, v in ir.kwinputs.items()]
    lines = [f"def {ir.name}({', '.join(params)}):"]
    lines += [f"    {_render_op(op, name)}" for op in ir.ops]
    if ir.loop is not None:  # the loop section, then its body as a nested def
        loop = ir.loop
        data = ", ".join(render_value(r, name) for r in loop.data)
        extras = "".join(f", {render_value(r, name)}" for r in loop.extras)
        rule = "drop_last" if loop.drop_last else "last short batch kept"
        lines.insert(
            1 + loop.at,
            f"    {render_value(loop.out, name)} = mean({loop.body.name}(*batch{extras}) "
            f"for batch in batches({data}, {render_value(loop.epochs, name)}, "
            f"{render_value(loop.batch_size, name)}, {render_value(loop.seed, name)}))"
            f"  # {rule}",
        )
        lines.append(f"    return {render_value(ir.outputs, name)}")
        body = render(loop.body).splitlines()
        return "\n".join([*lines, *body])
    lines.append(f"    return {render_value(ir.outputs, name)}")
    return "\n".join(lines)
