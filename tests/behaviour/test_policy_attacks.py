"""Issue 11 attack round on both transports: ways around tenancy and the private-data rules
that the first round did not try (in-place writes into device data, views that alias another
object, plan outputs that alias a plan's inputs or state), each followed by valid work.
"""

from __future__ import annotations

import pytest
import torch

import producer as fp
from consumer.store.sqlite import SqliteStore
from schemas import command_pb2 as cmd
from schemas.errors import ObjectNotFound, PolicyError
from schemas.ir import ObjectId
from schemas.value_codec import value_to_proto
from tests.behaviour.test_device_policy import (  # noqa: F401 (fixtures)
    Operator,
    device_name,
    second,
)


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


@fp.func2plan(args_shape=[(2,)])
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_every_way_of_naming_another_producers_id_fails_exactly_like_a_missing_id(
    fleet: fp.Fleet,
    second: fp.Fleet,  # noqa: F811
    device_name: str,  # noqa: F811
) -> None:
    alice = fleet.device(device_name)
    mine = alice.send_tensor(torch.ones(2)).wait()
    plan = _double.send(alice)
    plan(mine).wait()
    theirs = second.device(device_name)

    def _neg(object_id: str) -> cmd.RunOp:
        msg = cmd.RunOp(target="torch.neg")
        msg.args.items.append(value_to_proto(ObjectId(object_id)))
        return msg

    def run_plan(plan_id: str) -> cmd.RunPlan:
        msg = cmd.RunPlan(plan_id=plan_id, result_ids=["r"])
        msg.args.items.append(value_to_proto(ObjectId("anything")))
        return msg

    attempts = {
        "get": lambda i: ("get_object", cmd.GetObject(id=i)),
        "get and delete": lambda i: ("get_object", cmd.GetObject(id=i, delete=True)),
        "move": lambda i: ("move_object", cmd.MoveObject(id=i, destination_device=theirs.id)),
        "op input": lambda i: (
            "run_op",
            _neg(i),
        ),
    }
    plan_attempts = {
        "get plan": lambda i: ("get_plan", cmd.GetPlan(plan_id=i)),
        "run plan": lambda i: ("run_plan", run_plan(i)),
    }

    def error(body: str, msg: object) -> str:
        with pytest.raises(ObjectNotFound) as refused:
            second.submit(theirs.id, body, msg, ("r",) if body == "run_plan" else ()).reply(60)
        return str(refused.value)

    for name, build in [*attempts.items(), *plan_attempts.items()]:
        existing = mine.id if name in attempts else plan.id
        taken = error(*build(existing)).replace(existing, "ID")
        missing = error(*build("never-stored")).replace("never-stored", "ID")
        assert taken == missing, name  # byte for byte: "not yours" reads as "not there"
    assert torch.equal(plan(mine).get(), torch.full((2,), 2.0))  # the owner's plan works
    assert torch.equal(mine.get(), torch.ones(2))  # and its object is intact


def test_the_shape_of_a_value_derived_from_private_data_does_not_reveal_the_data(
    fleet: fp.Fleet,
    device_name: str,  # noqa: F811
) -> None:
    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    operator.add_data("count", torch.tensor(7), "#count")
    [count] = alice.search("#count")
    derived = alice.run_op("torch.arange", [count]).wait()
    with pytest.raises(PolicyError, match="withholds the shape"):
        derived.shape  # noqa: B018
    assert derived.known_shape is None
    with pytest.raises(PolicyError):
        derived.get()
    # the operator's public data keeps its shape, and so does what is derived from it
    operator.add_data("open", torch.ones(3), "#open")
    operator.policy(public_tags=["#open"])
    [open_data] = alice.search("#open")
    assert alice.run_op("torch.mul", [open_data, 2.0]).wait().shape == (3,)
