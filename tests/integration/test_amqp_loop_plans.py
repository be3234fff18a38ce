"""The training loop inside the plan on real Celery workers: private data, approval by hash,
the device's step bound, and a worker that keeps serving after hostile loop settings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import producer as fp
from consumer.policy.rules import PolicyFile
from consumer.store.base import StoredObject
from consumer.store.sqlite import SqliteStore
from producer.fl.training import (
    TrainingSpec,
    build_training_plan,
    flatten,
    get_weights,
    sample_order,
    scratch_copy,
    train_eager,
)
from schemas.errors import LoopLimitError, PlanInputError, PolicyError
from schemas.plan_codec import plan_content_hash
from tests.integration.broker import WorkerProcess

pytestmark = pytest.mark.rabbitmq
SPEC = TrainingSpec(lr=0.2, batch_size=4, momentum=0.5)


def _rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_a_worker_runs_the_loop_over_its_private_data_only_for_an_approved_plan(
    vhost, workers: Callable[..., WorkerProcess]
) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    plan = build_training_plan(net, SPEC, feature_shape=(5,))
    x, y = _rows(11)
    worker = workers("loop-a", env={"FEDPLAN_MAX_LOOP_STEPS": "40"})
    store = SqliteStore(worker.data_dir)  # the operator: the device's own data, private
    store.put_object(StoredObject("loop-a-x", x, ("train", "x")))
    store.put_object(StoredObject("loop-a-y", y, ("train", "y")))
    w = get_weights(net)
    with fp.connect(vhost.url, timeout=60) as fleet:
        dev = fleet.device("loop-a")
        x_ptr, y_ptr = dev.search("train", "x")[0], dev.search("train", "y")[0]
        pointer_plan = plan.send(dev)

        def run(**loop: int) -> torch.Tensor:
            out = pointer_plan.run(x_ptr, y_ptr, flatten(w), return_values=True, **loop)
            result: torch.Tensor = out.get(timeout=120)
            return result

        with pytest.raises(PolicyError):  # the update is derived from private data
            run(epochs=1, batch_size=4, seed=1)
        PolicyFile(worker.data_dir).update(approve=[plan_content_hash(plan.ir)])
        got = run(epochs=3, batch_size=4, seed=7)  # 3 x 3 steps: under the bound
        spec = TrainingSpec(lr=0.2, batch_size=4, momentum=0.5, epochs=3)
        ref, loss = train_eager(scratch_copy(net), spec, w, x, y, sample_order(11, 7, 3))
        assert torch.allclose(got[:-1], flatten(ref), atol=1e-5)
        assert got[-1].item() == pytest.approx(loss, abs=1e-5)

        with pytest.raises(LoopLimitError, match="at most 40"):
            run(epochs=5, batch_size=1, seed=7)  # 55 steps: over FEDPLAN_MAX_LOOP_STEPS
        with pytest.raises(PlanInputError, match="batch_size"):
            run(epochs=1, batch_size=0, seed=7)
        again = run(epochs=3, batch_size=4, seed=7)  # the worker still serves, same result
        assert torch.equal(again, got)
        with pytest.raises(PolicyError):  # the data itself still cannot leave
            x_ptr.get()
