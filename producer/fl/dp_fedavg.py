"""DP-FedAvg (McMahan et al. 2018) as job settings: clipping, noise, accountant, ε budget.

:class:`DifferentialPrivacy` is what a job passes as ``privacy=``. Without secure
aggregation the server adds the Gaussian noise (:class:`CentralDP`, a strategy wrapper that
clips each device's update, fixed or adaptive as in Andrew et al. 2021); with secure
aggregation the devices clip and add distributed discrete Gaussian noise
(:mod:`producer.fl.secure_rounds`). Either way :class:`~producer.fl.privacy.PrivacyAccountant`
(Google's ``dp-accounting``) gives ε at δ after every round, and a run stops before a round
that would pass ``target_epsilon``.

Examples
--------
>>> dp = DifferentialPrivacy(noise_multiplier=1.0, clip_norm=0.5, delta=1e-5)
>>> acc = dp.accountant(sampling_rate=1.0, rounds=10)
>>> acc.noise_multiplier
1.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import rdp

from producer.fl.aggregate import Weights
from producer.fl.privacy import (
    AdaptiveClip,
    PrivacyAccountant,
    clip_update,
    default_count_stddev,
)
from producer.fl.strategy import FitFailure, FitInstructions, FitResult, Strategy
from producer.fl.training import flatten, unflatten


@dataclass(frozen=True, slots=True, kw_only=True)
class DifferentialPrivacy:
    """User-level DP-FedAvg settings (McMahan et al. 2018; Andrew et al. 2021).

    Parameters
    ----------
    noise_multiplier
        ``z``: the noise standard deviation is ``z`` times the sensitivity of the sum (one
        device's clipped update). ``None``: calibrated so that ``num_rounds`` rounds spend
        exactly ``target_epsilon`` (``dp_accounting.calibrate_dp_mechanism``).
    clip_norm
        ``C``: each device's update (new weights minus global weights) is L2-clipped to it;
        the initial norm when ``target_quantile`` is set.
    target_quantile
        Adaptive clipping (Andrew et al. 2021): move ``C`` towards this quantile of the
        update norms, from a noised count of unclipped updates (with secure aggregation the
        count is summed securely with the updates: :mod:`producer.fl.secure_clip`).
    clip_learning_rate
        The geometric step of adaptive clipping (``eta``).
    count_stddev
        ``sigma_b``, the noise on the count of unclipped updates; ``None``: Andrew et al.'s
        ``m / 20`` for ``m`` devices a round, or ``z`` when that is not above ``z / 2``
        (:func:`~producer.fl.privacy.default_count_stddev`). The updates' own multiplier
        is then ``(z^-2 - (2 sigma_b)^-2)^-1/2``, so both queries together cost ``z``.
    delta
        The δ of the (ε, δ) guarantee.
    target_epsilon
        The run's ε budget: no round is started that would pass it.
    accounting
        ``"rdp"`` or ``"pld"`` (the ``dp-accounting`` accountant).

    Examples
    --------
    >>> DifferentialPrivacy(target_epsilon=8.0).calibrated(sampling_rate=1.0, rounds=5) > 0
    True
    """

    noise_multiplier: float | None = None
    clip_norm: float = 1.0
    target_quantile: float | None = None
    clip_learning_rate: float = 0.2
    count_stddev: float | None = None
    delta: float = 1e-5
    target_epsilon: float | None = None
    accounting: str = "rdp"

    def __post_init__(self) -> None:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("give a noise_multiplier, a target_epsilon, or both")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"clip_norm must be a positive number, got {self.clip_norm}")
        if self.target_quantile is not None and not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        if self.count_stddev is not None and not self.count_stddev > 0:
            raise ValueError(f"count_stddev must be > 0, got {self.count_stddev}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.accounting not in ("rdp", "pld"):
            raise ValueError(f"accounting is 'rdp' or 'pld', not {self.accounting!r}")

    def calibrated(self, *, sampling_rate: float, rounds: int) -> float:
        """The noise multiplier: the given one, or the smallest that keeps ``rounds`` rounds
        at sampling rate ``sampling_rate`` within ``target_epsilon`` at ``delta``."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        assert self.target_epsilon is not None
        target = self.target_epsilon

        def event(z: float) -> dp_accounting.DpEvent:
            one = dp_accounting.PoissonSampledDpEvent(
                sampling_rate, dp_accounting.GaussianDpEvent(z)
            )
            return dp_accounting.SelfComposedDpEvent(one, max(1, rounds))

        z = dp_accounting.calibrate_dp_mechanism(
            rdp.RdpAccountant, event, target, self.delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e3),
        )
        return float(z) * (1 + 1e-9)  # never a hair over the budget after rounding

    def accountant(self, *, sampling_rate: float, rounds: int,
                   noise_multiplier: float | None = None) -> PrivacyAccountant:
        """The run's accountant (``noise_multiplier`` overrides: the effective one of the
        distributed discrete Gaussian)."""
        z = noise_multiplier or self.calibrated(sampling_rate=sampling_rate, rounds=rounds)
        return PrivacyAccountant(noise_multiplier=z, sampling_rate=sampling_rate,
                                 delta=self.delta, method=self.accounting)


class CentralDP(Strategy):
    """Server-side DP-FedAvg around another strategy (the server is trusted with updates).

    Each device's update ``w_k - w`` is L2-clipped to ``C`` (adaptive: ``C`` moves towards
    ``target_quantile`` of the norms, from a noised count, Andrew et al. 2021); the clipped
    updates are averaged with the fixed denominator ``expected_devices`` (each device
    weighs the same: McMahan et al.'s estimator), Gaussian noise of standard deviation
    ``z * C / expected_devices`` is added, and the inner strategy gets ``w + mean`` as one
    result (FedAvg commits it; FedAdam takes it as its pseudo-gradient).

    Examples
    --------
    >>> from producer.fl.strategy import FedAvg
    >>> s = CentralDP(FedAvg(), noise_multiplier=0.0, clip_norm=1.0, expected_devices=2)
    >>> w = {"p": torch.zeros(2)}
    >>> a = FitResult("a", {"p": torch.tensor([3.0, 4.0])}, 10)   # norm 5: clipped to 1
    >>> b = FitResult("b", {"p": torch.tensor([0.2, 0.0])}, 10)
    >>> s.aggregate_fit(1, w, [a, b], [])["p"].tolist()
    [0.4000000059604645, 0.4000000059604645]
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        noise_multiplier: float,
        clip_norm: float,
        expected_devices: int,
        target_quantile: float | None = None,
        clip_learning_rate: float = 0.2,
        count_stddev: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.name = inner.name
        self.proximal_mu = inner.proximal_mu
        self.expected_devices = max(1, expected_devices)
        self.generator = generator
        self.clip: AdaptiveClip | None = None
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        if target_quantile is not None:  # Andrew et al.: count noise m/20 by default
            stddev = count_stddev or default_count_stddev(self.expected_devices,
                                                          noise_multiplier)
            self.clip = AdaptiveClip(clip_norm=clip_norm, target_quantile=target_quantile,
                                     learning_rate=clip_learning_rate, count_stddev=stddev)
            if noise_multiplier > 0:
                self.noise_multiplier = self.clip.update_noise_multiplier(noise_multiplier)

    def configure_fit(self, server_round: int, weights: Weights) -> FitInstructions:
        return self.inner.configure_fit(server_round, weights)

    def aggregate_fit(
        self,
        server_round: int,
        weights: Weights,
        results: Sequence[FitResult],
        failures: Sequence[FitFailure],
    ) -> Weights | None:
        if not results:
            return None
        base = flatten(weights).double()
        total = torch.zeros_like(base)
        unclipped = 0
        for r in results:
            clipped, norm = clip_update(flatten(r.weights).double() - base, self.clip_norm)
            unclipped += int(norm <= self.clip_norm)
            total += clipped
        noise = torch.randn(total.shape, generator=self.generator, dtype=torch.float64)
        total += noise * (self.noise_multiplier * self.clip_norm)
        mean = total / self.expected_devices
        if self.clip is not None:
            self.clip = self.clip.update(unclipped=unclipped, devices=len(results),
                                         generator=self.generator)
            self.clip_norm = self.clip.clip_norm
        new = unflatten((base + mean).float(), weights)
        return self.inner.aggregate_fit(
            server_round, weights, [FitResult("dp-aggregate", new, len(results))], []
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The inner strategy's state and the current clip norm."""
        state = dict(self.inner.state_dict())
        state["dp.clip_norm"] = torch.tensor(self.clip_norm, dtype=torch.float64)
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`."""
        inner = {k: v for k, v in state.items() if not k.startswith("dp.")}
        self.inner.load_state_dict(inner)
        if "dp.clip_norm" in state:
            self.clip_norm = float(state["dp.clip_norm"])
            if self.clip is not None:
                self.clip = AdaptiveClip(
                    clip_norm=self.clip_norm, target_quantile=self.clip.target_quantile,
                    learning_rate=self.clip.learning_rate, count_stddev=self.clip.count_stddev)


__all__ = ["CentralDP", "DifferentialPrivacy"]
