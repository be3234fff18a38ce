"""Modules on devices (producer/compat/remote_module.py) on embedded devices vs eager torch."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn, optim

import producer as fp
from producer.compat.remote_module import RemoteBuffer, RemoteParameter, is_remote, location_of


@pytest.fixture
def fleet() -> Iterator[fp.Fleet]:
    with fp.connect(timeout=30) as fleet:
        yield fleet


def count_commands(fleet: fp.Fleet) -> list[str]:
    """Record the body of every command the fleet publishes from now on."""
    bodies: list[str] = []
    original = fleet.submit

    def submit(device_id: str, body: str, *args: object, **kwargs: object) -> object:
        bodies.append(body)
        return original(device_id, body, *args, **kwargs)  # type: ignore[arg-type]

    fleet.submit = submit  # type: ignore[method-assign,assignment]
    return bodies


def test_sent_parameters_keep_their_identity_and_answer_metadata_without_commands(
    fleet: fp.Fleet,
) -> None:
    model = nn.Linear(3, 2)
    weight = model.weight
    fp.send(model, fleet.device("bob"))
    assert model.weight is weight and type(weight) is RemoteParameter
    assert is_remote(model) and location_of(model) is fleet.device("bob")
    bodies = count_commands(fleet)
    assert (weight.shape, weight.dtype, weight.requires_grad) == (
        torch.Size([2, 3]),
        torch.float32,
        True,
    )
    assert (weight.dim(), weight.numel(), torch.is_complex(weight)) == (2, 6, False)
    assert {weight: 1}[weight] == 1  # hashable by identity, as optimizers need
    assert "remote RemoteParameter -> bob:" in repr(weight)
    assert bodies == []


def test_ops_outside_the_allow_list_on_a_sent_parameter_ask_for_get(fleet: fp.Fleet) -> None:
    model = fp.send(nn.Linear(2, 1), fleet.device("bob"))
    with pytest.raises(fp.OpNotAllowedError, match=r"model\.get\(\)"):
        model.weight.numpy()


def test_get_module_restores_plain_parameters_and_gradients(fleet: fp.Fleet) -> None:
    bob = fleet.device("bob")
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    eager = copy.deepcopy(model)
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    x_ptr = fp.send(x, bob)
    fp.send(model, bob)
    model(x_ptr).sum().backward()
    fp.get_module(model)
    eager(x).sum().backward()
    assert type(model.weight) is nn.Parameter and not is_remote(model)
    torch.testing.assert_close(model.weight.grad, eager.weight.grad)
    torch.testing.assert_close(model.bias.grad, eager.bias.grad)
    fp.send(model, bob)
    fp.get_module(model)  # no backward this time: the device has no gradient
    assert model.weight.grad is None
    assert list(bob.objects()) == [x_ptr.id]


def test_buffers_go_along_and_batch_norm_statistics_update_on_the_device(
    fleet: fp.Fleet,
) -> None:
    bob = fleet.device("bob")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    eager = copy.deepcopy(model)
    x = torch.randn(6, 3)
    fp.send(model, bob)
    assert type(model[1].running_mean) is RemoteBuffer
    out = model(fp.send(x, bob)).get()
    fp.get_module(model)
    torch.testing.assert_close(out.detach(), eager(x).detach())
    torch.testing.assert_close(model[1].running_mean, eager[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1
    assert type(model[1].running_mean) is torch.Tensor


def test_an_optimizer_made_before_sending_updates_the_remote_parameters(
    fleet: fp.Fleet,
) -> None:
    bob = fleet.device("bob")
    torch.manual_seed(2)
    model = nn.Linear(2, 2)
    eager = copy.deepcopy(model)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager_opt = optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 2), torch.randn(4, 2)
    x_ptr, y_ptr = fp.send(x, bob), fp.send(y, bob)
    fp.send(model, bob)
    for _ in range(3):
        opt.zero_grad()
        ((model(x_ptr) - y_ptr) ** 2).mean().backward()
        opt.step()
        eager_opt.zero_grad()
        ((eager(x) - y) ** 2).mean().backward()
        eager_opt.step()
    fp.get_module(model)
    torch.testing.assert_close(model.weight.detach(), eager.weight.detach())


def test_moving_a_local_module_asks_to_send_it_first(fleet: fp.Fleet) -> None:
    with pytest.raises(fp.PlanInputError, match="send it with"):
        fp.move_module(nn.Linear(1, 1), fleet.device("bob"))


def test_copy_module_is_independent_of_the_original() -> None:
    model = nn.Linear(2, 1)
    twin = fp.copy_module(model)
    with torch.no_grad():
        twin.weight.add_(1.0)
    assert not torch.equal(twin.weight, model.weight)


def test_fp_send_of_a_plan_stores_the_plan_rather_than_its_parameters(fleet: fp.Fleet) -> None:
    class Net(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    net = Net()
    x = torch.tensor([[1.0, 2.0]])
    net.build(x)
    bob = fleet.device("bob")
    pointer_plan = fp.send(net, bob)
    assert isinstance(pointer_plan, fp.PointerPlan) and not is_remote(net)
    torch.testing.assert_close(pointer_plan(fp.send(x, bob)).get().detach(), net.fc(x).detach())


def test_a_dropped_sent_module_is_deleted_from_its_device(fleet: fp.Fleet) -> None:
    import gc

    bob = fleet.device("bob")
    model = fp.send(nn.Linear(2, 1), fleet.device("bob"))
    assert len(bob.objects()) == 2
    del model
    gc.collect()
    assert bob.objects() == {}  # the deletes went out with the listing command


def test_a_sent_parameter_passed_to_a_plan_stands_for_its_remote_value(fleet: fp.Fleet) -> None:
    @fp.func2plan(args_shape=[(1, 2)])
    def double(w: torch.Tensor) -> torch.Tensor:
        return w * 2

    bob = fleet.device("bob")
    model = nn.Linear(2, 1)
    expected = model.weight.detach() * 2
    fp.send(model, bob)
    torch.testing.assert_close(double.send(bob)(model.weight).get(), expected)
