"""The training loop inside the plan, on every transport: devices train on their own batches
exactly as eager torch does, and hostile loop settings get typed errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import producer as fp
from producer.fl.training import (
    TrainingSpec,
    build_training_plan,
    flatten,
    get_weights,
    sample_order,
    scratch_copy,
    train_eager,
)
from schemas.errors import LoopLimitError, PlanInputError
from tests.behaviour.conftest import DeviceFactory

SPECS = {
    "sgd": TrainingSpec(lr=0.2, batch_size=4),
    "momentum": TrainingSpec(lr=0.1, batch_size=4, momentum=0.9),
    "fedprox": TrainingSpec(lr=0.2, batch_size=4, proximal_mu=0.3),
}


def _rows(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_one_loop_plan_trains_devices_with_different_row_counts_as_eager_torch_does(
    device: DeviceFactory, kind: str
) -> None:
    spec = dataclasses.replace(SPECS[kind], epochs=2)
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    plan = build_training_plan(net, spec, feature_shape=(6,))
    w = get_weights(net)
    for k, n in enumerate((7, 13)):  # one plan, any number of rows
        x, y = _rows(k, n)
        dev = device(f"loop-{kind}-{k}", [fp.tag(x, "train", "x"), fp.tag(y, "train", "y")])
        x_ptr, y_ptr = dev.search("train", "x")[0], dev.search("train", "y")[0]
        seed = 1000 + k
        out = plan.send(dev).run(
            x_ptr, y_ptr, flatten(w), epochs=2, batch_size=4, seed=seed, return_values=True
        )
        got = out.get(timeout=120)
        ref, loss = train_eager(scratch_copy(net), spec, w, x, y, sample_order(n, seed, 2))
        assert torch.allclose(got[:-1], flatten(ref), atol=1e-5), n
        assert got[-1].item() == pytest.approx(loss, abs=1e-5)


def test_hostile_loop_settings_get_typed_errors_and_the_device_keeps_serving(
    device: DeviceFactory,
) -> None:
    torch.manual_seed(6)
    net = nn.Linear(6, 3)
    plan = build_training_plan(net, TrainingSpec(batch_size=4))
    x, y = _rows(9, 10)
    dev = device("loop-hostile", [fp.tag(x, "train", "x"), fp.tag(y, "train", "y")])
    x_ptr, y_ptr = dev.search("train", "x")[0], dev.search("train", "y")[0]
    pointer_plan = plan.send(dev)
    flat = flatten(get_weights(net))
    hostile: list[tuple[dict[str, object], type[Exception], str]] = [
        ({"epochs": 10**12, "batch_size": 1, "seed": 0}, PlanInputError, "epochs must be"),
        ({"epochs": 90_000, "batch_size": 1, "seed": 0}, LoopLimitError, "FEDPLAN_MAX_LOOP"),
        ({"epochs": 1, "batch_size": 0, "seed": 0}, PlanInputError, "batch_size must be"),
        ({"epochs": -3, "batch_size": 4, "seed": 0}, PlanInputError, "epochs must be"),
        ({"epochs": 1, "batch_size": 4, "seed": -1}, PlanInputError, "seed must be"),
        ({"epochs": 1, "batch_size": 4, "seed": -(2**63)}, PlanInputError, "seed must be"),
    ]
    for loop_kwargs, error, match in hostile:
        out = pointer_plan.run(x_ptr, y_ptr, flat, return_values=True, **loop_kwargs)
        with pytest.raises(error, match=match):
            out.get(timeout=120)
    out = pointer_plan.run(x_ptr, y_ptr, flat, epochs=1, batch_size=4, seed=3, return_values=True)
    ref, _ = train_eager(scratch_copy(net), TrainingSpec(batch_size=4), get_weights(net), x, y,
                         sample_order(10, 3))  # fmt: skip
    assert torch.allclose(out.get(timeout=120)[:-1], flatten(ref), atol=1e-5)
