"""Adaptive clipping with secure aggregation (Andrew et al. 2021, Alg. 1 under SecAgg+).

Each round the server picks the clip norm ``C`` and the indicator's scale ``s``
(:func:`~producer.fl.privacy.indicator_scale`) and passes ``[C, s]`` to the devices' update
plans as a plain argument (:func:`~producer.fl.secure_training.build_update_plan` with
``adaptive_clip=True``). A device's plan returns its update clipped to ``C`` followed by
``(b - 1/2) * s``, ``b = [||update|| <= C]``; the whole vector is then quantized, noised
(discrete Gaussian shares calibrated to its L2 bound ``C' = sqrt(C^2 + s^2/4)``) and masked
like any secure input, so the server learns ``sum_k b_k`` only inside the noised sum, never
a device's ``b_k``. From the sum it takes the noised fraction
``b = (sum / s + n/2) / n`` of unclipped updates among the ``n`` survivors and moves the
norm geometrically: ``C <- C * exp(-eta * (b - gamma))``.

Privacy: both queries share one noise of standard deviation ``z C'`` on a vector of L2
sensitivity ``C'``: one Gaussian mechanism of multiplier ``z``, which is Andrew et al.'s
``z = (z_delta^-2 + (2 sigma_b)^-2)^-1/2`` with ``z_delta = z C'/C`` the updates' multiplier and
``sigma_b = z C'/s`` the count's noise (arXiv:1905.03871). The accountant composes ``z``
(its discrete, distributed form: :func:`~producer.fl.privacy.secure_noise_plan`).

Examples
--------
>>> import numpy as np
>>> from producer.fl.privacy import AdaptiveClip
>>> clip = SecureAdaptiveClip(AdaptiveClip(clip_norm=1.0, target_quantile=0.5,
...                                        count_stddev=5.0), noise_multiplier=0.0)
>>> clip.scale, clip.argument().tolist()
(2.0, [1.0, 2.0])
>>> summed = np.array([0.3, -0.2, 2 * 1.0 - 1 * 1.0])   # 2 of 3 survivors unclipped
>>> update, fraction = clip.commit(summed, survivors=3)
>>> update.tolist(), round(fraction, 4), clip.clip_norm < 1.0
([0.3, -0.2], 0.6667, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from producer.fl.dp_fedavg import DifferentialPrivacy
from producer.fl.privacy import AdaptiveClip, default_count_stddev, indicator_scale


@dataclass(slots=True)
class SecureAdaptiveClip:
    """The server's adaptive clip of one secure DP-FedAvg run (state: the current ``C``).

    ``noise_multiplier`` is the joint ``z`` the devices' noise is calibrated to (0: no
    noise, the count is exact up to the quantization error).
    """

    clip: AdaptiveClip
    noise_multiplier: float

    @classmethod
    def create(cls, privacy: DifferentialPrivacy, *, noise_multiplier: float,
               expected_devices: int) -> SecureAdaptiveClip:
        """The run's clip from the job's privacy settings (``target_quantile`` set)."""
        if privacy.target_quantile is None:
            raise ValueError("adaptive clipping needs a target_quantile")
        stddev = privacy.count_stddev
        if stddev is None:
            stddev = default_count_stddev(expected_devices, noise_multiplier)
        clip = AdaptiveClip(clip_norm=privacy.clip_norm, target_quantile=privacy.target_quantile,
                            learning_rate=privacy.clip_learning_rate, count_stddev=stddev)
        made = cls(clip, noise_multiplier)
        made.scale  # noqa: B018 - refuses a count noise that would spend the budget now
        return made

    @property
    def clip_norm(self) -> float:
        """``C`` of the next round."""
        return self.clip.clip_norm

    @property
    def scale(self) -> float:
        """``s``: the indicator rides as ``(b - 1/2) * s``."""
        return indicator_scale(noise_multiplier=self.noise_multiplier,
                               clip_norm=self.clip_norm, count_stddev=self.clip.count_stddev)

    @property
    def vector_norm(self) -> float:
        """``C' = sqrt(C^2 + s^2/4)``: the L2 bound of a device's whole vector."""
        return math.hypot(self.clip_norm, self.scale / 2)

    def argument(self) -> torch.Tensor:
        """The update plan's ``clip`` argument ``[C, s]`` (float32, as the device uses it)."""
        return torch.tensor([self.clip_norm, self.scale], dtype=torch.float32)

    def restore(self, clip_norm: float) -> None:
        """Continue from a checkpoint's clip norm (a resumed run)."""
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ValueError(f"a clip norm is a positive number, not {clip_norm}")
        self.clip = replace(self.clip, clip_norm=clip_norm)

    def commit(self, summed: np.ndarray, *, survivors: int) -> tuple[np.ndarray, float]:
        """Split a round's decoded sum into the updates' sum and the noised unclipped
        fraction, and step ``C`` towards the target quantile with it."""
        if survivors < 1 or summed.size < 1:
            raise ValueError("a sum of at least one survivor's vector")
        count = float(summed[-1]) / self.scale + survivors / 2
        fraction = count / survivors
        self.clip = self.clip.step(fraction)
        return summed[:-1], fraction


__all__ = ["SecureAdaptiveClip"]
