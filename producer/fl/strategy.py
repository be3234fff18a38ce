"""Federated strategies (FedAvg, FedProx, FedAdam): pure policy objects without I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from producer.fl.aggregate import Weights, adam_step, delta, weighted_average
from schemas.errors import FedplanError


@dataclass(frozen=True, slots=True)
class FitResult:
    """What one device returned for one round: its trained weights and example count."""

    device_id: str
    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FitFailure:
    """A device that did not deliver: ``kind`` is ``"timeout"``, ``"error"`` or ``"dropped"``."""

    device_id: str
    kind: str
    message: str = ""


@dataclass(frozen=True, slots=True)
class EvaluateResult:
    """One device's evaluation of the global weights on its own ``test`` data."""

    device_id: str
    num_examples: int
    loss: float
    accuracy: float


@dataclass(frozen=True, slots=True)
class EvaluateSummary:
    """A round's federated evaluation: example-weighted loss and accuracy, and the count."""

    loss: float
    accuracy: float
    num_examples: int
    devices: int


@dataclass(frozen=True, slots=True)
class FitInstructions:
    """What the server sends each sampled device: global weights and scalar settings."""

    weights: Weights
    config: dict[str, float] = field(default_factory=dict)


class Strategy:
    """Base policy: what to send each round and how to turn replies into new weights.

    A strategy never talks to devices: the round runner hands it the round's results *and*
    failures, in sampling order, and commits whatever weights it returns (``None`` means
    "do not commit this round": the runner abandons and retries it). Stateful strategies
    expose their state as tensors so that checkpoints can hold it.
    """

    name = "base"
    proximal_mu: float = 0.0
    """Strength of the FedProx proximal term the device plan adds to its loss (0: none)."""

    def __init__(self, *, accept_failures: bool = True) -> None:
        self.accept_failures = accept_failures

    def configure_fit(self, server_round: int, weights: Weights) -> FitInstructions:
        """What to send the devices sampled for ``server_round`` (1-based)."""
        return FitInstructions(weights=weights, config={"proximal_mu": self.proximal_mu})

    def aggregate_fit(
        self,
        server_round: int,
        weights: Weights,
        results: Sequence[FitResult],
        failures: Sequence[FitFailure],
    ) -> Weights | None:
        """New global weights from this round's results, or ``None`` to not commit it."""
        raise NotImplementedError

    def aggregate_evaluate(
        self, server_round: int, results: Sequence[EvaluateResult]
    ) -> EvaluateSummary:
        """The devices' evaluations as one: means weighted by example counts (NaN if none).

        Examples
        --------
        >>> s = FedAvg()
        >>> r = s.aggregate_evaluate(1, [EvaluateResult("a", 1, 1.0, 0.0),
        ...                               EvaluateResult("b", 3, 2.0, 1.0)])
        >>> r.loss, r.accuracy, r.num_examples
        (1.75, 0.75, 4)
        """
        total = sum(r.num_examples for r in results)
        if total == 0:
            return EvaluateSummary(float("nan"), float("nan"), 0, len(results))
        loss = sum(r.loss * r.num_examples for r in results) / total
        acc = sum(r.accuracy * r.num_examples for r in results) / total
        return EvaluateSummary(loss, acc, total, len(results))

    def _usable(self, results: Sequence[FitResult], failures: Sequence[FitFailure]) -> bool:
        if not results:
            return False
        return self.accept_failures or not failures

    @classmethod
    def from_options(cls, options: Mapping[str, float]) -> Strategy:
        """The strategy from named options (``proximal_mu``, ``server_lr``...).

        Options it does not use are ignored, so one set of CLI flags serves every strategy.
        """
        return cls()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Server-side optimizer state to checkpoint (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{self.name} keeps no state; the checkpoint holds {sorted(state)}")


S = TypeVar("S", bound=type[Strategy])

STRATEGIES: dict[str, type[Strategy]] = {}
"""Strategy classes by name: what ``make_strategy``, ``FederatedJob(strategy="...")`` and
``fedplan demo --strategy`` accept. Add one with :func:`register_strategy`."""


def register_strategy(cls: S) -> S:
    """Class decorator: make a strategy available by its ``name``.

    Examples
    --------
    >>> @register_strategy
    ... class Median(FedAvg):
    ...     name = "median-doc"
    >>> make_strategy("median-doc").name
    'median-doc'
    >>> del STRATEGIES["median-doc"]
    """
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"a strategy named {cls.name!r} is already registered")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(name: str, **options: float) -> Strategy:
    """The registered strategy called ``name``, built from ``options`` (others ignored).

    Examples
    --------
    >>> make_strategy("fedprox", proximal_mu=0.1, server_lr=0.5).proximal_mu
    0.1
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        raise FedplanError(f"no strategy named {name!r}; choose one of {sorted(STRATEGIES)}")
    return cls.from_options(options)


@register_strategy
class FedAvg(Strategy):
    """Federated averaging: the mean of device weights weighted by their example counts.

    Examples
    --------
    >>> s = FedAvg()
    >>> a = FitResult("a", {"w": torch.tensor([0.0])}, 1)
    >>> b = FitResult("b", {"w": torch.tensor([3.0])}, 2)
    >>> s.aggregate_fit(1, {"w": torch.tensor([9.0])}, [a, b], [])["w"]
    tensor([2.])
    """

    name = "fedavg"

    def aggregate_fit(
        self,
        server_round: int,
        weights: Weights,
        results: Sequence[FitResult],
        failures: Sequence[FitFailure],
    ) -> Weights | None:
        if not self._usable(results, failures):
            return None
        return weighted_average([(r.weights, r.num_examples) for r in results])


@register_strategy
class FedProx(FedAvg):
    """FedAvg whose device plan adds ``mu/2 * ||w - w_global||^2`` to the local loss.

    Examples
    --------
    >>> FedProx(proximal_mu=0.1).configure_fit(1, {}).config["proximal_mu"]
    0.1
    """

    name = "fedprox"

    def __init__(self, *, proximal_mu: float, accept_failures: bool = True) -> None:
        super().__init__(accept_failures=accept_failures)
        if proximal_mu < 0:
            raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
        self.proximal_mu = float(proximal_mu)

    @classmethod
    def from_options(cls, options: Mapping[str, float]) -> Strategy:
        return cls(proximal_mu=options.get("proximal_mu", 0.01))


@register_strategy
class FedAdam(Strategy):
    """Server-side Adam on the pseudo-gradient ``weighted_average(results) - weights``.

    Examples
    --------
    >>> s = FedAdam(lr=0.1)
    >>> w = {"p": torch.zeros(1)}
    >>> new = s.aggregate_fit(1, w, [FitResult("a", {"p": torch.ones(1)}, 5)], [])
    >>> round(float(new["p"]), 4)
    0.1
    """

    name = "fedadam"

    def __init__(
        self,
        *,
        lr: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-9,
        bias_correction: bool = True,
        accept_failures: bool = True,
    ) -> None:
        super().__init__(accept_failures=accept_failures)
        self.lr = lr
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau
        self.bias_correction = bias_correction
        self.step = 0
        self.m: Weights = {}
        self.v: Weights = {}

    @classmethod
    def from_options(cls, options: Mapping[str, float]) -> Strategy:
        return cls(lr=options.get("server_lr", 0.1))

    def aggregate_fit(
        self,
        server_round: int,
        weights: Weights,
        results: Sequence[FitResult],
        failures: Sequence[FitFailure],
    ) -> Weights | None:
        if not self._usable(results, failures):
            return None
        avg = weighted_average([(r.weights, r.num_examples) for r in results])
        pseudo = delta(avg, weights)
        m = self.m or {k: torch.zeros_like(t) for k, t in weights.items()}
        v = self.v or {k: torch.zeros_like(t) for k, t in weights.items()}
        new, self.m, self.v = adam_step(
            weights,
            pseudo,
            m,
            v,
            step=self.step + 1,
            lr=self.lr,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
            bias_correction=self.bias_correction,
        )
        self.step += 1
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.m:
            return {}
        out = {"step": torch.tensor(self.step, dtype=torch.int64)}
        out.update({f"m.{k}": t for k, t in self.m.items()})
        out.update({f"v.{k}": t for k, t in self.v.items()})
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if not state:
            self.step, self.m, self.v = 0, {}, {}
            return
        self.step = int(state["step"])
        self.m = {k[2:]: t.clone() for k, t in state.items() if k.startswith("m.")}
        self.v = {k[2:]: t.clone() for k, t in state.items() if k.startswith("v.")}
