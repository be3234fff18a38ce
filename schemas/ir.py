"""Plan IR: allow-listed ops over numbered value slots, knowing nothing of tracing or running.

A plan is a straight-line program. Every value lives in a numbered *slot*; inputs, named
state and captured constants are slots filled before the first op; each op reads its
arguments (constants, slot references and small integer expressions over slots) and writes
its results into fresh slots. Guards are ops whose Python result must equal what tracing
observed, otherwise replay stops with ``PlanGuardError`` naming the source line.

Op names (``Op.target``) are the keys of the allow-list in :mod:`schemas.allowlist`:

- ``torch.<name>`` for functions in the ``torch`` namespace (``torch.add``, ``torch.abs``,
  ``torch._foreach_add_``),
- ``torch.nn.functional.<name>`` for ``F.*`` (``torch.nn.functional.linear``),
- ``Tensor.<name>`` for tensor methods and operators (``Tensor.add_``, ``Tensor.__add__``,
  ``Tensor.view``, ``Tensor.backward``, ``Tensor.size``),
- ``Tensor.<prop>.__get__`` / ``Tensor.<prop>.__set__`` for property reads and writes
  (``Tensor.grad.__get__``, ``Tensor.shape.__get__``),
- a few named internals such as ``torch.autograd.grad`` and ``torch._C._set_grad_enabled``.

Example
-------
>>> x, y = Ref(0), Ref(1)
>>> ir = PlanIR(name="double_abs", inputs=(x,), ops=[
...     Op("Tensor.__add__", (x, x), {}, y),
...     Op("torch.abs", (y,), {}, Ref(2)),
... ], outputs=Ref(2), num_slots=3)
>>> ir.ops[1].target
'torch.abs'
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias, Union

import torch

from schemas.tree import tree_leaves, tree_map

SCHEMA_VERSION = 1
"""Version of the plan IR and wire format; bumped on incompatible change."""

LOOP_SCHEMA_VERSION = 2
"""Version of a plan with a :class:`LoopOverBatches` section: a device that only speaks
:data:`SCHEMA_VERSION` refuses it with ``SchemaVersionError`` instead of silently running the
plan without its loop (protobuf would drop the unknown field)."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to the value held in slot ``slot``."""

    slot: int


@dataclass(frozen=True, slots=True)
class SymExpr:
    """An integer expression over slots holding ints (symbolic sizes).

    ``op`` is one of ``add sub mul floordiv mod neg max min truediv pow``; ``args`` are
    ``SymExpr``, ``Ref`` (a slot holding an int, e.g. the result of ``Tensor.size``) or int.
    Evaluated by the interpreter with plain Python integer arithmetic: never ``eval``.
    """

    op: str
    args: tuple[SymExpr | Ref | int, ...]


@dataclass(frozen=True, slots=True)
class DType:
    """A torch dtype by name (``"float32"``)."""

    name: str

    @staticmethod
    def of(dtype: torch.dtype) -> DType:
        return DType(str(dtype).removeprefix("torch."))


@dataclass(frozen=True, slots=True)
class Device:
    """A torch device by name (``"cpu"``); devices run plans on their own hardware."""

    name: str


@dataclass(frozen=True, slots=True)
class Slice:
    """A Python ``slice`` whose bounds are values."""

    start: Value
    stop: Value
    step: Value


@dataclass(frozen=True, slots=True)
class EllipsisValue:
    """Python's ``...`` in an indexing expression."""


@dataclass(frozen=True, slots=True)
class MemoryFormat:
    """A ``torch.memory_format`` by name (``"contiguous_format"``)."""

    name: str


@dataclass(frozen=True, slots=True)
class ObjectId:
    """In commands only: an object held by the device, by id (never inside a plan)."""

    id: str


Value: TypeAlias = Union[  # noqa: UP007 - recursive alias needs Union
    None,
    bool,
    int,
    float,
    str,
    Ref,
    SymExpr,
    DType,
    Device,
    Slice,
    EllipsisValue,
    MemoryFormat,
    ObjectId,
    torch.Tensor,
    tuple["Value", ...],
    list["Value"],
    dict[str, "Value"],
]
"""What an op argument, an op output pattern, an input pattern or an expected guard value is.

``torch.Tensor`` and ``ObjectId`` leaves appear only in commands (inline small tensors and
references to device objects); inside a plan, tensors are slots (constants or state)."""


class NoExpect:
    """Type of :data:`NO_EXPECT`; a singleton that survives ``copy.deepcopy``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_EXPECT"

    def __reduce__(self) -> str:
        return "NO_EXPECT"


NO_EXPECT = NoExpect()
"""Marker for ``Op.expect`` of ordinary (non-guard) ops."""


@dataclass(slots=True)
class Op:
    """One call of an allow-listed target.

    ``out`` is the pattern of slots that receive the result: a ``Ref`` for one value, a
    tuple/list of ``Ref`` for a multi-output op (replay checks the count), or ``None`` when
    the result is unused. For a guard, ``expect`` holds the value tracing observed and replay
    raises ``PlanGuardError`` when the result differs; ``source`` is ``"file.py:12: code"``.
    """

    target: str
    args: tuple[Value, ...]
    kwargs: dict[str, Value]
    out: Value
    expect: Value | NoExpect = NO_EXPECT
    source: str = ""

    @property
    def is_guard(self) -> bool:
        return not isinstance(self.expect, NoExpect)


@dataclass(slots=True)
class InputSpec:
    """What a call must satisfy for one input tensor leaf: checked before any op runs.

    ``path`` names it for error messages (``"x"``, ``"batch[0]"``, ``"kw['y']"``); ``ndim``
    is the number of dims the trace relied on; ``dtype`` is ``None`` when any dtype is
    accepted; ``sizes`` maps a dim to the size the trace relied on (dims absent are free).
    """

    slot: int
    path: str
    ndim: int
    dtype: DType | None = None
    sizes: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class LoopOverBatches:
    """The local training loop of a plan: one traced step run over the device's batches.

    After the plan's ops ``[:at]`` (the set-up) the device runs ``body`` once per batch and
    then the ops ``[at:]`` (the finish). ``data`` are the slots of the dataset tensors
    (``x``, ``y``: same first dimension ``n``); ``epochs``, ``batch_size`` and ``seed`` the
    slots of the call's integers. Each epoch draws ``torch.randperm(n, generator=g)`` from
    one ``g = torch.Generator().manual_seed(seed)``; a batch is the next ``batch_size``
    indices of that order, the last short batch kept unless ``drop_last``. The body is called
    as ``body(*(t[idx] for t in data), *(extras))`` with the plan's named state (its state
    names are a subset of the plan's; parameters and optimizer buffers carry over from step
    to step in place) and returns a tensor; their mean over all steps goes to slot ``out``.

    The body has its own slots (freed after every step) and no loop of its own.
    """

    body: PlanIR
    at: int
    data: tuple[Ref, ...]
    extras: tuple[Ref, ...]
    epochs: Ref
    batch_size: Ref
    seed: Ref
    out: Ref
    drop_last: bool = False

    def reads(self) -> list[Ref]:
        """The plan slots the loop reads."""
        return [*self.data, *self.extras, self.epochs, self.batch_size, self.seed]


@dataclass(slots=True)
class PlanIR:
    """A traced plan: inputs, named state, constants, ops, outputs.

    ``inputs``/``kwinputs`` are patterns of ``Ref`` mirroring the call's (possibly nested)
    arguments; a non-tensor leaf that the trace baked in is a constant and must be passed
    equal. ``state`` maps state names (``fc1.weight``) to slots, in order; ``state_values``
    holds the tensors to install for them when the plan is stored on a device.
    ``constants`` maps slots to tensors captured at trace time (``torch.tensor([1, 2])``
    inside the function, closures). ``loop``, when set, is the plan's local training loop
    (:class:`LoopOverBatches`), run between ``ops[:loop.at]`` and ``ops[loop.at:]``.
    """

    name: str
    inputs: tuple[Value, ...]
    ops: list[Op]
    outputs: Value
    num_slots: int
    kwinputs: dict[str, Value] = field(default_factory=dict)
    input_specs: list[InputSpec] = field(default_factory=list)
    state: dict[str, int] = field(default_factory=dict)
    state_values: dict[str, torch.Tensor] = field(default_factory=dict)
    constants: dict[int, torch.Tensor] = field(default_factory=dict)
    loop: LoopOverBatches | None = None

    def copy(self) -> PlanIR:
        """Deep enough copy: new op list, cloned state tensors, shared constants."""
        return dataclasses.replace(
            self,
            ops=[dataclasses.replace(op) for op in self.ops],
            input_specs=[dataclasses.replace(s, sizes=dict(s.sizes)) for s in self.input_specs],
            state=dict(self.state),
            state_values={
                k: v.detach().clone().requires_grad_(v.requires_grad)
                for k, v in self.state_values.items()
            },
            constants=dict(self.constants),
            kwinputs=dict(self.kwinputs),
            loop=(
                None
                if self.loop is None
                else dataclasses.replace(self.loop, body=self.loop.body.copy())
            ),
        )


def refs_in(value: Value) -> list[Ref]:
    """All ``Ref`` leaves of a value pattern, in order (``SymExpr`` operands included)."""
    found: list[Ref] = []
    for leaf in tree_leaves(value):
        if isinstance(leaf, Ref):
            found.append(leaf)
        elif isinstance(leaf, SymExpr):
            found.extend(refs_in(leaf.args))
        elif isinstance(leaf, Slice):
            found.extend(refs_in((leaf.start, leaf.stop, leaf.step)))
    return found


def to_ir_value(value: Any, leaf: Callable[[Any], Value]) -> Value:
    """A Python value as an IR value: the one lowering the tracer and device handles share.

    Numbers, strings, ``None``, dtypes, devices, memory formats, slices and ``...`` become
    their IR values here; tuples (``torch.Size`` too), lists and dicts with string keys are
    walked. Every other leaf goes to ``leaf``, which knows tensors, pointers or SymInts and
    raises for anything it does not know (a dict with other keys reaches it whole).

    Examples
    --------
    >>> to_ir_value((torch.float32, slice(1, None), [...]), lambda v: Ref(0))
    (DType(name='float32'), Slice(start=1, stop=None, step=None), [EllipsisValue()])
    >>> to_ir_value({"k": object()}, lambda v: Ref(7))
    {'k': Ref(slot=7)}
    """

    def lower(item: Any) -> Value:
        if item is None or isinstance(item, bool | int | float | str):
            return item
        if isinstance(item, torch.dtype):
            return DType.of(item)
        if isinstance(item, torch.device):
            return Device(str(item))
        if isinstance(item, torch.memory_format):
            return MemoryFormat(str(item).removeprefix("torch."))
        if isinstance(item, slice):
            return Slice(lower(item.start), lower(item.stop), lower(item.step))
        if item is Ellipsis:
            return EllipsisValue()
        return leaf(item)

    lowered: Value = tree_map(lower, value, leaf=_dict_with_other_keys)
    return lowered


def _dict_with_other_keys(value: Any) -> bool:
    return isinstance(value, dict) and not all(isinstance(k, str) for k in value)
