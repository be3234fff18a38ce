"""The fixed FedAvg comparison task (benchmarks/fedavg_digits_task.md) and its measurements.

Imported by every implementation of the benchmark (plain loop, fedplan, Flower): the data,
the partition, the model, the client step, the server FedAvg and the timing rules are
defined once, here, verbatim from the task text. Needs only torch, numpy and scikit-learn.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

N_CLIENTS = 8
ROUNDS = 20
LR = 0.1
BATCH = 32
EXPECTED_ACCURACY = 0.8944
EXPECTED_LOSS = 0.9335


def load_task() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[np.ndarray]]:
    """``x_train, y_train, x_test, y_test, parts`` exactly as the task fixes them."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y
    )
    perm = np.random.default_rng(0).permutation(len(x_train))
    parts = np.array_split(perm, N_CLIENTS)
    return (
        torch.from_numpy(x_train),
        torch.from_numpy(y_train),
        torch.from_numpy(x_test),
        torch.from_numpy(y_test),
        parts,
    )


class Net(nn.Module):
    """fc1 = Linear(64, 64) -> ReLU -> fc2 = Linear(64, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def initial_model() -> Net:
    """``torch.manual_seed(0)``; then the global model."""
    torch.manual_seed(0)
    return Net()


def client_order(r: int, k: int, n_k: int) -> torch.Tensor:
    """The sample order of client ``k`` in round ``r`` (1-based)."""
    g = torch.Generator().manual_seed(1000 * r + k)
    return torch.randperm(n_k, generator=g)


def client_update(
    net: nn.Module,
    weights: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    r: int,
    k: int,
) -> dict[str, torch.Tensor]:
    """One epoch of SGD(lr=0.1) with batch 32 (last short batch kept) from ``weights``."""
    net.load_state_dict(weights)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=0, weight_decay=0)
    order = client_order(r, k, len(x))
    for s in range(0, len(x), BATCH):
        idx = order[s : s + BATCH]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k_: v.detach().clone() for k_, v in net.state_dict().items()}


def fedavg(results: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """``w = sum_k (n_k / sum_j n_j) * w_k`` per tensor, float32."""
    total = sum(n for _, n in results)
    return {
        name: sum(
            (w[name] * (n / total) for w, n in results[1:]),
            results[0][0][name] * (results[0][1] / total),
        )
        for name in results[0][0]
    }


@torch.no_grad()
def central_eval(
    net: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> tuple[float, float]:
    """``(accuracy, loss)`` of the global model on all 360 test rows in one batch."""
    net.load_state_dict(weights)
    out = net(x)
    return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))


def task_threads() -> int:
    """Set torch's intra-op threads for this process as every compared run does; return them.

    ``FEDAVG_TORCH_THREADS`` (default 1). One thread is what fedplan's devices use (each
    embedded device thread and each Celery pool process caps itself at one), so the floor
    and the server side run with the same count; with torch's default (one per core) the
    floor's tiny ops spin two OpenMP threads, which on a shared machine costs it several
    times its quiet time. Call it first, before any torch op.
    """
    threads = int(os.environ.get("FEDAVG_TORCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def warm_up_sgd() -> None:
    """Pay the first-SGD cost (``torch._dynamo`` import) now, as a long-lived device would."""
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=LR)
    p.sum().backward()
    opt.step()


def process_start_time() -> float:
    """Wall-clock start of this process, from ``/proc/self/stat`` (10 ms resolution)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])  # field 22 overall: starttime, in clock ticks since boot
    with open("/proc/stat") as f:
        btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return btime + start_ticks / os.sysconf("SC_CLK_TCK")


def _tree_rss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/statm") as f:
                rss[int(entry)] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


class TreeMemory:
    """Samples the RSS of this process and all its descendants (workers, Ray, SuperNodes)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(me))
            self._stop.wait(interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
        return self.peak


@dataclass
class Timeline:
    """The task's clock: ``t_0`` after the initial evaluation, ``t_r`` after round r's."""

    name: str
    start: float = field(default_factory=process_start_time)
    marks: list[float] = field(default_factory=list)
    cpu_marks: list[float] = field(default_factory=list)
    """This process's CPU time (all its threads) at each mark: a load-independent cost."""
    accuracy: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    memory: TreeMemory = field(default_factory=TreeMemory)
    notes: str = ""

    def mark(self, accuracy: float, loss: float) -> None:
        self.marks.append(time.time())
        self.cpu_marks.append(time.process_time())
        self.accuracy.append(accuracy)
        self.loss.append(loss)

    def report(self) -> dict[str, object]:
        rounds = [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]
        peak = self.memory.stop()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "name": self.name,
            "rounds": len(rounds),
            "round_first_s": rounds[0] if rounds else None,
            "round_median_s": float(np.median(rounds)) if rounds else None,
            "round_warm_median_s": float(np.median(rounds[1:])) if len(rounds) > 1 else None,
            "round_warm_median_cpu_s": (
                float(np.median(np.diff(self.cpu_marks)[1:])) if len(rounds) > 1 else None
            ),
            "rounds_total_s": self.marks[-1] - self.marks[0],
            "launch_to_final_s": self.marks[-1] - self.start,
            "peak_rss_tree_mib": peak / 2**20,
            "peak_rss_top_mib": own / 2**20,
            "final_accuracy": self.accuracy[-1],
            "final_loss": self.loss[-1],
            "notes": self.notes,
        }


def emit(report: dict[str, object]) -> None:
    """Print the report as the last line of stdout (the driver reads it)."""
    sys.stdout.flush()
    print("BENCH-RESULT " + json.dumps(report), flush=True)


Runner = Callable[[], dict[str, object]]
__all__ = [
    "Net",
    "Timeline",
    "asdict",
    "central_eval",
    "client_update",
    "emit",
    "fedavg",
    "initial_model",
    "load_task",
]
