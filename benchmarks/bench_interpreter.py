"""Micro-benchmark: plan replay through the interpreter versus the same ops run eagerly.

Usage: ``python benchmarks/bench_interpreter.py [--repeat N]``. Prints, per case, the median
time per call of eager torch and of ``LoadedPlan.run`` and their ratio (replay / eager).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumer.runtime.interpreter import LoadedPlan
from schemas.ir import Op, PlanIR, Ref

R = Ref


def _time(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def _compare(
    eager: Callable[[], Any], replay: Callable[[], Any], repeat: int, number: int
) -> tuple[float, float, float]:
    """Median eager and replay seconds per call, and the median of paired ratios.

    Samples alternate between the two so that load from other processes hits both alike.
    """
    for fn in (eager, replay):
        _time(fn, max(1, number // 10))
    pairs = [(_time(eager, number), _time(replay, number)) for _ in range(repeat)]
    return (
        statistics.median(e for e, _ in pairs),
        statistics.median(r for _, r in pairs),
        statistics.median(r / e for e, r in pairs),
    )


def _mlp(sizes: tuple[int, ...]) -> tuple[nn.Module, PlanIR]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    state: dict[str, int] = {}
    ops: list[Op] = []
    slot: int = 1
    cur: Ref = R(0)
    for name, _ in model.named_parameters():
        state[name] = slot
        slot += 1
    linear_names = [n.removesuffix(".weight") for n in state if n.endswith(".weight")]
    for i, layer in enumerate(linear_names):
        weight, bias = R(state[f"{layer}.weight"]), R(state[f"{layer}.bias"])
        ops.append(Op("torch.nn.functional.linear", (cur, weight, bias), {}, R(slot)))
        cur, slot = R(slot), slot + 1
        if i < len(linear_names) - 1:
            ops.append(Op("torch.nn.functional.relu", (cur,), {}, R(slot)))
            cur, slot = R(slot), slot + 1
    ir = PlanIR(name="mlp", inputs=(R(0),), ops=ops, outputs=cur, num_slots=slot, state=state)
    return model, ir


def _train_step(model: nn.Module, ir: PlanIR, lr: float) -> PlanIR:
    """Extend a forward plan with cross_entropy, backward and an SGD update."""
    ops = list(ir.ops)
    y, slot = R(ir.num_slots), ir.num_slots + 1
    loss = R(slot)
    ops += [
        Op("torch.nn.functional.cross_entropy", (ir.outputs, y), {}, loss),
        Op("Tensor.backward", (loss,), {}, None),
        Op("torch._C._set_grad_enabled", (False,), {}, None),
    ]
    slot += 1
    for param in ir.state.values():
        ops += [
            Op("Tensor.grad.__get__", (R(param),), {}, R(slot)),
            Op("Tensor.sub_", (R(param), R(slot)), {"alpha": lr}, R(slot + 1)),
        ]
        slot += 2
    ops += [
        Op("torch._C._set_grad_enabled", (True,), {}, None),
        Op("Tensor.detach", (loss,), {}, R(slot)),
    ]
    return PlanIR(
        name="train",
        inputs=(ir.inputs[0], y),
        ops=ops,
        outputs=R(slot),
        num_slots=slot + 1,
        state=ir.state,
    )


def _tiny_chain(n: int) -> PlanIR:
    ops = [Op("torch.add", (R(i), 1.0), {}, R(i + 1)) for i in range(n)]
    return PlanIR(name="chain", inputs=(R(0),), ops=ops, outputs=R(n), num_slots=n + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=7)
    opts = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows: list[tuple[str, tuple[float, float, float]]] = []

    x_tiny = torch.randn(4)
    chain = LoadedPlan(_tiny_chain(10))

    def eager_chain() -> torch.Tensor:
        v = x_tiny
        for _ in range(10):
            v = torch.add(v, 1.0)
        return v

    rows.append(
        (
            "10 adds on a 4-vector",
            _compare(eager_chain, lambda: chain.run((x_tiny,), {}, {}), opts.repeat, 2000),
        )
    )

    for label, sizes, batch, number in (
        ("MLP 784-392-10 forward, batch 64", (784, 392, 10), 64, 200),
        ("MLP 8-16-16-4 forward, batch 2", (8, 16, 16, 4), 2, 2000),
    ):
        model, ir = _mlp(sizes)
        plan, params = LoadedPlan(ir), dict(model.named_parameters())
        x = torch.randn(batch, sizes[0])
        with torch.no_grad():
            rows.append(
                (
                    label,
                    _compare(
                        partial(model, x),
                        partial(plan.run, (x,), {}, params),
                        opts.repeat,
                        number,
                    ),
                )
            )

    model, ir = _mlp((784, 392, 10))
    train = LoadedPlan(_train_step(model, ir, lr=0.01))
    state = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def eager_step() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    rows.append(
        (
            "MLP 784-392-10 SGD step, batch 64",
            _compare(eager_step, lambda: train.run((x, y), {}, state), opts.repeat, 50),
        )
    )

    print(f"{'case':40} {'eager us':>10} {'replay us':>10} {'ratio':>7}")
    for label, (eager, replay, ratio) in rows:
        print(f"{label:40} {eager * 1e6:10.1f} {replay * 1e6:10.1f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
