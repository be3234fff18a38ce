"""Tests for the op allow-list: coverage of real training steps, denial, reverse lookup."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from schemas import allowlist
from schemas.allowlist import ALLOWLIST, MISSING, is_allowed, name_of, resolve
from schemas.errors import OpNotAllowedError

# Calls optimizers make for bookkeeping; the tracer drops them (tracing notes).
_DROPPED = ("profiler._record_function",)


class _Recorder(TorchFunctionMode):
    """Records the allow-list name of every function the mode sees (None if unknown)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str | None] = []
        self.unknown: list[str] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        name = name_of(func)
        if name is None and not any(d in repr(func) for d in _DROPPED):
            self.unknown.append(repr(func))
        self.names.append(name)
        return func(*args, **(kwargs or {}))


class _SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 10)
        self.norm = nn.LayerNorm(10)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        x = F.avg_pool2d(x, 1)
        return self.drop(self.norm(self.fc(torch.flatten(x, 1))))


def _record(fn: Any) -> _Recorder:
    rec = _Recorder()
    with rec:
        fn()
    return rec


def test_every_listed_name_exists_in_the_pinned_torch() -> None:
    assert MISSING == ()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True),
        lambda p: torch.optim.Adam(p, lr=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=0.01, foreach=True),
    ],
    ids=["sgd", "sgd-momentum", "sgd-foreach", "adam", "adam-foreach", "adamw-foreach"],
)
def test_a_cnn_training_step_uses_only_allowed_ops(make_opt: Any) -> None:
    model = _SmallCNN()
    opt = make_opt(model.parameters())
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])

    def step() -> None:
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y) + F.nll_loss(F.log_softmax(out, 1), y)
        loss = loss + F.mse_loss(out, out.detach() * 2)
        loss = loss + F.binary_cross_entropy_with_logits(out, torch.ones_like(out))
        loss = loss + F.binary_cross_entropy(torch.sigmoid(out), torch.zeros_like(out))
        loss.backward()
        opt.step()

    step()  # first step creates optimizer state
    rec = _record(step)
    assert rec.unknown == []
    assert "Tensor.backward" in rec.names
    assert "torch.nn.functional.cross_entropy" in rec.names


def test_the_seed_tutorial_functions_use_only_allowed_ops() -> None:
    fc1, fc2 = nn.Linear(2, 3), nn.Linear(3, 2)
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
    target = torch.tensor([[0], [0], [1], [1.0]])
    model = nn.Linear(2, 1)

    def seeds() -> None:
        x = torch.tensor([-1, 2.0])
        x = x + x
        torch.abs(x).abs()
        F.log_softmax(fc2(F.relu(fc1(x))), dim=0)
        pred = model(data)
        loss = ((pred - target) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
                p.grad = None
        loss.item()

    rec = _record(seeds)
    assert rec.unknown == []
    for name in (
        "Tensor.grad.__get__",
        "Tensor.grad.__set__",
        "torch._C._set_grad_enabled",
        "Tensor.sub_",
        "Tensor.item",
        "torch.abs",
        "Tensor.abs",
    ):
        assert name in rec.names


def test_operators_properties_and_python_value_ops_are_named() -> None:
    x = torch.randn(3, 4, requires_grad=True)

    def many() -> None:
        z = x.detach().clone()
        z = 1 + z
        z = 3 / (2 - z * 2)
        z = -(z**2) + 2 ** z.clamp(max=3)
        z += 1
        z *= 2
        z[0] = 1
        _ = z[0, 1:3], z > 0, z < 0, z == 1, z != 1, z >= 0, z <= 0, abs(z), len(z)
        _ = bool(z.sum() > 0), float(z.sum()), int(z.sum().clamp(-5, 5)), z.tolist()
        _ = z @ z.T, z.mT, z.shape, z.dtype, z.device, z.ndim, z.data, z.requires_grad
        _a, _b, _c = z  # unbind
        _ = z.view(z.size(0), -1).reshape(-1).unsqueeze(0).squeeze().numel(), z.dim()
        _ = torch.cat([z, z]), torch.stack([z, z]), z.split(1), z.chunk(2), z.t()
        _ = torch.where(z > 0, z, 0.0), z.max(dim=1), z.argmax(), z.std(), z.var(), z.norm()
        _ = z.to(torch.float64), z.long(), z.int(), z.bool(), z.type_as(x), z.double()
        (x * 2).sum().backward()
        torch.autograd.grad((x * 3).sum(), [x])
        _ = torch.zeros(2), torch.ones(2), torch.arange(3), torch.full((2,), 1.0), x.grad

    rec = _record(many)
    assert rec.unknown == []
    for name in (
        "Tensor.shape.__get__",
        "Tensor.T.__get__",
        "Tensor.data.__get__",
        "Tensor.__setitem__",
        "Tensor.__getitem__",
        "Tensor.__bool__",
        "Tensor.unbind",
        "torch.autograd.grad",
        "Tensor.__rsub__",
        "Tensor.__rpow__",
        "Tensor.size",
    ):
        assert name in rec.names


def test_property_accessors_map_to_their_names_and_resolve_to_working_callables() -> None:
    t = torch.ones(2, requires_grad=True)
    (t * 2).sum().backward()
    get_grad = resolve("Tensor.grad.__get__")
    assert name_of(torch.Tensor.grad.__get__) == "Tensor.grad.__get__"
    assert name_of(torch.Tensor.grad.__set__) == "Tensor.grad.__set__"
    assert torch.equal(get_grad(t), torch.full((2,), 2.0))
    resolve("Tensor.grad.__set__")(t, None)
    assert t.grad is None
    assert resolve("Tensor.shape.__get__")(torch.zeros(2, 5)) == (2, 5)


def test_tensor_methods_and_their_tensorbase_origins_map_to_the_same_name() -> None:
    base = torch._C.TensorBase
    assert name_of(torch.Tensor.add_) == name_of(base.add_) == "Tensor.add_"
    assert name_of(torch.Tensor.split) == name_of(base.split) == "Tensor.split"
    assert torch.Tensor.split is not base.split


def test_functions_resolve_to_the_real_torch_objects() -> None:
    assert resolve("torch.nn.functional.linear") is F.linear
    assert resolve("torch.abs") is torch.abs
    assert resolve("Tensor.add_") is torch.Tensor.add_
    assert resolve("torch._C._set_grad_enabled") is torch._C._set_grad_enabled
    assert resolve("torch._foreach_add_") is torch._foreach_add_


@pytest.mark.parametrize(
    "name",
    [
        "torch.load", "torch.save", "torch.from_file", "Tensor.numpy", "Tensor.set_",
        "Tensor.storage", "Tensor.untyped_storage", "Tensor.__reduce_ex__", "Tensor.data_ptr",
        "os.system", "builtins.eval", "builtins.exec", "builtins.getattr",
        "torch.ops.aten.add", "torch.ops.profiler._record_function_enter_new", "torch.empty",
        "Tensor.resize_", "Tensor.apply_", "Tensor.register_hook", "", "torch", "Tensor.",
    ],
)  # fmt: skip
def test_dangerous_or_unknown_names_are_refused(name: str) -> None:
    assert not is_allowed(name)
    with pytest.raises(OpNotAllowedError, match="not in the allow-list"):
        resolve(name)


def test_dangerous_functions_have_no_name() -> None:
    for func in (
        torch.load,
        torch.save,
        torch.from_file,
        torch.Tensor.numpy,
        torch.Tensor.set_,
        torch.Tensor.storage,
        torch.Tensor.__reduce_ex__,
        os.system,
        eval,
        getattr,
        torch.ops.aten.add,
        torch.empty,
    ):
        assert name_of(func) is None


def test_no_table_entry_comes_from_outside_torch() -> None:
    for name, func in ALLOWLIST.items():
        assert name.startswith(("torch.", "Tensor.")), name
        module = getattr(func, "__module__", None) or ""
        assert module == "" or module.startswith("torch"), (name, module)


def test_the_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        allowlist.ALLOWLIST["os.system"] = os.system  # type: ignore[index]


def test_the_reverse_lookup_of_every_entry_resolves_to_the_same_callable() -> None:
    for name, func in ALLOWLIST.items():
        reverse = name_of(func)
        assert reverse is not None, name
        assert resolve(reverse) is func, (name, reverse)


def test_recurrent_layers_train_with_only_allowed_ops() -> None:
    gru, lstm = nn.GRU(3, 5, batch_first=True), nn.LSTM(3, 5)
    opt = torch.optim.SGD([*gru.parameters(), *lstm.parameters()], lr=0.1)
    x = torch.randn(2, 4, 3)

    def step() -> None:
        opt.zero_grad()
        loss = gru(x)[0].pow(2).mean() + lstm(x)[0].pow(2).mean()
        loss.backward()
        opt.step()

    rec = _record(step)
    assert rec.unknown == []
    assert "torch.gru" in rec.names and "torch.lstm" in rec.names
