"""Tests of producer.fl.aggregate: FedAvg weighting, deltas and the server Adam step."""

from __future__ import annotations

import pytest
import torch

from producer.fl.aggregate import adam_step, apply_delta, delta, weighted_average


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g)}


def test_weighted_average_weights_each_device_by_its_example_count() -> None:
    ws = [_weights(s) for s in range(3)]
    counts = [10, 30, 60]
    avg = weighted_average(list(zip(ws, counts, strict=True)))
    for name in ws[0]:
        expected = sum(w[name].double() * n for w, n in zip(ws, counts, strict=True)) / 100
        torch.testing.assert_close(avg[name].double(), expected, rtol=1e-6, atol=1e-6)


def test_weighted_average_of_one_device_is_its_weights() -> None:
    w = _weights(0)
    avg = weighted_average([(w, 7)])
    for name in w:
        torch.testing.assert_close(avg[name], w[name])


def test_weighted_average_keeps_float32() -> None:
    avg = weighted_average([(_weights(0), 1), (_weights(1), 2)])
    assert all(t.dtype == torch.float32 for t in avg.values())


def test_weighted_average_refuses_devices_with_different_tensor_names() -> None:
    other = {"b.weight": torch.zeros(3, 4), "a.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="same names"):
        weighted_average([(_weights(0), 1), (other, 1)])


def test_weighted_average_refuses_an_empty_round() -> None:
    with pytest.raises(ValueError, match="at least one result"):
        weighted_average([])


def test_delta_then_apply_delta_gives_back_the_new_weights() -> None:
    old, new = _weights(0), _weights(1)
    back = apply_delta(old, delta(new, old))
    for name in new:
        torch.testing.assert_close(back[name], new[name])


def test_adam_step_matches_torch_adam_on_the_negative_pseudo_gradient() -> None:
    # Server Adam ascends the pseudo-gradient d = avg - w: torch.optim.Adam on grad = -d
    # with eps = tau (added after the bias-corrected sqrt) does the same maths.
    w0 = _weights(0)
    param = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    opt = torch.optim.Adam(param.values(), lr=0.05, betas=(0.9, 0.99), eps=1e-12)
    w = {k: v.clone() for k, v in w0.items()}
    m = {k: torch.zeros_like(v) for k, v in w0.items()}
    v = {k: torch.zeros_like(t) for k, t in w0.items()}
    for step in range(1, 4):
        d = {k: t * 0.1 * step for k, t in _weights(10 + step).items()}
        for k, p in param.items():
            p.grad = -d[k]
        opt.step()
        w, m, v = adam_step(w, d, m, v, step=step, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-12)
    # torch adds eps to sqrt(v_hat), we add tau to sqrt(v): with both tiny the maths agree.
    for k in w0:
        torch.testing.assert_close(w[k], param[k].detach(), rtol=1e-5, atol=1e-6)


def test_adam_step_without_bias_correction_follows_the_fedadam_formula() -> None:
    w = {"p": torch.tensor([1.0, -1.0])}
    d = {"p": torch.tensor([0.5, -2.0])}
    z = {"p": torch.zeros(2)}
    new, m, v = adam_step(
        w, d, z, z, step=1, lr=0.1, beta1=0.9, beta2=0.99, tau=0.01, bias_correction=False
    )
    m_exp = 0.1 * d["p"]
    v_exp = 0.01 * d["p"] ** 2
    torch.testing.assert_close(m["p"], m_exp)
    torch.testing.assert_close(v["p"], v_exp)
    torch.testing.assert_close(new["p"], w["p"] + 0.1 * m_exp / (v_exp.sqrt() + 0.01))
