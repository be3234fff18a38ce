"""Tests of producer.fl.training: sample order, the eager local update, evaluation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from producer.fl.training import (
    TrainingSpec,
    evaluate,
    get_weights,
    sample_order,
    train_eager,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 45) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_sample_order_is_randperm_from_a_generator_seeded_with_the_seed() -> None:
    g = torch.Generator().manual_seed(3007)
    assert torch.equal(sample_order(50, 3007), torch.randperm(50, generator=g))


def test_two_epochs_draw_two_permutations_from_one_generator() -> None:
    g = torch.Generator().manual_seed(5)
    a, b = torch.randperm(9, generator=g), torch.randperm(9, generator=g)
    assert torch.equal(sample_order(9, 5, epochs=2), torch.cat([a, b]))


@pytest.mark.parametrize("epochs", [1, 2])
def test_train_eager_equals_a_dataloader_sgd_loop(epochs: int) -> None:
    net = _net()
    w0 = get_weights(net)
    x, y = _data()
    spec = TrainingSpec(lr=0.1, batch_size=16, epochs=epochs)
    new, loss = train_eager(net, spec, w0, x, y, sample_order(len(x), 42, epochs))

    ref = _net()
    ref.load_state_dict(w0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    order = sample_order(len(x), 42, epochs).view(epochs, -1)
    losses = []
    for e in range(epochs):
        loader = DataLoader(TensorDataset(x, y), batch_size=16, sampler=order[e].tolist())
        for xb, yb in loader:
            out = F.cross_entropy(ref(xb), yb)
            opt.zero_grad()
            out.backward()
            opt.step()
            losses.append(float(out.detach()))
    for k, v in ref.state_dict().items():
        assert torch.equal(new[k], v), k
    assert loss == pytest.approx(sum(losses) / len(losses))


def test_a_proximal_term_pulls_the_local_update_towards_the_global_weights() -> None:
    net = _net()
    w0 = get_weights(net)
    x, y = _data()
    order = sample_order(len(x), 1)
    plain, _ = train_eager(net, TrainingSpec(lr=0.2), w0, x, y, order)
    prox, _ = train_eager(net, TrainingSpec(lr=0.2, proximal_mu=2.0), w0, x, y, order)

    def dist(w: dict[str, torch.Tensor]) -> float:
        return float(sum((w[k] - w0[k]).pow(2).sum() for k in w0))

    assert dist(prox) < dist(plain)


def test_evaluate_reports_cross_entropy_and_accuracy_of_the_given_weights() -> None:
    net = _net()
    x, y = _data()
    w = get_weights(net)
    loss, acc = evaluate(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), w, x, y)
    with torch.no_grad():
        out = net(x)
    assert loss == pytest.approx(float(F.cross_entropy(out, y)))
    assert acc == pytest.approx(float((out.argmax(1) == y).float().mean()))


def test_a_spec_refuses_an_unknown_loss() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        TrainingSpec(loss="hinge")
