"""Tests of producer.fl.rounds: sampling, deadline, quorum, late replies, retries."""

from __future__ import annotations

import threading

import pytest
import torch

from producer.fl.rounds import (
    Deliver,
    FitReply,
    FitTask,
    RoundPolicy,
    RoundRunner,
    sample_devices,
)
from producer.fl.strategy import FedAvg, FitResult
from schemas.errors import FedplanError


class Scripted:
    """A participant whose behaviour per round is scripted: reply, fail, hang or hold."""

    def __init__(self, device_id: str, value: float, n: int = 1) -> None:
        self._id = device_id
        self.value = value
        self.n = n
        self.behaviour: dict[int, str] = {}  # round -> "fail" | "hang" | "hold" | "raise"
        self.held: list[tuple[FitTask, Deliver]] = []
        self.tasks: list[FitTask] = []
        self.before: list[object] = []  # callables run at the start of each start_fit

    @property
    def device_id(self) -> str:
        return self._id

    def reply_for(self, task: FitTask) -> FitReply:
        w = {"w": task.instructions.weights["w"] + self.value}
        return FitReply(task.task_id, self._id, FitResult(self._id, w, self.n, {"loss": 1.0}))

    def start_fit(self, task: FitTask, deliver: Deliver) -> None:
        for fn in self.before:
            fn()  # type: ignore[operator]
        self.tasks.append(task)
        how = self.behaviour.get(task.server_round, "ok")
        if how == "raise":
            raise ConnectionError("device unreachable")
        if how == "fail":
            deliver(FitReply(task.task_id, self._id, error="PlanExecutionError: boom"))
        elif how in ("hang", "hold"):
            self.held.append((task, deliver))
        else:
            threading.Thread(target=deliver, args=(self.reply_for(task),)).start()


W0 = {"w": torch.zeros(1)}


def test_sampling_is_deterministic_and_without_replacement() -> None:
    ids = [f"d{i}" for i in range(10)]
    a = sample_devices(ids, 4, seed=1, server_round=3, attempt=1)
    assert a == sample_devices(ids, 4, seed=1, server_round=3, attempt=1)
    assert len(set(a)) == 4 and a == sorted(a)
    assert sample_devices(ids, 10, seed=1, server_round=3, attempt=1) == list(range(10))


def test_policy_counts_target_over_selection_and_quorum() -> None:
    p = RoundPolicy(fraction=0.5, min_fit=2, over_selection=1.3, quorum=0.75)
    assert (p.target(10), p.selected(10), p.needed(10)) == (5, 7, 4)
    assert (p.target(2), p.selected(2)) == (2, 2)


def test_a_round_averages_every_reply_in_device_order() -> None:
    parts = [Scripted("a", 1.0, 1), Scripted("b", 4.0, 3)]
    out = RoundRunner(parts, FedAvg()).run_round(1, W0)
    assert out.committed and [r.device_id for r in out.results] == ["a", "b"]
    assert out.weights is not None
    torch.testing.assert_close(out.weights["w"], torch.tensor([(1.0 * 1 + 4.0 * 3) / 4]))


def test_each_device_trains_with_the_seed_of_its_round_and_index() -> None:
    parts = [Scripted(f"d{i}", 0.0) for i in range(3)]
    RoundRunner(parts, FedAvg()).run_round(4, W0)
    assert [p.tasks[0].seed for p in parts] == [4000, 4001, 4002]


def test_a_hanging_device_does_not_hold_the_round_past_its_deadline() -> None:
    parts = [Scripted("a", 1.0), Scripted("b", 2.0), Scripted("c", 3.0)]
    parts[2].behaviour[1] = "hang"
    policy = RoundPolicy(deadline=0.3, quorum=0.6)
    out = RoundRunner(parts, FedAvg(), policy).run_round(1, W0)
    assert out.committed and [f.kind for f in out.failures] == ["timeout"]
    assert out.weights is not None
    torch.testing.assert_close(out.weights["w"], torch.tensor([1.5]))


def test_failed_devices_are_reported_to_the_strategy_and_the_round_commits_on_quorum() -> None:
    parts = [Scripted("a", 1.0), Scripted("b", 2.0), Scripted("c", 3.0)]
    parts[0].behaviour[1] = "fail"
    parts[1].behaviour[1] = "raise"
    seen: list[list[str]] = []

    class Spy(FedAvg):
        def aggregate_fit(self, server_round, weights, results, failures):  # type: ignore[no-untyped-def]
            seen.append([f"{f.device_id}:{f.kind}" for f in failures])
            return super().aggregate_fit(server_round, weights, results, failures)

    out = RoundRunner(parts, Spy(), RoundPolicy(quorum=0.3)).run_round(1, W0)
    assert out.committed and seen == [["a:error", "b:error"]]
    assert "boom" in out.failures[0].message and "unreachable" in out.failures[1].message


def test_a_round_without_quorum_is_abandoned_and_retried_not_committed() -> None:
    parts = [Scripted("a", 1.0), Scripted("b", 2.0)]
    parts[1].behaviour[1] = "fail"
    runner = RoundRunner(parts, FedAvg(), RoundPolicy(quorum=1.0, max_attempts=2))
    first = runner.run_attempt(1, 1, W0)
    assert not first.committed and "1 of 2" in first.reason
    # attempt 2 succeeds because device b only failed in round 1's first call
    parts[1].behaviour.clear()
    out = runner.run_round(1, W0)
    assert out.committed and out.attempt == 1


def test_a_round_that_never_reaches_quorum_raises_after_its_attempts() -> None:
    parts = [Scripted("a", 1.0)]
    parts[0].behaviour[1] = "fail"
    runner = RoundRunner(parts, FedAvg(), RoundPolicy(max_attempts=3))
    with pytest.raises(FedplanError, match="abandoned 3 times"):
        runner.run_round(1, W0)
    assert [t.attempt for t in parts[0].tasks] == [1, 2, 3]
    assert len({t.task_id for t in parts[0].tasks}) == 3


def test_a_late_reply_from_an_earlier_round_is_ignored_by_its_result_id() -> None:
    slow, fast = Scripted("slow", 100.0), Scripted("fast", 1.0)
    slow.behaviour[1] = "hold"
    runner = RoundRunner([slow, fast], FedAvg(), RoundPolicy(deadline=0.3, quorum=0.5))
    r1 = runner.run_round(1, W0)
    assert r1.weights is not None and [r.device_id for r in r1.results] == ["fast"]

    def release_late_reply() -> None:
        for task, deliver in [h for h in slow.held if h[0].server_round == 1]:
            slow.held.remove((task, deliver))
            deliver(slow.reply_for(task))  # the round-1 reply arrives during round 2

    fast.before.append(release_late_reply)
    slow.behaviour[2] = "hang"
    r2 = runner.run_round(2, r1.weights)
    assert r2.weights is not None and r2.late_replies == 1 and runner.late_replies == 1
    torch.testing.assert_close(r2.weights["w"], torch.tensor([2.0]))


def test_over_selection_closes_the_round_once_the_target_replied() -> None:
    parts = [Scripted(f"d{i}", float(i)) for i in range(4)]
    parts[3].behaviour[1] = "hang"
    policy = RoundPolicy(fraction=0.75, over_selection=1.34, deadline=30.0)
    out = RoundRunner(parts, FedAvg(), policy).run_round(1, W0)
    # 3 wanted, 4 asked: the round closes when 3 replied, long before the 30 s deadline
    assert len(out.results) == 3 and [f.kind for f in out.failures] == ["dropped"]
    assert out.seconds < 30.0


def test_too_few_available_devices_stop_the_job() -> None:
    with pytest.raises(FedplanError, match="min_available"):
        RoundRunner([Scripted("a", 1.0)], FedAvg(), RoundPolicy(min_available=2)).run_round(1, W0)
