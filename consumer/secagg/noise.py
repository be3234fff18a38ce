"""Integer noise a device adds before masking: discrete Gaussian or Skellam, tail-bounded.

With secure aggregation the server only sees the sum, so each of at least ``m`` committing
devices adds noise of variance ``sigma_total**2 / m``: the sum carries all of it.

The discrete Gaussian sampler is the rejection sampler of Canonne, Kamath and Steinke (2020)
from a discrete Laplace (a difference of two geometrics), vectorized with floating-point
acceptance tests as in TensorFlow Federated. Skellam is a difference of two Poissons of mean
``sigma**2 / 2``; a sum of Skellams is Skellam again. Values beyond ``bound`` (default
:data:`TAIL_SIGMAS` standard deviations, probability below 1e-21 per coordinate) are drawn
again, so the modulus check of :mod:`consumer.secagg.quantize` holds with certainty.

Randomness: numpy's PCG64 seeded with 256 bits from the operating system (or ``seed``).

Examples
--------
>>> x = discrete_gaussian(3.0, 10_000, seed=bytes(32))
>>> x.dtype.name, bool(abs(x.std() - 3.0) < 0.2), int(abs(x).max()) <= noise_bound(3.0)
('int64', True, True)
"""

from __future__ import annotations

import math
import os

import numpy as np

from consumer.secagg.errors import SecAggOverflowError

TAIL_SIGMAS = 10.0


def noise_bound(sigma: float, tail: float = TAIL_SIGMAS) -> int:
    """The largest |noise| a device adds per coordinate for standard deviation ``sigma``."""
    return math.ceil(tail * sigma) if sigma > 0 else 0


def discrete_gaussian(
    sigma: float, size: int, *, seed: bytes | None = None, bound: int | None = None
) -> np.ndarray:
    """``size`` samples of the discrete Gaussian N_Z(0, sigma^2), each |x| <= ``bound``."""
    rng, limit = _setup(sigma, seed, bound)
    if sigma == 0:
        return np.zeros(size, dtype=np.int64)
    t = math.floor(sigma) + 1
    p_geometric = -math.expm1(-1.0 / t)
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        want = max(16, int(1.3 * (size - filled)))
        laplace = rng.geometric(p_geometric, want) - rng.geometric(p_geometric, want)
        accept = rng.random(want) < np.exp(
            -((np.abs(laplace) - sigma * sigma / t) ** 2) / (2 * sigma * sigma)
        )
        good = laplace[accept & (np.abs(laplace) <= limit)][: size - filled]
        out[filled : filled + good.size] = good
        filled += good.size
    return out


def skellam(
    sigma: float, size: int, *, seed: bytes | None = None, bound: int | None = None
) -> np.ndarray:
    """``size`` samples of the symmetric Skellam of variance ``sigma**2``, |x| <= ``bound``."""
    rng, limit = _setup(sigma, seed, bound)
    mu = sigma * sigma / 2
    out = rng.poisson(mu, size) - rng.poisson(mu, size)
    while (far := np.abs(out) > limit).any():
        count = int(far.sum())
        out[far] = rng.poisson(mu, count) - rng.poisson(mu, count)
    return out.astype(np.int64)


def _setup(sigma: float, seed: bytes | None, bound: int | None) -> tuple[np.random.Generator, int]:
    if not (math.isfinite(sigma) and sigma >= 0):
        raise SecAggOverflowError(f"noise sigma must be finite and >= 0, not {sigma}")
    limit = noise_bound(sigma) if bound is None else bound
    if limit < sigma:
        raise SecAggOverflowError(f"noise bound {limit} is below one standard deviation")
    raw = seed if seed is not None else os.urandom(32)
    return np.random.Generator(np.random.PCG64(int.from_bytes(raw, "big"))), limit
