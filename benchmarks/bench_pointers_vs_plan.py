"""Op-by-op pointer execution vs the equivalent plan: commands per call and wall time.

Two computations, each checked against eager torch before it is timed:

- ``ten_ops``: a 10-op elementwise function of two (256, 256) tensors held by the device;
- ``mlp_step``: one SGD training step of a 64-32-10 MLP on a batch of 64 held by the
  device (forward, cross-entropy, ``backward()``, ``optimizer.step()``), the model kept on
  the device between steps (``fp.send(model, device)`` vs a plan whose state is the model).

Every call ends with fetching its result (``get()``), so each mode is timed end to end.
Every command gets one reply, so messages = 2 x commands.

Run: ``.venv/bin/python benchmarks/bench_pointers_vs_plan.py [--transport rabbitmq]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn, optim

import producer as fp

LR = 0.1


def ten_ops(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = x + y
    z = z * 2.0
    z = z - y
    z = torch.abs(z)
    z = z + 1.0
    z = torch.sqrt(z)
    z = torch.tanh(z)
    z = z * x
    z = torch.sigmoid(z)
    return z / 3.0


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TrainStep(fp.Plan):
    """One SGD step of the MLP; the model and optimizer are the plan's state on the device."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(name="mlp_step")
        self.model = copy.deepcopy(model)
        self.opt = optim.SGD(self.model.parameters(), lr=LR)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.model(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()  # the device clears state gradients after each call anyway
        return loss.detach()


class Counting:
    """Counts the commands a fleet publishes, by kind."""

    def __init__(self, fleet: fp.Fleet) -> None:
        self.counts: Counter[str] = Counter()
        submit = fleet.submit

        def counted(device_id: str, body: str, *args: Any, **kwargs: Any) -> Any:
            self.counts[body] += 1
            return submit(device_id, body, *args, **kwargs)

        fleet.submit = counted  # type: ignore[method-assign]

    def per_call(self, calls: int) -> dict[str, float]:
        return {k: v / calls for k, v in sorted(self.counts.items())}


def measure(
    counting: Counting, call: Callable[[], Any], *, warmup: int, calls: int
) -> dict[str, Any]:
    for _ in range(warmup):
        call()
    counting.counts.clear()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    per_call = counting.per_call(calls)
    return {
        "commands": sum(per_call.values()),
        "by_kind": per_call,
        "ms_median": 1000 * statistics.median(times),
        "ms_p90": 1000 * sorted(times)[int(0.9 * (len(times) - 1))],
    }


def bench_ten_ops(fleet: fp.Fleet, device: fp.Device, calls: int) -> dict[str, Any]:
    counting = Counting(fleet)
    torch.manual_seed(0)
    x, y = torch.randn(256, 256), torch.randn(256, 256)
    x_ptr, y_ptr = fp.send(x, device), fp.send(y, device)
    expected = ten_ops(x, y)
    torch.testing.assert_close(ten_ops(x_ptr, y_ptr).get(), expected)  # type: ignore[arg-type]
    plan = fp.func2plan(args_shape=[(256, 256), (256, 256)])(ten_ops)
    pointer_plan = plan.send(device)
    torch.testing.assert_close(pointer_plan(x_ptr, y_ptr).get(), expected)
    return {
        "pointers": measure(
            counting,
            lambda: ten_ops(x_ptr, y_ptr).get(),  # type: ignore[arg-type]
            warmup=3,
            calls=calls,
        ),
        "plan": measure(counting, lambda: pointer_plan(x_ptr, y_ptr).get(), warmup=3, calls=calls),
        "plan_return_values": measure(
            counting,
            lambda: pointer_plan.run(x_ptr, y_ptr, return_values=True).get(),
            warmup=3,
            calls=calls,
        ),
    }


def bench_mlp_step(fleet: fp.Fleet, device: fp.Device, calls: int) -> dict[str, Any]:
    counting = Counting(fleet)
    torch.manual_seed(1)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    x_ptr, y_ptr = fp.send(x, device), fp.send(y, device)
    model = MLP()
    eager, remote = copy.deepcopy(model), copy.deepcopy(model)
    eager_opt = optim.SGD(eager.parameters(), lr=LR)
    remote_opt = optim.SGD(remote.parameters(), lr=LR)
    fp.send(remote, device)
    plan = TrainStep(model)
    plan.build(x, y)
    pointer_plan = plan.send(device)

    def eager_step() -> torch.Tensor:
        loss = F.cross_entropy(eager(x), y)
        eager_opt.zero_grad()
        loss.backward()
        eager_opt.step()
        return loss.detach()

    def pointer_step() -> torch.Tensor:
        loss = F.cross_entropy(remote(x_ptr), y_ptr)
        remote_opt.zero_grad()
        loss.backward()
        remote_opt.step()
        return loss.get()

    def plan_step() -> torch.Tensor:
        return pointer_plan(x_ptr, y_ptr).get()

    for _ in range(2):  # the same computation: both match eager step for step
        expected = eager_step()
        torch.testing.assert_close(pointer_step().detach(), expected)
        torch.testing.assert_close(plan_step(), expected)
    results = {
        "pointers": measure(counting, pointer_step, warmup=2, calls=calls),
        "plan": measure(counting, plan_step, warmup=2, calls=calls),
    }
    fp.get_module(remote)
    return results


def run(transport: str, calls: int) -> dict[str, Any]:
    fleet: fp.Fleet
    cleanup: list[Callable[[], None]] = []
    if transport == "rabbitmq":
        from bench_fedavg_fedplan import Vhost

        from producer.fl.demo import DeviceData, spawn_workers

        vhost = Vhost().__enter__()
        cleanup.append(vhost.__exit__)
        root = Path(tempfile.mkdtemp(prefix="fedplan-bench-pointers-"))
        empty = torch.zeros(0)
        workers = spawn_workers([DeviceData("bench", empty, empty, empty, empty)], root, vhost.url)
        cleanup.insert(0, workers.stop)
        fleet = fp.connect(vhost.url, timeout=120.0)
    else:
        fleet = fp.connect()
    try:
        device = fleet.device("bench")
        device.clear_objects()
        return {
            "transport": transport,
            "calls": calls,
            "ten_ops": bench_ten_ops(fleet, device, calls),
            "mlp_step": bench_mlp_step(fleet, device, calls),
        }
    finally:
        fleet.close()
        for step in cleanup:
            step()


def table(report: dict[str, Any]) -> str:
    rows = [
        "| transport | computation | mode | commands/call | median ms/call | p90 ms/call |",
        "|---|---|---|---:|---:|---:|",
    ]
    for computation in ("ten_ops", "mlp_step"):
        for mode, r in report[computation].items():
            rows.append(
                f"| {report['transport']} | {computation} | {mode} | {r['commands']:.0f} "
                f"| {r['ms_median']:.2f} | {r['ms_p90']:.2f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("embedded", "rabbitmq"), default="embedded")
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    report = run(args.transport, args.calls)
    print(table(report))
    for computation in ("ten_ops", "mlp_step"):
        for mode, r in report[computation].items():
            print(f"{report['transport']} {computation} {mode}: {r['by_kind']}")


if __name__ == "__main__":
    main()
