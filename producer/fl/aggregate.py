"""Pure aggregation maths for federated rounds: weighted averages, deltas, server Adam."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Weights = dict[str, torch.Tensor]
"""Model weights by state_dict name, in the model's state_dict order."""


def _check_same_keys(
    reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]
) -> None:
    if set(reference) != set(other):
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        raise ValueError(
            "weights do not have the same names "
            f"(missing {missing}, unexpected {extra}); every device must train the same model"
        )


def weighted_average(results: Sequence[tuple[Mapping[str, torch.Tensor], int]]) -> Weights:
    """FedAvg: ``sum_k (n_k / sum_j n_j) * w_k`` per tensor, summed in the order given.

    Parameters
    ----------
    results
        ``(weights, n_examples)`` per device; every ``weights`` has the same names.

    Returns
    -------
    Weights
        The average, in the dtype of the inputs (float32 stays float32).

    Examples
    --------
    >>> a = {"w": torch.tensor([0.0, 2.0])}
    >>> b = {"w": torch.tensor([4.0, 6.0])}
    >>> weighted_average([(a, 3), (b, 1)])["w"]
    tensor([1., 3.])
    """
    if not results:
        raise ValueError(
            "weighted_average needs at least one result; a round with none is not committed"
        )
    total = sum(n for _, n in results)
    if total <= 0:
        raise ValueError(f"the results hold {total} examples in all; weights need a positive total")
    first = results[0][0]
    for weights, _ in results[1:]:
        _check_same_keys(first, weights)
    out: Weights = {}
    for name in first:
        acc: torch.Tensor | None = None
        for weights, n in results:
            term = weights[name].detach() * (n / total)
            acc = term if acc is None else acc + term
        assert acc is not None
        out[name] = acc
    return out


def delta(new: Mapping[str, torch.Tensor], old: Mapping[str, torch.Tensor]) -> Weights:
    """``new - old`` per tensor (a device's update, or FedAdam's pseudo-gradient)."""
    _check_same_keys(old, new)
    return {k: new[k].detach() - old[k].detach() for k in old}


def apply_delta(weights: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> Weights:
    """``weights + update`` per tensor."""
    _check_same_keys(weights, update)
    return {k: weights[k].detach() + update[k].detach() for k in weights}


def adam_step(
    weights: Mapping[str, torch.Tensor],
    pseudo_grad: Mapping[str, torch.Tensor],
    m: Mapping[str, torch.Tensor],
    v: Mapping[str, torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    bias_correction: bool = True,
) -> tuple[Weights, Weights, Weights]:
    """One server Adam step on the pseudo-gradient ``avg - weights`` (Reddi et al., 2021).

    ``m = b1 m + (1 - b1) d``; ``v = b2 v + (1 - b2) d^2``;
    ``w = w + lr_t * m / (sqrt(v) + tau)`` with ``lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)``
    when ``bias_correction`` (else ``lr``). ``step`` counts from 1. Returns ``(w, m, v)``.

    Examples
    --------
    >>> w = {"p": torch.zeros(1)}
    >>> d = {"p": torch.ones(1)}
    >>> z = {"p": torch.zeros(1)}
    >>> new, m, v = adam_step(w, d, z, z, step=1, lr=0.1, beta1=0.9, beta2=0.99, tau=0.0)
    >>> round(float(new["p"]), 6)
    0.1
    """
    if step < 1:
        raise ValueError(f"adam_step counts steps from 1, got {step}")
    _check_same_keys(weights, pseudo_grad)
    lr_t = lr
    if bias_correction:
        lr_t = lr * (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
    new_w: Weights = {}
    new_m: Weights = {}
    new_v: Weights = {}
    for k, w in weights.items():
        d = pseudo_grad[k].detach()
        mk = beta1 * m[k] + (1.0 - beta1) * d
        vk = beta2 * v[k] + (1.0 - beta2) * d * d
        new_w[k] = w.detach() + lr_t * mk / (vk.sqrt() + tau)
        new_m[k] = mk
        new_v[k] = vk
    return new_w, new_m, new_v
