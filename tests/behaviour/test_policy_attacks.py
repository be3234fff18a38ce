"""Issue 11 attack round on both transports: ways around tenancy and the private-data rules
that the first round did not try (in-place writes into device data, views that alias another
object, plan outputs that alias a plan's inputs or state), each followed by valid work.
"""

from __future__ import annotations

import pytest
import torch

import producer as fp
from consumer.store.sqlite import SqliteStore
from schemas.errors import PolicyError
from tests.behaviour.test_device_policy import Operator, device_name  # noqa: F401 (fixture)


def _device_value(operator: Operator, object_id: str) -> torch.Tensor:
    """The operator's own reading of a stored object (its store, not a producer's get())."""
    if operator.embedded:
        return operator._runtime().store.get_object(object_id).tensor.clone()
    from tests.integration.fleet import data_dir

    return SqliteStore(data_dir(operator.device_id)).get_object(object_id).tensor.clone()


def test_a_producer_cannot_write_private_values_into_device_data_public_or_private(
    fleet: fp.Fleet,
    device_name: str,  # noqa: F811
) -> None:
    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    operator.add_data("secret-rows", torch.tensor([3.0, -4.0]), "#train")
    operator.add_data("open-rows", torch.ones(2), "#open")
    operator.policy(public_tags=["#open"])
    [secret] = alice.search("#train")
    [public] = alice.search("#open")
    alice.run_op("Tensor.copy_", [public, secret]).wait()  # private values into public data
    assert torch.equal(public.get(), torch.ones(2))
    alice.run_op("Tensor.zero_", [secret]).wait()  # the operator's data is not changed
    assert torch.equal(_device_value(operator, "secret-rows"), torch.tensor([3.0, -4.0]))
    view = alice.run_op("Tensor.view", [public, [-1]])  # through a view of public data
    alice.run_op("Tensor.copy_", [view, secret]).wait()
    assert torch.equal(public.get(), torch.ones(2))
    assert torch.equal((public * 3).get(), torch.full((2,), 3.0))  # valid work goes on


@fp.func2plan(args_shape=[(2,)])
def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def test_private_values_written_through_an_alias_make_the_aliased_object_private(
    fleet: fp.Fleet,
    device_name: str,  # noqa: F811
) -> None:
    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    operator.add_data("secret-rows", torch.tensor([3.0, -4.0]), "#train")
    [secret] = alice.search("#train")
    own = alice.send_tensor(torch.zeros(2)).wait()
    view = alice.run_op("Tensor.view", [own, [-1]])  # an op result that is a view of mine
    alice.run_op("Tensor.copy_", [view, secret]).wait()
    with pytest.raises(PolicyError):
        own.get()  # it follows its view, as in eager torch: private now
    other = alice.send_tensor(torch.zeros(2)).wait()
    returned = alice.run_op("Tensor.add_", [other, 0.0])  # returns its argument itself
    alice.run_op("Tensor.copy_", [returned, secret]).wait()
    with pytest.raises(PolicyError):
        other.get()
    plan = _identity.send(alice)
    mine = alice.send_tensor(torch.zeros(2)).wait()
    out = plan(mine)  # a plan output that is its input
    alice.run_op("Tensor.copy_", [out, secret]).wait()
    with pytest.raises(PolicyError):
        mine.get()
    fresh = alice.send_tensor(torch.ones(2)).wait()
    assert torch.equal((fresh + 1).get(), torch.full((2,), 2.0))  # valid work goes on
