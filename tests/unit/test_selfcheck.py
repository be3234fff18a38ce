"""Tests for producer.plans.selfcheck: the build-time eager-vs-replay check and state swapping."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import producer as fp
from consumer.runtime.interpreter import LoadedPlan
from producer.plans.capture import trace
from producer.plans.selfcheck import clone_tree, self_check, swapped
from schemas.errors import PlanBuildError


def test_a_deterministic_function_passes_the_self_check() -> None:
    w = torch.randn(3, 2, requires_grad=True)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = (x @ w).pow(2).mean()
        loss.backward()
        with torch.no_grad():
            w.sub_(0.1 * w.grad)
        return loss

    x = torch.randn(4, 3)
    before = w.detach().clone()
    with swapped([w], [w.detach().clone().requires_grad_(True)]):
        ir = trace(step, (x,), name="step", state={"w": w}).ir
    loaded = LoadedPlan(ir)
    self_check(step, lambda a, k, s: loaded.run(a, k, s), {"w": w}, (x,), {}, name="step")
    assert torch.equal(w, before) and w.grad is None


def test_hidden_python_state_fails_the_self_check() -> None:
    calls: list[int] = []

    def scaled(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * len(calls)

    with pytest.raises(PlanBuildError, match="does not replay like the eager"):
        fp.func2plan(scaled).build(torch.ones(2))


def test_manual_seed_inside_a_plan_fails_the_self_check() -> None:
    def noisy(x: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return x + torch.randn(2)

    with pytest.raises(PlanBuildError, match="max difference"):
        fp.func2plan(noisy).build(torch.ones(2))


def test_unseeded_randomness_replays_from_the_same_seed_and_passes() -> None:
    def drop(x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, p=0.5, training=True)

    rng = torch.get_rng_state()
    drop(torch.ones(50))
    after_one_eager_call = torch.get_rng_state()
    torch.set_rng_state(rng)
    plan = fp.func2plan(drop).build(torch.ones(50))
    assert plan.is_built and torch.equal(torch.get_rng_state(), after_one_eager_call)


def test_swapped_lends_the_stand_in_values_and_keeps_the_results_in_the_stand_ins() -> None:
    live = torch.zeros(2, requires_grad=True)
    stand_in = torch.ones(2, requires_grad=True)
    with swapped([live], [stand_in]):
        assert torch.equal(live, torch.ones(2))
        with torch.no_grad():
            live.mul_(3)
    assert torch.equal(live, torch.zeros(2)) and torch.equal(stand_in, torch.full((2,), 3.0))


def test_swapped_copies_values_when_a_live_graph_holds_the_tensor() -> None:
    live = torch.zeros(2, requires_grad=True)
    graph = (live * 2).sum()  # keeps an AccumulateGrad reference: swap_tensors refuses
    stand_in = torch.zeros(2, requires_grad=True)
    with swapped([live], [stand_in]), torch.no_grad():
        live.add_(1)
    assert torch.equal(live, torch.zeros(2)) and torch.equal(stand_in, torch.ones(2))
    with swapped([live], [torch.zeros(2, requires_grad=True)]):
        (live * 3).sum().backward()
    assert live.grad is None
    graph.backward()  # reading only did not invalidate the graph that was alive
    assert torch.equal(live.grad, torch.full((2,), 2.0))  # type: ignore[arg-type]


def test_clone_tree_copies_tensors_and_keeps_structure_and_requires_grad() -> None:
    a = torch.ones(1, requires_grad=True)
    tree: Any = {"a": (a, [torch.zeros(1), 3])}
    copy = clone_tree(tree)
    assert copy["a"][0] is not a and copy["a"][0].requires_grad and copy["a"][1][1] == 3
    assert torch.equal(copy["a"][1][0], torch.zeros(1))
