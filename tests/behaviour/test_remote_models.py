"""Seed 003 on both transports: models on devices, pointers to pointers, secure averaging."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn, optim

import producer as fp
from schemas.tensor_codec import tensor_from_proto
from schemas.wire import decode_reply

DeviceFactory = Callable[..., fp.Device]

DATA = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
TARGET = torch.tensor([[0], [0], [1], [1.0]])


@pytest.fixture
def replies(fleet: fp.Fleet) -> Iterator[list[bytes]]:
    """Every reply the producer receives from now on (the transport's reply callback)."""
    seen: list[bytes] = []
    transport: object = fleet.transport
    original = transport._on_reply  # type: ignore[attr-defined]

    def record(data: bytes) -> None:
        seen.append(bytes(data))
        original(data)

    transport._on_reply = record  # type: ignore[attr-defined]
    yield seen
    transport._on_reply = original  # type: ignore[attr-defined]


def tensors_in(replies: list[bytes]) -> list[torch.Tensor]:
    """The tensor values carried by replies (metadata-only replies carry none)."""
    found = []
    for data in replies:
        reply = decode_reply(data)
        for info in reply.ok.objects:
            if info.has_value and info.kind != "value":
                found.append(tensor_from_proto(info.value))
    return found


# -- pointer to a pointer ----------------------------------------------------------------


def test_a_pointer_sent_to_another_device_points_at_the_first_devices_tensor(
    device: DeviceFactory,
) -> None:
    bob, alice = device("bob"), device("alice")
    x = torch.tensor([1, 2, 3, 4])
    x_ptr = fp.send(x, bob)
    pointer_to_x_ptr = fp.send(x_ptr, alice)
    assert pointer_to_x_ptr.location is alice
    assert pointer_to_x_ptr.points_to == (bob.id, x_ptr.id)
    assert f"-> {alice.id}:{pointer_to_x_ptr.id} -> {bob.id}:{x_ptr.id}]" in repr(pointer_to_x_ptr)
    assert list(bob.objects()) == [x_ptr.id]
    [held] = alice.objects().values()
    assert held.points_to == (bob.id, x_ptr.id) and held.shape == x.shape
    back = pointer_to_x_ptr.get()
    assert (back.location, back.id) == (bob, x_ptr.id)
    assert alice.objects() == {}
    assert torch.equal(back.get(), x)


def test_remote_get_brings_the_value_to_the_pointers_device_without_the_server(
    device: DeviceFactory, replies: list[bytes]
) -> None:
    bob, alice = device("bob"), device("alice")
    x = torch.tensor([5.0, 6.0, 7.0])
    x_ptr = fp.send(x, bob)
    pointer_to_x_ptr = fp.send(x_ptr, alice)
    assert pointer_to_x_ptr.remote_get() is pointer_to_x_ptr
    assert bob.objects() == {}
    assert list(alice.objects()) == [pointer_to_x_ptr.id]
    assert pointer_to_x_ptr.points_to is None
    assert torch.equal((pointer_to_x_ptr * 2).get(), x * 2)  # only the result comes back
    assert not any(torch.equal(t, x) for t in tensors_in(replies))


def test_ops_on_a_pointer_to_a_pointer_ask_for_get_or_remote_get(device: DeviceFactory) -> None:
    bob, alice = device("bob"), device("alice")
    pointer_to_x_ptr = fp.send(fp.send(torch.ones(2), bob), alice)
    with pytest.raises(fp.ObjectNotFound, match="remote_get"):
        (pointer_to_x_ptr + 1).get()


def test_moving_a_pointer_to_a_pointer_moves_the_record_not_the_value(
    device: DeviceFactory,
) -> None:
    bob, alice, carol = device("bob"), device("alice"), device("carol")
    x_ptr = fp.send(torch.tensor([3, 1]), bob)
    pointer = fp.send(x_ptr, alice).move(carol)
    assert alice.objects() == {}
    [held] = carol.objects().values()
    assert held.points_to == (bob.id, x_ptr.id)
    assert torch.equal(pointer.get().get(), torch.tensor([3, 1]))


# -- models on devices -------------------------------------------------------------------


def test_training_a_sent_model_on_two_devices_matches_eager_step_for_step(
    device: DeviceFactory,
) -> None:
    """Seed 003 "train on remote machine": one Adam per worker, model sent to the data."""
    bob, alice = device("bob"), device("alice")
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    eager = copy.deepcopy(model)
    datasets = [
        (fp.send(DATA[:2], bob), fp.send(TARGET[:2], bob)),
        (fp.send(DATA[2:], alice), fp.send(TARGET[2:], alice)),
    ]
    eager_sets = [(DATA[:2], TARGET[:2]), (DATA[2:], TARGET[2:])]
    optims = {d.id: optim.Adam(model.parameters(), lr=0.1) for d in (bob, alice)}
    eager_optims = [optim.Adam(eager.parameters(), lr=0.1) for _ in range(2)]
    for _ in range(4):
        for (data, target), (e_data, e_target), e_opt in zip(
            datasets, eager_sets, eager_optims, strict=True
        ):
            fp.send(model, data.location)
            opt = optims[data.location.id]
            opt.zero_grad()
            loss = ((model(data) - target) ** 2).sum()
            loss.backward()
            opt.step()
            fp.get_module(model)

            e_opt.zero_grad()
            e_loss = ((eager(e_data) - e_target) ** 2).sum()
            e_loss.backward()
            e_opt.step()
            torch.testing.assert_close(loss.get().detach(), e_loss.detach())
            torch.testing.assert_close(model.weight.detach(), eager.weight.detach())
            torch.testing.assert_close(model.bias.grad, eager.bias.grad)
    assert isinstance(model.weight, nn.Parameter) and type(model.weight) is nn.Parameter


def test_a_sent_model_is_computed_on_its_device_and_left_there_until_get(
    device: DeviceFactory,
) -> None:
    bob = device("bob")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    expected = model(DATA).detach()
    assert fp.send(model, bob) is model
    assert len(bob.objects()) == 4  # two weights, two biases
    data_ptr = fp.send(DATA, bob)
    torch.testing.assert_close(model(data_ptr).get().detach(), expected)
    with pytest.raises(fp.PlanInputError, match="copy it before sending"):
        fp.copy_module(model)
    fp.get_module(model)
    assert list(bob.objects()) == [data_ptr.id]
    torch.testing.assert_close(model(DATA).detach(), expected)


def test_a_model_and_data_on_different_devices_name_both_devices(
    device: DeviceFactory,
) -> None:
    bob, alice = device("bob"), device("alice")
    model = fp.send(nn.Linear(2, 1), bob)
    with pytest.raises(fp.PlanInputError, match=f"{alice.id}.*{bob.id}|{bob.id}.*{alice.id}"):
        model(fp.send(DATA, alice))
    fp.get_module(model)


def test_sending_a_sent_model_elsewhere_moves_it_device_to_device(
    device: DeviceFactory, replies: list[bytes]
) -> None:
    bob, alice = device("bob"), device("alice")
    model = nn.Linear(2, 1)
    weight = model.weight.detach().clone()
    fp.send(model, bob)
    replies.clear()
    fp.send(model, alice)  # a move: bob publishes to alice's queue
    assert bob.objects() == {}
    assert len(alice.objects()) == 2
    assert not any(t.shape == weight.shape for t in tensors_in(replies))
    fp.get_module(model)
    assert torch.equal(model.weight.detach(), weight)


# -- secure-worker averaging -------------------------------------------------------------


def test_secure_worker_averaging_matches_eager_and_the_server_never_sees_either_model(
    device: DeviceFactory, replies: list[bytes]
) -> None:
    """Seed 003 "train two models and average weights" on a trusted third device."""
    fp.hook(torch)
    bob, alice, secure_worker = device("bob"), device("alice"), device("secure_worker")
    bobs_data, bobs_target = fp.send(DATA[:2], bob), fp.send(TARGET[:2], bob)
    alices_data, alices_target = fp.send(DATA[2:], alice), fp.send(TARGET[2:], alice)
    torch.manual_seed(2)
    model = nn.Linear(2, 1)
    eager = copy.deepcopy(model)
    for _ in range(2):
        bobs_model = model.copy().send(bob)  # type: ignore[operator]
        alices_model = model.copy().send(alice)  # type: ignore[operator]
        bobs_opt = optim.SGD(params=bobs_model.parameters(), lr=0.1)
        alices_opt = optim.SGD(params=alices_model.parameters(), lr=0.1)
        e_bob, e_alice = copy.deepcopy(eager), copy.deepcopy(eager)
        e_bob_opt = optim.SGD(e_bob.parameters(), lr=0.1)
        e_alice_opt = optim.SGD(e_alice.parameters(), lr=0.1)
        for _ in range(3):
            for m, o, d, t in (
                (bobs_model, bobs_opt, bobs_data, bobs_target),
                (alices_model, alices_opt, alices_data, alices_target),
                (e_bob, e_bob_opt, DATA[:2], TARGET[:2]),
                (e_alice, e_alice_opt, DATA[2:], TARGET[2:]),
            ):
                o.zero_grad()
                loss = ((m(d) - t) ** 2).sum()
                loss.backward()
                o.step()
        secret = [p.detach().clone() for m in (e_bob, e_alice) for p in m.parameters()]
        alices_model.move(secure_worker)
        bobs_model.move(secure_worker)
        with torch.no_grad():
            model.weight.set_(((alices_model.weight.data + bobs_model.weight.data) / 2).get())
            model.bias.set_(((alices_model.bias.data + bobs_model.bias.data) / 2).get())
            eager.weight.set_((e_alice.weight + e_bob.weight) / 2)
            eager.bias.set_((e_alice.bias + e_bob.bias) / 2)
        torch.testing.assert_close(model.weight.detach(), eager.weight.detach())
        torch.testing.assert_close(model.bias.detach(), eager.bias.detach())
        received = tensors_in(replies)
        assert any(torch.allclose(t, eager.weight) for t in received)  # the average came
        for s in secret:
            assert not any(t.shape == s.shape and torch.allclose(t, s) for t in received)
        secure_worker.clear_objects()
