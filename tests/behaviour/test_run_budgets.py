"""Issue 11 budgets on both transports: input-dependent allocations, wall time, a flood of
slow commands from one producer while another's work completes, what search shows of
private data. After every refusal, valid work still succeeds (compared with eager torch).
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import producer as fp
from schemas.errors import PolicyError, TimeLimitError
from tests.behaviour import test_device_policy as policy_tests
from tests.behaviour.test_device_policy import Operator

device_name = policy_tests.device_name  # the fixtures: a device of its own, a second producer
second = policy_tests.second


@fp.func2plan(args_shape=[(-1,)])
def _outer_sum(x: torch.Tensor) -> torch.Tensor:
    return torch.outer(x, x).sum(dim=0)


def test_an_allocation_that_depends_on_the_inputs_is_refused_before_it_runs(
    fleet: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    Operator(fleet, device_name).policy(budgets={"max_alloc_bytes": 1024 * 1024})
    plan = _outer_sum.send(alice)  # no literal sizes: stored
    huge = fp.send(torch.ones(1_000_000), alice)  # outer(huge, huge) would be 4 TB
    with pytest.raises(PolicyError, match=r"budgets\.max_alloc_bytes") as refused:
        plan(huge).wait()
    assert "4000004000000 bytes" in str(refused.value)  # outer + its sum
    with pytest.raises(PolicyError, match=r"budgets\.max_alloc_bytes"):
        alice.run_op("torch.outer", [huge, huge]).wait()  # an op: measured the same way
    x = torch.arange(100.0)
    small = fp.send(x, alice)
    assert torch.equal(plan(small).get(), torch.outer(x, x).sum(dim=0))


@fp.func2plan(args_shape=[(-1,)])
def _guarded_outer(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # a guard on a value: the pre-check on meta tensors cannot follow it
        return torch.outer(x, x) + 1
    return x


def test_an_allocation_the_pre_check_cannot_see_is_stopped_while_the_plan_runs(
    fleet: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    Operator(fleet, device_name).policy(budgets={"max_alloc_bytes": 1024 * 1024})
    plan = _guarded_outer.send(alice)
    x = torch.ones(1000)  # outer: 4 MB, past the 1 MiB budget
    with pytest.raises(PolicyError, match=r"budgets\.max_alloc_bytes"):
        plan(fp.send(x, alice)).wait()
    y = torch.ones(100)
    assert torch.equal(plan(fp.send(y, alice)).get(), torch.outer(y, y) + 1)


@fp.func2plan(args_shape=[(-1, 256), (256, 256)])
def _slow(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    for _ in range(300):
        x = torch.tanh(x @ w)
    return x


def test_a_plan_past_the_wall_time_budget_is_stopped_with_a_time_limit_naming_it(
    fleet: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    plan = _slow.send(alice)
    w = torch.randn(256, 256) / math.sqrt(256)
    x = fp.send(torch.randn(4096, 256), alice)  # 300 steps of 4096x256x256: many seconds
    w_ptr = fp.send(w, alice)
    operator.policy(budgets={"max_wall_seconds": 1})
    started = time.monotonic()
    with pytest.raises(TimeLimitError, match="max_wall_seconds") as stopped:
        plan(x, w_ptr).wait()
    assert "time limit of 1 s" in str(stopped.value)
    assert time.monotonic() - started < 60  # stopped, not run to its end
    small = torch.randn(2, 256)
    got = plan(fp.send(small, alice), w_ptr).get()
    assert torch.allclose(got, _slow_eager(small, w), atol=1e-5)


def _slow_eager(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    for _ in range(300):
        x = torch.tanh(x @ w)
    return x


@fp.func2plan(args_shape=[(-1, 256), (256, 256)])
def _slowish(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    for _ in range(160):  # 512 rows: >= 0.1 s of device time on any machine
        x = torch.tanh(x @ w)
    return x


def _outcomes(pointers: list[fp.PointerTensor], rule: str) -> tuple[int, int]:
    """(ran, refused) of a flood's commands; every refusal is typed and names ``rule``."""
    ran = refused = 0
    for pointer in pointers:
        try:
            pointer.wait()
            ran += 1
        except PolicyError as exc:
            assert f"budgets.{rule}" in str(exc), exc
            refused += 1
    return ran, refused


def _wait_for_refill(device: fp.Device, rule: str, extra: float) -> None:
    """Until the device admits the producer again (a refusal says how long to wait), then
    ``extra`` seconds more of refill for the valid work that follows."""
    for _ in range(5):
        try:
            device.send_tensor(torch.zeros(2)).wait()
            time.sleep(extra)
            return
        except PolicyError as exc:
            assert f"budgets.{rule}" in str(exc)
            time.sleep(float(str(exc).split("again in ")[1].split(" s")[0]) + 0.5)
    raise AssertionError("the producer was not admitted again")


FLOOD = 300
PER_MINUTE = 30


def test_a_flood_of_commands_from_one_producer_is_refused_past_its_rate_as_anothers_completes(
    fleet: fp.Fleet, second: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    theirs = second.device(device_name)
    Operator(fleet, device_name).policy(budgets={"max_commands_per_minute": PER_MINUTE})
    started = time.monotonic()
    flood = [theirs.send_tensor(torch.ones(4)) for _ in range(FLOOD)]  # FIFO before mine
    mine = fp.send(torch.arange(4.0), alice)
    assert torch.equal(mine.get(), torch.arange(4.0))  # completes behind the flood
    ran, refused = _outcomes(flood, "max_commands_per_minute")
    elapsed = time.monotonic() - started
    allowed = PER_MINUTE + math.ceil(elapsed * PER_MINUTE / 60) + 1  # a bucket + its refill
    assert ran + refused == FLOOD
    assert ran <= allowed and refused >= FLOOD - allowed, (ran, refused, elapsed)
    _wait_for_refill(theirs, "max_commands_per_minute", extra=3 * 60 / PER_MINUTE)
    assert torch.equal(theirs.send_tensor(torch.ones(3)).get(), torch.ones(3))


SLOW_FLOOD = 200


def test_a_flood_of_slow_commands_from_one_producer_is_refused_past_its_device_time(
    fleet: fp.Fleet, second: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    theirs = second.device(device_name)
    plan = theirs.send_plan(_slowish)
    w = torch.randn(256, 256) / 16
    x, w_ptr = theirs.send_tensor(torch.randn(512, 256)), theirs.send_tensor(w)
    x.wait()
    w_ptr.wait()
    Operator(fleet, device_name).policy(budgets={"max_device_seconds_per_minute": 6})
    flood = [plan(x, w_ptr) for _ in range(SLOW_FLOOD)]  # >= 20 s of device time, FIFO
    mine = fp.send(torch.arange(4.0), alice)
    assert torch.equal(mine.get(), torch.arange(4.0))  # completes behind the flood
    ran, refused = _outcomes(flood, "max_device_seconds_per_minute")
    assert ran + refused == SLOW_FLOOD
    assert ran >= 1 and refused >= SLOW_FLOOD // 2, (ran, refused)
    _wait_for_refill(theirs, "max_device_seconds_per_minute", extra=20.0)  # 2 s of time
    small = torch.randn(2, 256)
    got = plan(theirs.send_tensor(small), w_ptr).get()
    assert torch.allclose(got, _slowish_eager(small, w), atol=1e-5)


def _slowish_eager(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    for _ in range(160):
        x = torch.tanh(x @ w)
    return x


def test_search_shows_private_device_data_only_as_a_pointer_named_by_its_tag(
    fleet: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    operator.add_data("secret-rows", torch.ones(5, 3), "#train", "#hospital-a")
    operator.add_data("open-rows", torch.ones(2), "#open")
    operator.policy(public_tags=["#open"])
    [rows] = alice.search("#train")
    assert rows.tags == ("#train",)  # not the tags the producer did not name
    assert rows.shape == torch.Size([5, 3])  # what a plan on it is built for
    assert "secret-rows" not in alice.objects() and "open-rows" in alice.objects()
    assert all(p.id != "secret-rows" for p in alice.search())  # no tag named: not shown
    total = (rows * 2).sum()  # usable as before
    with pytest.raises(PolicyError):
        total.get()
    [public] = alice.search("#open")
    assert torch.equal(public.get(), torch.ones(2))
