"""Plans are called like the functions they traced; ``args_shape`` is checked up front."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

import producer as fp
from producer.compat.remote_module import SentModule


@pytest.fixture
def fleet() -> Iterator[fp.Fleet]:
    with fp.connect(timeout=30) as fleet:
        yield fleet


def affine(x: torch.Tensor, y: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    return (x + y) * scale


X, Y = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 4.0, -1.0])


def test_keyword_arguments_bind_by_parameter_name_and_defaults_apply() -> None:
    plan = fp.func2plan(args_shape=[(-1,), (-1,)])(affine)
    want = affine(X, Y)
    for got in (plan(X, Y), plan(X, y=Y), plan(y=Y, x=X), plan(X, Y, 2.0), plan(X, Y, scale=2.0)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_plan_built_with_keywords_runs_when_called_by_position() -> None:
    plan = fp.func2plan(affine).build(x=X, y=Y)
    torch.testing.assert_close(plan(X * 3, Y), affine(X * 3, Y), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "kwargs", "named"),
    [
        ((X,), {}, "'y'"),
        ((X, Y), {"shift": Y}, "'shift'"),
        ((X, Y), {"x": X}, "'x'"),
        (
            (X, Y, 2.0, 4.0),
            {},
            r"too many positional arguments \(positional parameters: x, y, scale",
        ),
    ],
)
def test_a_call_the_function_would_refuse_is_a_type_error_naming_the_parameter(
    args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor], named: str
) -> None:
    plan = fp.func2plan(args_shape=[(-1,), (-1,)])(affine)
    with pytest.raises(fp.PlanInputError, match=named) as caught:
        plan(*args, **kwargs)
    assert isinstance(caught.value, TypeError)
    assert "affine(x, y, scale=2.0)" in str(caught.value)


def test_a_default_traced_as_a_constant_refuses_another_value() -> None:
    plan = fp.func2plan(args_shape=[(-1,), (-1,)])(affine)
    with pytest.raises(fp.PlanInputError, match=r"built with the constant 2\.0, received 3\.0"):
        plan(X, Y, scale=3.0)


def test_module_plans_and_keyword_only_parameters_bind_like_their_forward() -> None:
    class Shifted(fp.Plan):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, *, shift: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + shift

    torch.manual_seed(0)
    net = Shifted().build(torch.zeros(1, 3), shift=torch.zeros(2))
    x, shift = torch.randn(4, 3), torch.randn(2)
    with torch.no_grad():
        want = net.fc(x) + shift
    torch.testing.assert_close(net(x=x, shift=shift), want)
    with pytest.raises(fp.PlanInputError, match="Shifted\\(x, \\*, shift\\): too many positional"):
        net(x, shift)


def test_a_function_with_state_is_called_without_it() -> None:
    @fp.func2plan(args_shape=[(2,)], state=(torch.tensor([1.0]),))
    def plan_abs(x: torch.Tensor, state: fp.State) -> torch.Tensor:
        (bias,) = state.read()
        return x.abs() + bias

    torch.testing.assert_close(plan_abs(x=torch.tensor([-1.0, 0.0])), torch.tensor([2.0, 1.0]))
    with pytest.raises(fp.PlanInputError, match="'state'"):
        plan_abs(torch.ones(2), state=torch.ones(1))


def test_keyword_calls_of_a_pointer_plan_bind_by_name_on_the_device(fleet: fp.Fleet) -> None:
    plan = fp.func2plan(args_shape=[(-1,), (-1,)])(affine)
    alice = fleet.device("alice")
    x_ptr, y_ptr = fp.send(X, alice), fp.send(Y, alice)
    pointer_plan = plan.send(alice)
    want = affine(X, Y)
    torch.testing.assert_close(pointer_plan(x_ptr, y=y_ptr).get(), want, rtol=0, atol=0)
    torch.testing.assert_close(pointer_plan(y=y_ptr, x=x_ptr).get(), want, rtol=0, atol=0)
    torch.testing.assert_close(plan(x_ptr, y=y_ptr).get(), want, rtol=0, atol=0)
    with pytest.raises(fp.PlanInputError, match="'y'"):
        pointer_plan(x_ptr, why=y_ptr)


@pytest.mark.parametrize(
    ("args_shape", "message"),
    [
        ([(-20,)], "argument 'x': dimension 0 is -20"),
        ([(3, -2)], "argument 'x': dimension 1 is -2"),
        ([(3, 1.5)], "argument 'x': dimension 1 is 1.5, not an integer"),
        ([(3,), ("2",)], "argument 'y': dimension 0 is '2', not an integer"),
        ([(True,)], "argument 'x': dimension 0 is True, not an integer"),
        ([3], "argument 'x' must be a sequence of sizes"),
    ],
)
def test_an_invalid_args_shape_is_a_value_error_naming_the_argument_and_dimension(
    args_shape: list[object], message: str
) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        fp.func2plan(args_shape=args_shape)(affine)  # type: ignore[arg-type]
    assert isinstance(caught.value, fp.PlanShapeError)


def test_numpy_integers_are_valid_args_shape_sizes() -> None:
    plan = fp.func2plan(args_shape=[(np.int64(-1), np.int32(2))])(lambda x: x * 2)
    torch.testing.assert_close(plan(torch.ones(5, 2)), torch.full((5, 2), 2.0))


def test_what_send_returns_for_a_model_gets_the_model_back(fleet: fp.Fleet) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3)
    with torch.no_grad():
        want = model(x)
    sent = fp.send(model, fleet.device("bob"))
    assert sent is model and isinstance(sent, nn.Sequential)
    out = sent(fp.send(x, fleet.device("bob")))
    torch.testing.assert_close(out.get().detach(), want)
    assert sent.get() is model
    assert type(model) is nn.Sequential  # the plain class again once it is back
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not isinstance(model, SentModule)  # get() comes with sending (or with fp.hook)
