"""IR values on the wire: every ``schemas.ir.Value`` variant <-> the ``Value`` protobuf.

``bool`` is checked before ``int`` (a ``bool`` is an ``int``); ``float`` keeps ``inf`` and
``nan``; dicts keep their insertion order and must have ``str`` keys; tensors travel inline
(:mod:`schemas.tensor_codec`). Anything else is refused with ``WireError``: lower it to an
IR value first (``torch.float32`` -> ``DType("float32")``, ``slice`` -> ``Slice``).

Examples
--------
>>> from schemas.ir import Ref, Slice
>>> value_from_proto(value_to_proto((Ref(3), [1, 2.5], {"k": None})))
(Ref(slot=3), [1, 2.5], {'k': None})
>>> value_from_proto(value_to_proto(Slice(None, Ref(0), 2)))
Slice(start=None, stop=Ref(slot=0), step=2)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from schemas.errors import WireError
from schemas.ir import (
    Device,
    DType,
    EllipsisValue,
    MemoryFormat,
    ObjectId,
    Ref,
    Slice,
    SymExpr,
    Value,
)
from schemas.plan_pb2 import Empty, SliceProto, SymExprProto, ValueDict, ValueList
from schemas.plan_pb2 import Value as ValueProto
from schemas.tensor_codec import DTYPES, tensor_from_proto, tensor_to_proto

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_UINT32_MAX = (1 << 32) - 1


def value_to_proto(value: Value) -> ValueProto:
    """Encode one IR value (recursively for tuples, lists, dicts, slices and expressions).

    Raises
    ------
    WireError
        For a Python object that is not an IR value, an int outside int64, a dict key that
        is not a ``str``, a ``Ref`` slot outside uint32.

    Examples
    --------
    >>> value_to_proto(True).WhichOneof("kind")
    'bool_value'
    >>> value_to_proto(1).WhichOneof("kind")
    'int_value'
    """
    proto = ValueProto()
    if value is None:
        proto.none.CopyFrom(Empty())
    elif isinstance(value, bool):
        proto.bool_value = value
    elif isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise WireError(f"integer {value} does not fit in 64 bits and cannot be sent")
        proto.int_value = int(value)
    elif isinstance(value, float):
        proto.float_value = value
    elif isinstance(value, str):
        proto.str_value = value
    elif isinstance(value, Ref):
        if not 0 <= value.slot <= _UINT32_MAX:
            raise WireError(f"slot {value.slot} is out of range for a Ref")
        proto.ref = value.slot
    elif isinstance(value, SymExpr):
        proto.sym.CopyFrom(SymExprProto(op=value.op, args=[value_to_proto(a) for a in value.args]))
    elif isinstance(value, DType):
        proto.dtype = value.name
    elif isinstance(value, Device):
        proto.device = value.name
    elif isinstance(value, Slice):
        proto.slice.CopyFrom(
            SliceProto(
                start=value_to_proto(value.start),
                stop=value_to_proto(value.stop),
                step=value_to_proto(value.step),
            )
        )
    elif isinstance(value, EllipsisValue):
        proto.ellipsis.CopyFrom(Empty())
    elif isinstance(value, MemoryFormat):
        proto.memory_format = value.name
    elif isinstance(value, ObjectId):
        proto.object_id = value.id
    elif isinstance(value, torch.Tensor):
        proto.tensor.CopyFrom(tensor_to_proto(value))
    elif isinstance(value, tuple):
        proto.tuple_value.CopyFrom(value_list_to_proto(value))
    elif isinstance(value, list):
        proto.list_value.CopyFrom(value_list_to_proto(value))
    elif isinstance(value, dict):
        proto.dict_value.CopyFrom(value_dict_to_proto(value))
    else:
        raise WireError(
            f"a {type(value).__name__} cannot be sent as a value; lower it to a "
            "schemas.ir value (None, bool, int, float, str, Ref, SymExpr, DType, Device, "
            "Slice, EllipsisValue, MemoryFormat, ObjectId, Tensor, tuple, list, dict)"
        )
    return proto


def value_from_proto(proto: ValueProto) -> Value:
    """Decode one IR value; ``WireError`` for an empty value or a malformed nested one.

    Examples
    --------
    >>> from schemas.ir import DType
    >>> value_from_proto(value_to_proto(DType("float32")))
    DType(name='float32')
    """
    kind = proto.WhichOneof("kind")
    if kind == "none":
        return None
    if kind == "bool_value":
        return proto.bool_value
    if kind == "int_value":
        return proto.int_value
    if kind == "float_value":
        return proto.float_value
    if kind == "str_value":
        return proto.str_value
    if kind == "ref":
        return Ref(proto.ref)
    if kind == "sym":
        return _sym_from_proto(proto.sym)
    if kind == "dtype":
        if proto.dtype not in DTYPES:
            raise WireError(f"unknown dtype {proto.dtype!r}; known dtypes: {', '.join(DTYPES)}")
        return DType(proto.dtype)
    if kind == "device":
        return Device(proto.device)
    if kind == "slice":
        part = proto.slice
        if not (part.HasField("start") and part.HasField("stop") and part.HasField("step")):
            raise WireError("a slice on the wire lacks a bound; None must be sent explicitly")
        return Slice(
            value_from_proto(part.start),
            value_from_proto(part.stop),
            value_from_proto(part.step),
        )
    if kind == "ellipsis":
        return EllipsisValue()
    if kind == "memory_format":
        return MemoryFormat(proto.memory_format)
    if kind == "object_id":
        return ObjectId(proto.object_id)
    if kind == "tensor":
        return tensor_from_proto(proto.tensor)
    if kind == "tuple_value":
        return tuple(value_list_from_proto(proto.tuple_value))
    if kind == "list_value":
        return value_list_from_proto(proto.list_value)
    if kind == "dict_value":
        return value_dict_from_proto(proto.dict_value)
    raise WireError(
        "a value on the wire has no kind (empty or from a newer fedplan); "
        "make sure both sides run the same fedplan version"
    )


def value_list_to_proto(values: Iterable[Value]) -> ValueList:
    """Encode a sequence of values (call arguments, tuple and list items)."""
    return ValueList(items=[value_to_proto(v) for v in values])


def value_list_from_proto(proto: ValueList) -> list[Value]:
    """Decode a ``ValueList`` into a Python list."""
    return [value_from_proto(item) for item in proto.items]


def value_dict_to_proto(values: Mapping[str, Value]) -> ValueDict:
    """Encode a ``str``-keyed mapping, keeping its order; ``WireError`` for other keys."""
    keys: list[str] = []
    for key in values:
        if not isinstance(key, str):
            raise WireError(
                f"dict key {key!r} is a {type(key).__name__}; only str keys can be sent"
            )
        keys.append(key)
    return ValueDict(keys=keys, values=[value_to_proto(values[k]) for k in keys])


def value_dict_from_proto(proto: ValueDict) -> dict[str, Value]:
    """Decode a ``ValueDict`` in order; ``WireError`` on mismatched lengths or repeated keys."""
    if len(proto.keys) != len(proto.values):
        raise WireError(
            f"a dict on the wire has {len(proto.keys)} keys but {len(proto.values)} values"
        )
    result: dict[str, Value] = {}
    for key, item in zip(proto.keys, proto.values, strict=True):
        if key in result:
            raise WireError(f"a dict on the wire repeats the key {key!r}")
        result[key] = value_from_proto(item)
    return result


def _sym_from_proto(proto: SymExprProto) -> SymExpr:
    args: list[SymExpr | Ref | int] = []
    for item in proto.args:
        arg = value_from_proto(item)
        if not isinstance(arg, SymExpr | Ref | int) or isinstance(arg, bool):
            raise WireError(
                f"a symbolic expression {proto.op!r} has a {type(arg).__name__} operand; "
                "only expressions, slot references and ints are allowed"
            )
        args.append(arg)
    return SymExpr(proto.op, tuple(args))
