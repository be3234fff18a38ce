"""Tests of producer.fl.models: a CNN and recurrent models train as plans exactly as eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from producer.fl.models import MODELS, make_model
from producer.fl.training import (
    TrainingSpec,
    build_evaluation_plan,
    build_training_plan,
    evaluate,
    flatten,
    get_weights,
    sample_order,
    scratch_copy,
    train_eager,
)


class RowLSTM(nn.Module):
    """An LSTM over the rows of an 8x8 image (PySyft 0.2 could not trace LSTMs)."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features = 64
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x.view(-1, 8, 8))
        return self.fc(out[:, -1])


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return RowLSTM() if name == "lstm" else make_model(name, 64, 10, hidden=6)


@pytest.mark.parametrize("name", ["cnn", "gru", "lstm"])
@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_a_training_plan_of_the_model_equals_eager_sgd_step_for_step(name: str, mu: float) -> None:
    net = _model(name)
    spec = TrainingSpec(lr=0.3, batch_size=7, epochs=2, proximal_mu=mu)
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(17, 64, generator=g), torch.randint(0, 10, (17,), generator=g)
    plan = build_training_plan(net, spec, 17)
    w = get_weights(net)
    for seed in (1001, 2001):  # two rounds: the plan keeps no state between calls
        order = sample_order(17, seed, spec.epochs)
        out = plan(x, y, flatten(w), epochs=2, batch_size=7, seed=seed)
        ref, loss = train_eager(scratch_copy(net), spec, w, x, y, order)
        assert torch.allclose(out[:-1], flatten(ref), atol=1e-6)
        assert float(out[-1]) == pytest.approx(loss, abs=1e-6)
        assert not torch.equal(flatten(ref), flatten(w))  # it did train
        w = ref


@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_evaluation_plan_of_the_model_equals_eager_evaluation(name: str) -> None:
    net = _model(name)
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(11, 64, generator=g), torch.randint(0, 10, (11,), generator=g)
    out = build_evaluation_plan(net, 11)(x, y, flatten(get_weights(net)))
    ref = evaluate(scratch_copy(net), get_weights(net), x, y)
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float32), atol=1e-6)


def test_a_model_on_rows_that_are_not_a_square_image_is_refused() -> None:
    with pytest.raises(ValueError, match="not a square image"):
        make_model("cnn", 60, 10)
    with pytest.raises(ValueError, match="unknown model"):
        make_model("transformer", 64, 10)
