"""FedBuff (Nguyen et al., 2022): staleness weighting, the buffer fold, the strategy, its state.

Buffered asynchronous aggregation: every device trains on the model version it received;
the server keeps up to ``concurrency`` devices training at once and, every ``buffer_size``
(K) updates, folds the buffer into the global model with no round barrier::

    w <- w + server_lr * (1/K) * sum_i s(staleness_i) * (w_i - w_base(i))

where ``staleness_i`` is how many versions the model moved while device ``i`` trained and
``s`` is a staleness weight (``1/sqrt(1 + staleness)`` by default). Updates staler than
``max_staleness`` are dropped and counted. This module holds the pure parts; the event
loop is :mod:`producer.fl.buffered_runner`.

Examples
--------
>>> StalenessPolicy().weight(3)
0.5
>>> w = {"p": torch.zeros(2)}
>>> fold_updates(w, [({"p": torch.ones(2)}, 1.0), ({"p": torch.ones(2)}, 0.5)],
...              server_lr=1.0, buffer_size=2)["p"]
tensor([0.7500, 0.7500])
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from producer.fl.aggregate import Weights, _check_same_keys
from producer.fl.strategy import FitFailure, FitResult, Strategy, register_strategy
from schemas.errors import FedplanError


def staleness_weight(staleness: int, exponent: float = 0.5) -> float:
    """The polynomial staleness weight ``(1 + staleness) ** -exponent``.

    ``exponent=0.5`` is FedBuff's ``1/sqrt(1 + staleness)``; 0 weighs every update alike.

    Examples
    --------
    >>> staleness_weight(0), staleness_weight(8, 0.5), staleness_weight(1, 1.0)
    (1.0, 0.3333333333333333, 0.5)
    """
    if staleness < 0:
        raise ValueError(f"staleness counts versions and is >= 0, got {staleness}")
    if exponent < 0:
        raise ValueError(f"the staleness exponent must be >= 0, got {exponent}")
    return float((1.0 + staleness) ** -exponent)


@dataclass(frozen=True, slots=True)
class StalenessPolicy:
    """How stale updates count: ``(1 + s) ** -exponent``, dropped beyond ``max_staleness``.

    Examples
    --------
    >>> p = StalenessPolicy(exponent=1.0, max_staleness=2)
    >>> p.weight(1), p.accepts(2), p.accepts(3)
    (0.5, True, False)
    """

    exponent: float = 0.5
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if not (self.exponent >= 0 and math.isfinite(self.exponent)):
            raise ValueError(f"the staleness exponent must be finite and >= 0, got {self.exponent}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 or None, got {self.max_staleness}")

    def weight(self, staleness: int) -> float:
        return staleness_weight(staleness, self.exponent)

    def accepts(self, staleness: int) -> bool:
        return self.max_staleness is None or staleness <= self.max_staleness


def fold_updates(
    weights: Mapping[str, torch.Tensor],
    updates: Sequence[tuple[Mapping[str, torch.Tensor], float]],
    *,
    server_lr: float,
    buffer_size: int,
) -> Weights:
    """``weights + server_lr / buffer_size * sum_i s_i * delta_i``, summed in the order given.

    ``updates`` holds ``(delta_i, s_i)``: a device's update (its weights minus the version
    it trained on) and its staleness weight.
    """
    if not updates:
        raise ValueError("fold_updates needs at least one update")
    acc: Weights = {k: torch.zeros_like(v) for k, v in weights.items()}
    for update, s in updates:
        _check_same_keys(weights, update)
        for k in acc:
            acc[k] = acc[k] + update[k].detach() * s
    scale = server_lr / buffer_size
    return {k: weights[k].detach() + acc[k] * scale for k in weights}


@register_strategy
class FedBuff(Strategy):
    """Buffered asynchronous aggregation; a :class:`FederatedJob` with it runs without rounds.

    ``buffer_size`` updates make one new model version; ``concurrency`` devices train at
    once (``None``: every device); ``staleness`` weighs and bounds stale updates;
    ``server_lr`` scales each fold. The job's ``num_rounds`` counts model versions.

    Examples
    --------
    >>> s = FedBuff(buffer_size=2)
    >>> w = {"p": torch.zeros(1)}
    >>> s.fold(w, [({"p": torch.ones(1)}, 0), ({"p": torch.ones(1)}, 3)])["p"]
    tensor([0.7500])
    """

    name = "fedbuff"

    def __init__(
        self,
        *,
        buffer_size: int = 8,
        concurrency: int | None = None,
        staleness: StalenessPolicy | None = None,
        server_lr: float = 1.0,
        accept_failures: bool = True,
    ) -> None:
        super().__init__(accept_failures=accept_failures)
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 or None, got {concurrency}")
        if not (server_lr > 0 and math.isfinite(server_lr)):
            raise ValueError(f"server_lr must be finite and > 0, got {server_lr}")
        self.buffer_size = int(buffer_size)
        self.concurrency = concurrency
        self.staleness = staleness or StalenessPolicy()
        self.server_lr = float(server_lr)

    @classmethod
    def from_options(cls, options: Mapping[str, float]) -> Strategy:
        max_staleness = options.get("max_staleness")
        concurrency = options.get("concurrency")
        return cls(
            buffer_size=int(options.get("buffer_size", 8)),
            concurrency=int(concurrency) if concurrency else None,
            staleness=StalenessPolicy(
                exponent=float(options.get("staleness_exponent", 0.5)),
                max_staleness=None if max_staleness is None else int(max_staleness),
            ),
            server_lr=float(options.get("buffer_server_lr", 1.0)),
        )

    def fold(
        self, weights: Mapping[str, torch.Tensor], updates: Sequence[tuple[Weights, int]]
    ) -> Weights:
        """New weights from a full buffer of ``(delta, staleness)`` in arrival order."""
        weighted = [(d, self.staleness.weight(s)) for d, s in updates]
        return fold_updates(weights, weighted, server_lr=self.server_lr, buffer_size=len(updates))

    def aggregate_fit(
        self,
        server_round: int,
        weights: Weights,
        results: Sequence[FitResult],
        failures: Sequence[FitFailure],
    ) -> Weights | None:
        raise FedplanError(
            "FedBuff folds updates as they arrive and has no rounds; run it through "
            "FederatedJob (mode='fedbuff' or strategy='fedbuff')"
        )


@dataclass(slots=True)
class Assignment:
    """A device training on model ``version``: the ``number``-th task the job dispatched."""

    number: int
    device_index: int
    device_id: str
    version: int
    seed: int


@dataclass(slots=True)
class BufferState:
    """Everything a FedBuff run needs to continue, as of right after an aggregation.

    Checkpointed after every fold: the model ``version``, ``dispatched`` (the task counter:
    every sampling and sample-order seed derives from it and the job seed, so it *is* the
    RNG state), the in-flight assignments and the weights of every version they trained
    on, failed devices cooling down (not re-sampled before the version after their
    failure), counters, and the arrival log. The buffer itself is empty at a checkpoint
    (a fold empties it), so its rule is all there is to store.
    """

    version: int = 0
    dispatched: int = 0
    in_flight: dict[int, Assignment] = field(default_factory=dict)
    bases: dict[int, Weights] = field(default_factory=dict)
    cooldown: dict[int, int] = field(default_factory=dict)
    folded: int = 0
    stale_dropped: int = 0
    failures: int = 0
    arrivals: list[list[Any]] = field(default_factory=list)
    """``[task number, kind]`` per processed event, in order (kind: ok, stale, error,
    timeout): the arrival log a replay follows."""

    def prune_bases(self, current: Weights) -> None:
        """Keep only the versions in-flight tasks trained on, and the current one."""
        self.bases[self.version] = current
        used = {a.version for a in self.in_flight.values()} | {self.version}
        for v in [v for v in self.bases if v not in used]:
            del self.bases[v]

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able part of the state (tensors go through :meth:`tensors`)."""
        return {
            "version": self.version,
            "dispatched": self.dispatched,
            "in_flight": [asdict(a) for a in sorted(self.in_flight.values(), key=_number)],
            "bases": sorted(v for v in self.bases if v != self.version),
            "cooldown": {str(k): v for k, v in sorted(self.cooldown.items())},
            "folded": self.folded,
            "stale_dropped": self.stale_dropped,
            "failures": self.failures,
            "arrivals": self.arrivals,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights of older versions still trained on, keyed ``base/<version>/<name>``
        (the current version's are the checkpoint's own weights)."""
        return {
            f"base/{v}/{k}": t.clone()
            for v, ws in sorted(self.bases.items())
            if v != self.version
            for k, t in ws.items()
        }

    @staticmethod
    def restore(
        meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], names: Sequence[str]
    ) -> BufferState:
        """Inverse of :meth:`to_metadata` and :meth:`tensors` (the current version's weights
        are added when the run starts, from the checkpoint's weights). ``names`` is the
        model's state_dict order, which each version's weights keep (a training plan
        flattens them in that order; safetensors returns them sorted)."""
        bases: dict[int, Weights] = {}
        for v in meta["bases"]:
            try:
                bases[int(v)] = {k: tensors[f"base/{int(v)}/{k}"].clone() for k in names}
            except KeyError as exc:
                raise FedplanError(f"the FedBuff checkpoint lacks {exc} of version {v}") from exc
        in_flight = {int(a["number"]): Assignment(**a) for a in meta["in_flight"]}
        missing = {a.version for a in in_flight.values()} - set(bases) - {int(meta["version"])}
        if missing:
            raise FedplanError(f"the FedBuff checkpoint lacks the weights of versions {missing}")
        return BufferState(
            version=int(meta["version"]),
            dispatched=int(meta["dispatched"]),
            in_flight=in_flight,
            bases=bases,
            cooldown={int(k): int(v) for k, v in meta["cooldown"].items()},
            folded=int(meta["folded"]),
            stale_dropped=int(meta["stale_dropped"]),
            failures=int(meta["failures"]),
            arrivals=[list(e) for e in meta["arrivals"]],
        )


def _number(a: Assignment) -> int:
    return a.number
