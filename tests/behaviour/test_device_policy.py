"""Issue 11 on both transports: tenancy between producers and the device owner's policy.

Every test attacks one rule (a second producer, private data, a derived value, an
unapproved plan, the same code under another name) and then checks that valid work still
succeeds. The *operator* of a device adds its own data and changes its policy the way the
device's owner does: on an embedded device through its runtime, on a Celery device in its
data dir (``SqliteStore`` + ``policy.json``, what ``fedplan data add`` and
``fedplan device policy`` write), applied without a restart.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import producer as fp
from consumer.policy.rules import Policy, PolicyFile
from consumer.store.base import StoredObject
from consumer.store.sqlite import SqliteStore
from producer.transport.local import LocalTransport
from schemas import command_pb2 as cmd
from schemas.errors import ObjectNotFound, PolicyError
from schemas.plan_codec import plan_content_hash
from schemas.tensor_codec import tensor_to_proto
from tests.behaviour.conftest import TransportCase


@dataclass
class Operator:
    """The owner of one device: its data and its policy."""

    fleet: fp.Fleet
    device_id: str

    def _runtime(self) -> Any:
        assert isinstance(self.fleet.transport, LocalTransport)
        return self.fleet.transport.runtime(self.device_id)

    @property
    def embedded(self) -> bool:
        return isinstance(self.fleet.transport, LocalTransport)

    def add_data(self, object_id: str, tensor: torch.Tensor, *tags: str) -> None:
        obj = StoredObject(object_id, tensor, tuple(tags))
        if self.embedded:
            self._runtime().store.put_object(obj)
        else:
            from tests.integration.fleet import data_dir

            SqliteStore(data_dir(self.device_id)).put_object(obj)

    def policy(
        self,
        *,
        producers: list[str] = (),  # type: ignore[assignment]
        public_tags: list[str] = (),  # type: ignore[assignment]
        approve: list[str] = (),  # type: ignore[assignment]
        budgets: dict[str, int] | None = None,
        trust: dict[str, str] | None = None,
    ) -> None:
        """Admit only ``producers`` (when given), add public tags, approved plan hashes and
        budgets."""
        if self.embedded:
            holder = self._runtime().policy_source
            current = holder.current().to_json()
            if producers:
                current["producers"] = list(producers)
            current["public_tags"] += list(public_tags)
            current["approved_plans"] += list(approve)
            current["budgets"].update(budgets or {})
            current["trusted_keys"].update(trust or {})
            holder.set(Policy.from_json(current))
        else:
            from tests.integration.fleet import data_dir

            PolicyFile(data_dir(self.device_id)).update(
                allow=list(producers),
                public_tags=list(public_tags),
                approve=list(approve),
                budgets=budgets,
                trust=trust,
            )

    def pending(self) -> list[str]:
        if self.embedded:
            return [p.content_hash for p in self._runtime().policy_source.pending()]
        from tests.integration.fleet import data_dir

        return [p.content_hash for p in PolicyFile(data_dir(self.device_id)).pending()]


@pytest.fixture
def device_name() -> str:
    return f"pol{secrets.token_hex(3)}"  # a device of its own: policies persist on workers


@pytest.fixture
def second(fleet: fp.Fleet, transport_case: TransportCase) -> Iterator[fp.Fleet]:
    """Another producer (embedded: another identity; RabbitMQ: another broker user)."""
    if isinstance(fleet.transport, LocalTransport):
        other = fleet.as_producer("mallory")
        yield other
        other.close()
        return
    from tests.integration.fleet import connect_rabbitmq_as, delete_user

    user = f"mallory-{secrets.token_hex(3)}"
    other = connect_rabbitmq_as(user, secrets.token_hex(8))
    try:
        yield other
    finally:
        other.close()
        delete_user(user)


def test_another_producer_cannot_read_overwrite_delete_list_or_use_my_objects(
    fleet: fp.Fleet, second: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    x = torch.tensor([1.0, 2.0, 3.0])
    mine = alice.send_tensor(fp.tag(x.clone(), "#mine")).wait()
    theirs = second.device(device_name)
    with pytest.raises(ObjectNotFound) as exists:
        theirs.fetch(mine.id)
    with pytest.raises(ObjectNotFound) as missing:
        theirs.fetch("no-such-object")
    assert str(exists.value).replace(mine.id, "ID") == str(missing.value).replace(
        "no-such-object", "ID"
    )  # "not yours" reads exactly like "not there"
    assert theirs.search("#mine") == []
    assert mine.id not in theirs.objects()
    overwrite = cmd.StoreObject(id=mine.id, tensor=tensor_to_proto(torch.zeros(3)))
    second.submit(theirs.id, "store_object", overwrite).reply(60)  # its own object of that id
    theirs.delete_objects([mine.id]).reply(60)
    with pytest.raises(ObjectNotFound):
        theirs.run_op("torch.neg", [fp.PointerTensor(mine.id, theirs)]).get()
    assert torch.equal(mine.get(), x)  # the owner's object is untouched; valid work goes on


def test_private_device_data_is_usable_in_place_but_never_leaves(
    fleet: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    secret = torch.tensor([3.0, -4.0])
    operator.add_data("secret-rows", secret, "#train")
    operator.add_data("open-rows", torch.ones(2), "#open")
    operator.policy(public_tags=["#open"])
    [pointer] = alice.search("#train")
    with pytest.raises(PolicyError) as refused:
        pointer.get()
    message = str(refused.value)
    assert "secret-rows" in message and "private-data" in message
    derived = pointer * 2  # computing on it is allowed...
    with pytest.raises(PolicyError):
        derived.get()  # ...but what it derives stays on the device
    with pytest.raises(PolicyError):
        alice.run_op("torch.sum", [derived], return_values=True).wait()
    own = alice.send_tensor(torch.zeros(2)).wait()
    alice.run_op("Tensor.add_", [own, pointer]).wait()  # private data written into mine
    with pytest.raises(PolicyError):
        own.get()
    [public] = alice.search("#open")
    assert torch.equal(public.get(), torch.ones(2))  # public device data reads as today
    assert torch.equal(fp.send(torch.ones(3), alice).get(), torch.ones(3))


@fp.func2plan(args_shape=[(2,)])
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@fp.func2plan(args_shape=[(2,)])
def _double_renamed(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_an_unapproved_plan_keeps_its_outputs_on_the_device_until_the_operator_approves_it(
    fleet: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    operator.add_data("secret-rows", torch.tensor([1.0, 5.0]), "#train")
    [rows] = alice.search("#train")
    plan = _double.send(alice)
    with pytest.raises(PolicyError) as refused:
        plan(rows).get()
    assert "rule: private-data" in str(refused.value)
    content_hash = plan_content_hash(_double.ir)
    assert content_hash in operator.pending()  # listed for the operator
    operator.policy(approve=[content_hash])
    assert torch.equal(plan(rows).get(), torch.tensor([2.0, 10.0]))  # approved: released
    renamed = _double_renamed.send(alice)  # the same code under another name
    with pytest.raises(PolicyError):
        renamed(rows).get()
    assert torch.equal(plan(rows).get(), torch.tensor([2.0, 10.0]))  # valid work goes on


def test_a_producer_the_policy_does_not_admit_is_refused_and_others_are_served(
    fleet: fp.Fleet, second: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    me = fleet.transport.producer_id if isinstance(fleet.transport, LocalTransport) else None
    user = me or fleet.transport.user  # type: ignore[attr-defined]
    Operator(fleet, device_name).policy(producers=[user])
    theirs = second.device(device_name)
    with pytest.raises(PolicyError) as refused:
        theirs.send_tensor(torch.ones(2)).wait()
    assert "producers" in str(refused.value)
    assert torch.equal(fp.send(torch.ones(2), alice).get(), torch.ones(2))


@fp.func2plan(args_shape=[(2,)])
def _three_ops(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) * 2).abs()


def test_over_budget_plans_outputs_and_storage_get_a_typed_refusal_and_the_device_serves_on(
    fleet: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    operator.policy(
        budgets={"max_plan_ops": 2, "max_output_bytes": 4096, "max_stored_bytes": 64 * 1024}
    )
    with pytest.raises(PolicyError, match=r"budgets\.max_plan_ops"):
        _three_ops.send(alice).wait()
    big = fp.send(torch.ones(2048), alice)  # 8 KB stored: within max_stored_bytes
    with pytest.raises(PolicyError, match=r"budgets\.max_output_bytes"):
        (big * 2).wait()  # an 8 KB result: over max_output_bytes
    with pytest.raises(PolicyError, match=r"budgets\.max_stored_bytes"):
        fp.send(torch.ones(64 * 256), alice).wait()  # 64 KB more: over max_stored_bytes
    small = fp.send(torch.tensor([1.0, -2.0]), alice)
    assert torch.equal(_double.send(alice)(small).get(), torch.tensor([2.0, -4.0]))


@fp.func2plan(args_shape=[(2,)])
def _triple(x: torch.Tensor) -> torch.Tensor:
    return x * 3


def test_a_plan_signed_by_a_trusted_key_counts_as_approved_and_a_forged_signature_is_refused(
    fleet: fp.Fleet, device_name: str
) -> None:
    from schemas.signing import new_signing_key, public_key_hex

    alice = fleet.device(device_name)
    operator = Operator(fleet, device_name)
    operator.add_data("secret-rows", torch.tensor([1.0, 2.0]), "#train")
    lab, stranger = new_signing_key(), new_signing_key()
    operator.policy(trust={"lab": public_key_hex(lab)})
    [rows] = alice.search("#train")
    with pytest.raises(PolicyError, match="trusted-keys"):
        alice.send_plan(_triple, signed_by=("lab", stranger))  # the wrong key under that name
    with pytest.raises(PolicyError):
        alice.send_plan(_double_renamed)(rows).get()  # unsigned, unapproved: stays
    plan = alice.send_plan(_triple, signed_by=("lab", lab))
    assert torch.equal(plan(rows).get(), torch.tensor([3.0, 6.0]))  # signed: released


def test_a_flood_from_one_producer_is_bounded_by_its_budget_while_anothers_work_goes_on(
    fleet: fp.Fleet, second: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    Operator(fleet, device_name).policy(budgets={"max_stored_bytes": 64 * 1024})
    theirs = second.device(device_name)
    flood = [theirs.send_tensor(torch.ones(1024)) for _ in range(40)]  # 40 x 4 KB, no waiting
    mine = fp.send(torch.arange(4096.0), alice)  # 16 KB, queued behind the flood
    assert torch.equal(mine.get(), torch.arange(4096.0))
    refused = 0
    for pointer in flood:
        try:
            pointer.wait()
        except PolicyError as exc:
            assert "budgets.max_stored_bytes" in str(exc)
            refused += 1
    assert refused == 40 - 16  # exactly its 64 KB were stored; the rest refused, typed
    flood[0].get()  # freeing room: the flooding producer is served again within its budget
    assert torch.equal(theirs.send_tensor(torch.zeros(2)).get(), torch.zeros(2))


@fp.func2plan(args_shape=[(2,)])
def _allocates(x: torch.Tensor) -> torch.Tensor:
    return x + torch.zeros(4096, 2).sum()


def test_an_over_budget_allocation_is_refused_before_it_runs_and_the_device_serves_on(
    fleet: fp.Fleet, device_name: str
) -> None:
    alice = fleet.device(device_name)
    Operator(fleet, device_name).policy(budgets={"max_alloc_bytes": 16 * 1024})
    with pytest.raises(PolicyError, match=r"budgets\.max_alloc_bytes"):
        _allocates.send(alice).wait()  # 32 KB of zeros in the plan
    with pytest.raises(PolicyError, match=r"budgets\.max_alloc_bytes"):
        alice.run_op("torch.ones", [10**9]).wait()  # refused before a byte is allocated
    assert torch.equal(alice.run_op("torch.ones", [4]).get(), torch.ones(4))
