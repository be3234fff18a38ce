"""The one hand-written table of ops a device will run: deny by default, resolve by lookup only.

Op names follow :mod:`schemas.ir`: ``torch.<name>``, ``torch.nn.functional.<name>``,
``Tensor.<method>``, ``Tensor.<prop>.__get__`` / ``Tensor.<prop>.__set__`` and a few named
internals (``torch.autograd.grad``, ``torch._C._set_grad_enabled``). The table is built once
at import time from the literal name lists below (the names are ours, never received); a
received name is only ever looked up in :data:`ALLOWLIST`.

Not allowed, on purpose: anything that reads or writes files or raw memory (``torch.load``,
``torch.save``, ``torch.from_file``, ``Tensor.numpy``, ``Tensor.set_``, ``Tensor.storage``,
``Tensor.data_ptr``, ``Tensor.__reduce_ex__``), uninitialised memory (``torch.empty*``,
``Tensor.resize_``), callables as arguments (``Tensor.apply_``, ``Tensor.register_hook``),
``torch.ops.*`` and every non-torch name (``os.system``, ``builtins.eval``).

Random ops (``torch.randn``, ``F.dropout``...) are allowed but replay unseeded.

Example
-------
>>> resolve("torch.abs") is torch.abs
True
>>> is_allowed("torch.load")
False
>>> name_of(torch.Tensor.add_)
'Tensor.add_'
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from schemas.errors import OpNotAllowedError

_TORCH_FUNCTIONS: tuple[str, ...] = (
    # arithmetic and pointwise
    "abs", "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide",
    "floor_divide", "remainder", "fmod", "neg", "negative", "pow", "square", "sqrt", "rsqrt",
    "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sin", "cos", "tan", "tanh",
    "sinh", "cosh", "asin", "acos", "atan", "atan2", "sigmoid", "relu", "erf", "floor",
    "ceil", "round", "trunc", "frac", "sign", "sgn", "reciprocal", "clamp", "clip",
    "clamp_min", "clamp_max", "lerp", "addcmul", "addcdiv", "maximum", "minimum", "where",
    "nan_to_num", "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and",
    "bitwise_or", "bitwise_not", "bitwise_xor", "isnan", "isinf", "isfinite",
    # comparisons
    "eq", "ne", "lt", "gt", "le", "ge", "equal", "allclose", "isclose",
    # reductions
    "sum", "mean", "prod", "std", "var", "std_mean", "var_mean", "norm", "max", "min",
    "amax", "amin", "argmax", "argmin", "all", "any", "cumsum", "cumprod", "logsumexp",
    "median", "mode", "count_nonzero", "softmax", "log_softmax", "dist", "cdist",
    # linear algebra
    "matmul", "mm", "bmm", "mv", "dot", "outer", "addmm", "baddbmm", "einsum",
    "tensordot", "diag", "tril", "triu", "trace",
    # shape and joining
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split", "chunk",
    "unbind", "flatten", "unflatten", "reshape", "squeeze", "unsqueeze", "transpose",
    "swapaxes", "permute", "movedim", "t", "narrow", "select", "flip", "roll",
    "repeat_interleave", "tile", "broadcast_to", "gather", "scatter", "scatter_add",
    "index_select", "masked_select", "masked_fill", "take_along_dim", "sort", "argsort",
    "topk", "kthvalue", "nonzero", "unique",
    # factories (randomness replays unseeded)
    "tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "full", "arange", "linspace",
    "logspace", "eye", "zeros_like", "ones_like", "full_like", "rand", "randn", "randint",
    "randperm", "rand_like", "randn_like", "randint_like", "bernoulli", "normal",
    "multinomial", "poisson",
    # conversions and autograd helpers
    "clone", "detach", "numel", "is_complex", "is_floating_point", "is_nonzero",
    "result_type", "promote_types", "can_cast",
    # neural network kernels reachable as torch.* (nn.Module calls decompose to them)
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "max_pool1d", "max_pool2d", "avg_pool1d", "adaptive_avg_pool1d", "batch_norm",
    "layer_norm", "group_norm", "instance_norm", "embedding", "dropout", "feature_dropout",
    "alpha_dropout", "gru", "lstm", "rnn_tanh", "rnn_relu", "gru_cell", "lstm_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "pixel_shuffle", "cosine_similarity",
    # optimizers' multi-tensor kernels (foreach=True)
    "_foreach_abs", "_foreach_abs_", "_foreach_add", "_foreach_add_", "_foreach_addcdiv",
    "_foreach_addcdiv_", "_foreach_addcmul", "_foreach_addcmul_", "_foreach_clamp_max",
    "_foreach_clamp_max_", "_foreach_clamp_min", "_foreach_clamp_min_", "_foreach_clone",
    "_foreach_copy_", "_foreach_div", "_foreach_div_", "_foreach_exp", "_foreach_exp_",
    "_foreach_lerp", "_foreach_lerp_", "_foreach_log", "_foreach_log_", "_foreach_max",
    "_foreach_maximum", "_foreach_maximum_", "_foreach_minimum", "_foreach_minimum_",
    "_foreach_mul", "_foreach_mul_", "_foreach_neg", "_foreach_neg_", "_foreach_norm",
    "_foreach_pow", "_foreach_pow_", "_foreach_reciprocal", "_foreach_reciprocal_",
    "_foreach_rsqrt", "_foreach_rsqrt_", "_foreach_sign", "_foreach_sign_",
    "_foreach_sqrt", "_foreach_sqrt_", "_foreach_sub", "_foreach_sub_", "_foreach_zero_",
)  # fmt: skip

_FUNCTIONAL: tuple[str, ...] = (
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d",
    "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "lp_pool2d", "relu", "relu_", "relu6",
    "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh",
    "hardtanh", "hardsigmoid", "hardswish", "softplus", "softsign", "logsigmoid",
    "softmax", "softmin", "log_softmax", "glu", "dropout", "dropout1d", "dropout2d",
    "alpha_dropout", "batch_norm", "layer_norm", "group_norm", "instance_norm",
    "rms_norm", "local_response_norm", "normalize", "embedding", "one_hot", "pad",
    "interpolate", "pixel_shuffle", "unfold", "fold", "cosine_similarity",
    "pairwise_distance", "scaled_dot_product_attention", "cross_entropy", "nll_loss",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss",
    "cosine_embedding_loss", "margin_ranking_loss", "hinge_embedding_loss",
    "soft_margin_loss", "multilabel_soft_margin_loss", "triplet_margin_loss",
)  # fmt: skip

_TENSOR_METHODS: tuple[str, ...] = (
    # arithmetic and pointwise
    "abs", "abs_", "add", "add_", "sub", "sub_", "subtract", "mul", "mul_", "multiply",
    "div", "div_", "divide", "true_divide", "floor_divide", "remainder", "fmod", "neg",
    "neg_", "pow", "pow_", "square", "sqrt", "sqrt_", "rsqrt", "exp", "exp_", "expm1",
    "log", "log_", "log2", "log10", "log1p", "sin", "cos", "tan", "tanh", "tanh_",
    "sigmoid", "sigmoid_", "relu", "relu_", "erf", "floor", "ceil", "round", "trunc",
    "frac", "sign", "sgn", "reciprocal", "reciprocal_", "clamp", "clamp_", "clip",
    "clip_", "clamp_min", "clamp_max", "lerp", "lerp_", "addcmul", "addcmul_",
    "addcdiv", "addcdiv_", "maximum", "minimum", "where", "nan_to_num", "logical_and",
    "logical_or", "logical_not", "logical_xor", "isnan", "isinf", "isfinite",
    # comparisons
    "eq", "ne", "lt", "gt", "le", "ge", "equal", "allclose", "isclose",
    # reductions
    "sum", "mean", "prod", "std", "var", "norm", "max", "min", "amax", "amin", "argmax",
    "argmin", "all", "any", "cumsum", "cumprod", "logsumexp", "median", "count_nonzero",
    "softmax", "log_softmax", "dist",
    # linear algebra
    "matmul", "mm", "bmm", "mv", "dot", "outer", "addmm", "diag", "tril", "triu",
    "trace",
    # shape, views and indexing
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze",
    "unsqueeze", "permute", "transpose", "swapaxes", "movedim", "t", "contiguous",
    "expand", "expand_as", "repeat", "repeat_interleave", "tile", "broadcast_to",
    "split", "chunk", "unbind", "narrow", "select", "flip", "roll", "gather", "scatter",
    "scatter_", "scatter_add", "scatter_add_", "index_select", "index_add_",
    "index_fill_", "masked_select", "masked_fill", "masked_fill_", "sort", "argsort",
    "topk", "kthvalue", "nonzero", "unique", "size", "dim", "numel", "nelement",
    "is_contiguous", "is_complex", "is_floating_point", "is_nonzero", "item", "tolist",
    # in-place updates and initialisation (optimizers, init)
    "copy_", "zero_", "fill_", "uniform_", "normal_", "bernoulli_", "detach_",
    "requires_grad_", "retain_grad",
    # factories on a tensor
    "new_tensor", "new_zeros", "new_ones", "new_full",
    # conversions
    "to", "type", "type_as", "float", "double", "half", "bfloat16", "long", "int",
    "short", "bool", "byte", "char", "cpu", "clone", "detach",
    # autograd
    "backward",
)  # fmt: skip

_TENSOR_OPERATORS: tuple[str, ...] = (
    # after the methods, so aliases (``__abs__`` is ``abs``) take the plain name
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__",
    "__rmul__", "__imul__", "__truediv__", "__rtruediv__", "__itruediv__", "__div__",
    "__rdiv__", "__idiv__", "__floordiv__", "__rfloordiv__", "__ifloordiv__", "__mod__",
    "__rmod__", "__imod__", "__pow__", "__rpow__", "__ipow__", "__matmul__", "__rmatmul__",
    "__neg__", "__pos__", "__abs__", "__invert__", "__and__", "__rand__", "__iand__",
    "__or__", "__ror__", "__ior__", "__xor__", "__rxor__", "__ixor__", "__lshift__",
    "__rlshift__", "__ilshift__", "__rshift__", "__rrshift__", "__irshift__", "__eq__",
    "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__getitem__", "__setitem__",
    "__len__", "__bool__", "__float__", "__int__", "__index__", "__contains__",
    "__reversed__",
)  # fmt: skip

_PROPERTY_GETS: tuple[str, ...] = (
    "grad", "data", "shape", "requires_grad", "dtype", "device", "ndim", "T", "mT",
    "is_leaf", "is_cpu", "is_cuda", "is_sparse", "layout", "itemsize", "nbytes",
)  # fmt: skip

_PROPERTY_SETS: tuple[str, ...] = ("grad", "data", "requires_grad")

_INTERNALS: dict[str, Callable[..., Any]] = {
    "torch.autograd.grad": torch.autograd.grad,
    "torch.autograd.backward": torch.autograd.backward,
    "torch._C._set_grad_enabled": torch._C._set_grad_enabled,
    "torch.is_grad_enabled": torch.is_grad_enabled,
}


def _descriptor(prop: str) -> Any:
    """The data descriptor (getset or property) behind ``Tensor.<prop>``."""
    for klass in torch.Tensor.__mro__:
        if prop in vars(klass):
            return vars(klass)[prop]
    return None


def _build() -> tuple[dict[str, Callable[..., Any]], list[str]]:
    table: dict[str, Callable[..., Any]] = {}
    missing: list[str] = []
    families: tuple[tuple[str, Any, tuple[str, ...]], ...] = (
        ("torch.", torch, _TORCH_FUNCTIONS),
        ("torch.nn.functional.", F, _FUNCTIONAL),
        ("Tensor.", torch.Tensor, _TENSOR_METHODS),
        ("Tensor.", torch.Tensor, _TENSOR_OPERATORS),
    )
    for prefix, owner, names in families:
        for name in names:
            func = getattr(owner, name, None)
            if callable(func):
                table.setdefault(prefix + name, func)
            else:
                missing.append(prefix + name)
    for kind, props in (("__get__", _PROPERTY_GETS), ("__set__", _PROPERTY_SETS)):
        for prop in props:
            desc = _descriptor(prop)
            if desc is None or not hasattr(desc, kind):
                missing.append(f"Tensor.{prop}.{kind}")
            else:
                table[f"Tensor.{prop}.{kind}"] = getattr(desc, kind)
    table.update(_INTERNALS)
    return table, missing


_TABLE, _MISSING = _build()

ALLOWLIST: Mapping[str, Callable[..., Any]] = types.MappingProxyType(_TABLE)
"""Op name -> the torch callable a device runs for it. Everything absent is denied."""

MISSING: tuple[str, ...] = tuple(_MISSING)
"""Listed names this torch build lacks (empty on the pinned torch; a test checks it)."""


def _reverse_index() -> tuple[dict[int, str], dict[tuple[int, str], str], list[object]]:
    by_id: dict[int, str] = {}
    by_descriptor: dict[tuple[int, str], str] = {}
    keep: list[object] = []  # keep every indexed object alive so ids stay unique
    for name, func in _TABLE.items():
        if isinstance(func, types.MethodWrapperType):
            by_descriptor[(id(func.__self__), func.__name__)] = name
            keep.append(func.__self__)
            continue
        by_id.setdefault(id(func), name)
        keep.append(func)
        if name.startswith("Tensor."):
            origin = vars(torch._C.TensorBase).get(name.removeprefix("Tensor."))
            if origin is not None and origin is not func:
                by_id.setdefault(id(origin), name)
                keep.append(origin)
    return by_id, by_descriptor, keep


_BY_ID, _BY_DESCRIPTOR, _KEEP_ALIVE = _reverse_index()


def is_allowed(name: str) -> bool:
    """Whether ``name`` is an op devices will run.

    Examples
    --------
    >>> is_allowed("torch.nn.functional.linear"), is_allowed("os.system")
    (True, False)
    """
    return name in _TABLE


def resolve(name: str) -> Callable[..., Any]:
    """The callable for an allowed op name; ``OpNotAllowedError`` for any other name.

    Examples
    --------
    >>> resolve("Tensor.grad.__get__")(torch.zeros(1)) is None
    True
    """
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise OpNotAllowedError(
            f"op {name!r} is not in the allow-list (schemas/allowlist.py); devices refuse "
            "plans that use it: rewrite the function with allowed torch ops"
        ) from None


def name_of(func: object) -> str | None:
    """The allow-list name of a function object as a ``TorchFunctionMode`` receives it.

    Handles functions, tensor methods (``torch.Tensor.add`` and its
    ``torch._C.TensorBase`` origin) and property accessors, which arrive as fresh
    ``method-wrapper`` objects (``torch.Tensor.grad.__get__``). ``None`` when not allowed.

    Examples
    --------
    >>> name_of(torch.Tensor.grad.__get__), name_of(torch.load)
    ('Tensor.grad.__get__', None)
    """
    if isinstance(func, types.MethodWrapperType):
        return _BY_DESCRIPTOR.get((id(func.__self__), func.__name__))
    return _BY_ID.get(id(func))
