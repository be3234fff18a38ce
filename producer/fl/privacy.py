"""DP-FedAvg pieces (McMahan et al. 2018): clipping, noise, and an (ε, δ) accountant.

- :func:`clip_update`: a device's update scaled to L2 norm at most ``clip_norm``.
- :class:`AdaptiveClip`: the clip norm follows a target quantile of the update norms
  (Andrew et al. 2021, geometric update from a noised count of unclipped updates);
  :func:`indicator_scale`: how the unclipped bit rides in a securely summed vector.
- :func:`add_gaussian_noise`: central DP, N(0, (z * sensitivity)^2) added by the server.
- :func:`secure_noise_plan`: distributed DP for secure aggregation: each device adds
  discrete Gaussian noise in the quantized domain, calibrated so that any ``min_survivors``
  devices together carry noise multiplier ``z`` (``consumer.secagg`` samples it).
- :class:`PrivacyAccountant`: Google's ``dp-accounting`` (RDP or PLD) composing one
  Poisson-sampled Gaussian per round; ε at δ after each round, and a budget check.

Examples
--------
>>> import torch
>>> clipped, norm = clip_update(torch.tensor([3.0, 4.0]), clip_norm=1.0)
>>> clipped.tolist(), norm
([0.6000000238418579, 0.800000011920929], 5.0)
>>> acc = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5)
>>> acc.step(10)
>>> round(acc.epsilon(), 3) == round(acc.epsilon_after(10), 3) > 0
True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import dp_accounting
import torch
from dp_accounting import pld, rdp

from consumer.secagg.errors import PrivacyBudgetExhausted
from consumer.secagg.noise import noise_bound
from consumer.secagg.quantize import QuantizationParams


def clip_update(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """``update * min(1, clip_norm / ||update||_2)`` and the norm before clipping."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, not {clip_norm}")
    norm = float(torch.linalg.vector_norm(update.detach().double()))
    if not math.isfinite(norm):
        raise ValueError("the update contains NaN or infinity; it cannot be clipped")
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return update * factor, norm


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveClip:
    """Quantile-based adaptive clipping (Andrew et al. 2021), one immutable step per round.

    Each device reports whether its update norm was at most ``clip_norm`` (a bit, summed —
    securely when aggregation is secure); the server noises the count with standard
    deviation ``count_stddev`` and moves the norm geometrically towards ``target_quantile``.

    Examples
    --------
    >>> clip = AdaptiveClip(clip_norm=1.0, target_quantile=0.5, learning_rate=0.2)
    >>> clip.update(unclipped=10, devices=10).clip_norm < 1.0   # all below: shrink
    True
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float = 0.0

    def update(
        self, *, unclipped: int, devices: int, generator: torch.Generator | None = None
    ) -> AdaptiveClip:
        """The next clip norm: ``C * exp(-eta * (b - gamma))``, ``b`` the noised fraction."""
        if devices <= 0 or not 0 <= unclipped <= devices:
            raise ValueError(f"{unclipped} unclipped of {devices} devices is impossible")
        noise = 0.0
        if self.count_stddev > 0:
            noise = float(torch.randn((), generator=generator, dtype=torch.float64))
            noise *= self.count_stddev
        return self.step((unclipped + noise) / devices)

    def step(self, fraction: float) -> AdaptiveClip:
        """The next clip norm from an already noised fraction ``b`` of unclipped updates:
        ``C * exp(-eta * (b - gamma))`` (with secure aggregation the noise is in the sum)."""
        if not math.isfinite(fraction):
            raise ValueError(f"the unclipped fraction must be finite, not {fraction}")
        step = math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return replace(self, clip_norm=self.clip_norm * step)

    def update_noise_multiplier(self, noise_multiplier: float) -> float:
        """The multiplier left for the updates when the count noise spends part of ``z``:
        ``(z^-2 - (2 * count_stddev)^-2)^-1/2`` (Andrew et al. 2021, section 3.1)."""
        if self.count_stddev <= 0:
            return noise_multiplier
        rest = noise_multiplier**-2 - (2 * self.count_stddev) ** -2
        if rest <= 0:
            raise ValueError("count_stddev is too small for this noise multiplier")
        return rest**-0.5


def default_count_stddev(expected_devices: int, noise_multiplier: float) -> float:
    """The noise ``sigma_b`` on the count of unclipped updates when none is given.

    Andrew et al. 2021 recommend ``m / 20`` (``m`` the expected devices per round). The
    count's noise must exceed ``z / 2`` or it alone would spend the whole budget
    (:meth:`AdaptiveClip.update_noise_multiplier`); when ``m / 20`` is not above it (few
    devices, a small ε), ``sigma_b = z`` is used, and the updates keep ``z_delta = 1.155 z``.

    Examples
    --------
    >>> default_count_stddev(100, 1.0), default_count_stddev(100, 20.0)
    (5.0, 20.0)
    """
    andrew = max(1, expected_devices) / 20
    return andrew if 2 * andrew > 1.001 * noise_multiplier else float(noise_multiplier)


def indicator_scale(*, noise_multiplier: float, clip_norm: float, count_stddev: float) -> float:
    """The scale ``s`` of the unclipped indicator in a securely summed vector.

    A device appends ``(b - 1/2) * s`` (``b = [||update|| <= C]``) to its clipped update, so
    its vector has L2 norm at most ``C' = sqrt(C^2 + s^2 / 4)``, and the devices' noise of
    standard deviation ``z * C'`` covers both. In units of the count that noise is
    ``sigma_b = z C' / s``; in units of ``C`` on the update it is ``z_delta = z C' / C``, and
    ``(z_delta^-2 + (2 sigma_b)^-2)^-1/2 = z``: the single Gaussian mechanism of multiplier
    ``z`` that Andrew et al. 2021 (arXiv:1905.03871: the effective noise multiplier of the
    update and count queries together, as TF Privacy's adaptive clip query and Flower use it)
    compose both queries into. Solving ``sigma_b = z C' / s`` for ``s`` gives
    ``s = z C / sqrt(sigma_b^2 - z^2 / 4)`` (needs ``sigma_b > z / 2``). Without noise
    (``z = 0``) the count is exact and ``s = 2 C``. Rounded to float32, as devices use it.

    Examples
    --------
    >>> s = indicator_scale(noise_multiplier=1.0, clip_norm=0.5, count_stddev=5.0)
    >>> c2 = math.sqrt(0.5**2 + s**2 / 4)
    >>> round((1.0 * c2 / 0.5) ** -2 + (2 * 1.0 * c2 / s) ** -2, 6)   # z_delta, sigma_b
    1.0
    """
    if noise_multiplier < 0 or not clip_norm > 0:
        raise ValueError("noise_multiplier >= 0 and clip_norm > 0")
    if noise_multiplier == 0:
        scale = 2 * clip_norm
    else:
        rest = count_stddev**2 - noise_multiplier**2 / 4
        if rest <= 0:
            raise ValueError(f"count_stddev {count_stddev} must exceed noise_multiplier / 2 "
                             f"= {noise_multiplier / 2}: the count would spend the budget")
        scale = noise_multiplier * clip_norm / math.sqrt(rest)
    return float(torch.tensor(scale, dtype=torch.float32))


def add_gaussian_noise(
    total: torch.Tensor,
    *,
    noise_multiplier: float,
    sensitivity: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Central DP on the server: ``total + N(0, (noise_multiplier * sensitivity)^2)``.

    ``sensitivity`` is what one device can change the sum by: ``clip_norm`` times the
    largest weight a device may have.
    """
    if noise_multiplier < 0 or sensitivity < 0:
        raise ValueError("noise_multiplier and sensitivity must be >= 0")
    noise = torch.randn(total.shape, generator=generator, dtype=torch.float64)
    return (total.double() + noise * (noise_multiplier * sensitivity)).to(total.dtype)


@dataclass(frozen=True, slots=True)
class SecureNoisePlan:
    """Parameters of distributed discrete Gaussian noise for one secure-aggregation round.

    ``device_sigma`` (quantized units) goes into ``RoundConfig.noise_sigma``,
    ``quantization`` (with its ``noise_bound``) into ``RoundConfig.quantization``;
    ``effective_noise_multiplier`` is what the accountant composes.
    """

    device_sigma: float
    sensitivity: float
    quantization: QuantizationParams
    effective_noise_multiplier: float


def secure_noise_plan(
    *,
    noise_multiplier: float,
    clip_norm: float,
    dimension: int,
    num_clients: int,
    min_survivors: int,
    max_weight: int = 1,
    scale_bits: int = 16,
) -> SecureNoisePlan:
    """Per-device discrete Gaussian noise so that ``min_survivors`` devices' noise sums to
    standard deviation ``noise_multiplier * sensitivity`` in the quantized domain.

    Sensitivity in quantized units: ``max_weight * clip_norm * 2**scale_bits + sqrt(d)`` (the
    L2 clip, scaled, plus stochastic rounding's at most 1 per coordinate). The effective
    noise multiplier adds the ``tau`` term of Kairouz et al. 2021 (Thm. 1 / Prop. 14): the
    sum of discrete Gaussians is not exactly one; its RDP is at most that of a Gaussian of
    multiplier ``1 / (1/z + sqrt(d) * tau)``.
    """
    if noise_multiplier <= 0 or min_survivors < 1 or dimension < 1:
        raise ValueError("noise_multiplier > 0, min_survivors >= 1 and dimension >= 1")
    sensitivity = max_weight * clip_norm * (1 << scale_bits) + math.sqrt(dimension)
    sigma = noise_multiplier * sensitivity / math.sqrt(min_survivors)
    tau = 10 * sum(
        math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, min_survivors)
    )
    scale = sensitivity / (math.sqrt(min_survivors) * sigma)  # = 1 / noise_multiplier
    quantization = QuantizationParams(
        clip=clip_norm,
        scale_bits=scale_bits,
        max_weight=max_weight,
        num_clients=num_clients,
        noise_bound=noise_bound(sigma),
    )
    return SecureNoisePlan(sigma, sensitivity, quantization,
                           1 / (scale + math.sqrt(dimension) * tau))


class PrivacyAccountant:
    """ε at δ of DP-FedAvg after each round, from Google's ``dp-accounting``.

    Each round is one ``PoissonSampledDpEvent(sampling_rate, GaussianDpEvent(z))``;
    ``method`` is ``"rdp"`` (Rényi DP, the library's default orders) or ``"pld"`` (privacy
    loss distributions, tighter, slower).

    Examples
    --------
    >>> acc = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.01, delta=1e-5)
    >>> acc.check_budget(epsilon=1.0)     # the next round fits in ε = 1
    >>> acc.step()
    >>> acc.rounds
    1
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        method: str = "rdp",
    ) -> None:
        if noise_multiplier <= 0 or not 0 < sampling_rate <= 1 or not 0 < delta < 1:
            raise ValueError("noise_multiplier > 0, 0 < sampling_rate <= 1, 0 < delta < 1")
        if method not in ("rdp", "pld"):
            raise ValueError(f"method is 'rdp' or 'pld', not {method!r}")
        self.noise_multiplier = noise_multiplier
        self.sampling_rate = sampling_rate
        self.delta = delta
        self.method = method
        self.rounds = 0
        self._epsilons: dict[int, float] = {}

    def event(self, rounds: int) -> dp_accounting.DpEvent:
        """The dp-accounting event of ``rounds`` rounds."""
        one = dp_accounting.PoissonSampledDpEvent(
            self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
        )
        return dp_accounting.SelfComposedDpEvent(one, rounds)

    def epsilon_after(self, rounds: int) -> float:
        """ε at ``delta`` after ``rounds`` rounds (0 rounds: 0)."""
        if rounds <= 0:
            return 0.0
        if rounds in self._epsilons:
            return self._epsilons[rounds]
        accountant: dp_accounting.PrivacyAccountant = (
            rdp.RdpAccountant() if self.method == "rdp" else pld.PLDAccountant()
        )
        accountant.compose(self.event(rounds))
        self._epsilons[rounds] = float(accountant.get_epsilon(self.delta))
        return self._epsilons[rounds]

    def epsilon(self) -> float:
        """ε spent by the rounds stepped so far."""
        return self.epsilon_after(self.rounds)

    def step(self, rounds: int = 1) -> None:
        """Record ``rounds`` committed rounds."""
        self.rounds += rounds

    def check_budget(self, *, epsilon: float) -> None:
        """Raise :class:`PrivacyBudgetExhausted` if one more round would pass ``epsilon``."""
        after = self.epsilon_after(self.rounds + 1)
        if after > epsilon:
            raise PrivacyBudgetExhausted(
                f"round {self.rounds + 1} would spend ε = {after:.4g} > budget {epsilon} at "
                f"δ = {self.delta}; stop the run or raise the noise multiplier"
            )
