"""Pointer semantics through the public API: send, get, search, copy, move, remote ops."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import producer as fp

DeviceFactory = Callable[..., fp.Device]


def test_send_then_get_returns_the_tensor_and_removes_the_remote_copy(
    device: DeviceFactory,
) -> None:
    bob = device("bob")
    x = torch.tensor([1, 2, 3, 4, 5])
    y = torch.tensor([1, 1, 1, 1, 1])
    x_ptr, y_ptr = fp.send(x, bob), fp.send(y, bob)
    assert set(bob.objects()) == {x_ptr.id, y_ptr.id}
    assert x_ptr.location is bob
    assert torch.equal(x_ptr.get(), x)
    assert set(bob.objects()) == {y_ptr.id}
    with pytest.raises(fp.ObjectNotFound):
        x_ptr.get()


def test_pointer_metadata_matches_the_tensor(device: DeviceFactory) -> None:
    bob = device("bob")
    x = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    x_ptr = fp.send(fp.tag(x, "grid", "ints"), bob)
    assert (x_ptr.shape, x_ptr.dtype, x_ptr.tags) == (x.shape, x.dtype, ("grid", "ints"))
    [found] = bob.search("grid", "ints")
    assert (found.id, found.shape, found.dtype) == (x_ptr.id, x.shape, x.dtype)


def test_search_needs_every_tag(device: DeviceFactory) -> None:
    alice = device(
        "alice",
        data=(
            fp.tag(torch.ones(1), "train", "images"),
            fp.tag(torch.zeros(1), "train"),
            fp.tag(torch.zeros(2), "test", "images"),
        ),
    )
    assert len(alice.search("train")) == 2
    assert len(alice.search("images")) == 2
    [both] = alice.search("train", "images")
    assert torch.equal(both.get(), torch.ones(1))
    assert alice.search("validation") == []


def test_remote_arithmetic_matches_eager(device: DeviceFactory) -> None:
    bob = device("bob")
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    x_ptr, y_ptr = fp.send(x, bob), fp.send(y, bob)
    z_ptr = x_ptr + y_ptr
    assert z_ptr.location is bob
    assert torch.equal(z_ptr.get(), x + y)
    assert torch.equal(((x_ptr - y_ptr) / 2).get(), (x - y) / 2)
    assert torch.equal(torch.matmul(x_ptr, y_ptr).get(), torch.matmul(x, y))


def test_remote_training_steps_match_eager_training(device: DeviceFactory) -> None:
    bob = device("bob")
    data = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1.0]])
    target = torch.tensor([[0], [0], [1], [1.0]])
    torch.manual_seed(3)
    w = torch.randn(2, 1, requires_grad=True)
    w_eager = w.detach().clone().requires_grad_(True)
    w_ptr, data_ptr, target_ptr = fp.send(w, bob), fp.send(data, bob), fp.send(target, bob)
    for _ in range(3):
        loss_ptr = ((data_ptr.mm(w_ptr) - target_ptr) ** 2).sum()
        loss_ptr.backward()
        with torch.no_grad():
            w_ptr.sub_(w_ptr.grad * 0.1)
        w_ptr.grad.zero_()

        loss = ((data.mm(w_eager) - target) ** 2).sum()
        loss.backward()
        with torch.no_grad():
            w_eager.sub_(w_eager.grad * 0.1)  # type: ignore[operator]
        w_eager.grad.zero_()  # type: ignore[union-attr]
        torch.testing.assert_close(loss_ptr.get(), loss.detach())
    torch.testing.assert_close(w_ptr.get().detach(), w_eager.detach())


def test_move_transfers_between_devices_without_the_server(device: DeviceFactory) -> None:
    bob, alice = device("bob"), device("alice")
    x = torch.tensor([1, 2, 3, 4, 5])
    x_ptr = fp.send(x, bob)
    x_ptr.move(alice)
    assert bob.objects() == {}
    assert list(alice.objects()) == [x_ptr.id]
    assert torch.equal((x_ptr * 2).get(), x * 2)


def test_copies_are_independent_of_their_original(device: DeviceFactory) -> None:
    bob = device("bob")
    x = torch.tensor([1.0, 2.0])
    x_ptr = fp.send(x, bob)
    copy_ptr = x_ptr.copy()
    x_ptr.mul_(10.0)
    assert torch.equal(copy_ptr.get(), x)
    assert torch.equal(x_ptr.get(), x * 10)


def test_clear_objects_empties_the_device(device: DeviceFactory) -> None:
    bob = device("bob", data=(torch.ones(1), torch.ones(2)))
    assert len(bob.objects()) == 2
    bob.clear_objects()
    assert bob.objects() == {}
