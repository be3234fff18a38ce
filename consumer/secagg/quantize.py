"""Fixed-point quantization with stochastic rounding into Z/2^b, and the overflow check.

A device holds a float vector ``x`` and an integer weight ``w`` (its example count, at most
``max_weight``). It clips ``x`` to ``[-clip, clip]``, scales ``w * x`` by ``2**scale_bits``
and rounds each coordinate stochastically (up with probability equal to the fraction, so the
rounding is unbiased and off by less than 1). Integers are kept mod ``2**modulus_bits`` in
uint64, negative values in two's complement. The weight rides along as one more coordinate,
so the server learns only the total weight.

The modulus is large enough when the largest possible |sum| fits in the signed range::

    per device  |q| <= L = ceil(max_weight * clip * 2**scale_bits) + noise_bound
    sum         |S| <= B = num_clients * L         (and the weights' sum num_clients*max_weight)
    need        B < 2**(modulus_bits - 1)          (at most 64 bits: uint64 arithmetic)

:class:`SecAggOverflowError` is raised when that cannot hold. Decoded sums differ from
``sum(w_i * clip(x_i))`` by less than ``survivors / 2**scale_bits`` per coordinate (plus the
noise, when the devices add some).

Examples
--------
>>> import numpy as np
>>> p = QuantizationParams(clip=1.0, scale_bits=16, max_weight=10, num_clients=8)
>>> p.modulus_bits
24
>>> q = quantize(np.array([0.5, -0.25]), weight=4, params=p, seed=bytes(32))
>>> decode_sum(q, params=p, survivors=1)[0].tolist(), int(q[-1])
([2.0, -1.0], 4)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from consumer.secagg.crypto import KEY_BYTES, modulus_mask, uniform_floats
from consumer.secagg.errors import SecAggIntegrityError, SecAggOverflowError

MAX_MODULUS_BITS = 64
MAX_EXACT = 1 << 53  # float64 holds every integer below this exactly


@dataclass(frozen=True, slots=True, kw_only=True)
class QuantizationParams:
    """Public fixed-point parameters of one round; checked for overflow when built.

    ``noise_bound`` is the largest |noise| a device may add per coordinate (quantized units);
    ``modulus_bits`` is chosen as the smallest that fits unless given, and then checked.
    """

    clip: float
    scale_bits: int = 16
    max_weight: int = 1
    num_clients: int
    noise_bound: int = 0
    modulus_bits: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SecAggOverflowError(f"clip must be a positive finite number, not {self.clip}")
        if self.scale_bits < 0 or self.max_weight < 1 or self.num_clients < 1:
            raise SecAggOverflowError("scale_bits >= 0, max_weight >= 1, num_clients >= 1")
        if self.noise_bound < 0:
            raise SecAggOverflowError("noise_bound must be >= 0")
        if self.device_bound() + self.noise_bound >= MAX_EXACT:
            raise SecAggOverflowError(
                f"max_weight * clip * 2**scale_bits = {self.device_bound()} does not fit a "
                f"float64 exactly (2**53): lower scale_bits or clip"
            )
        need = self.required_bits()
        if need > MAX_MODULUS_BITS:
            raise SecAggOverflowError(
                f"the weighted sum of {self.num_clients} devices needs a {need}-bit modulus, "
                f"more than {MAX_MODULUS_BITS}: lower scale_bits, clip or max_weight"
            )
        if self.modulus_bits == 0:
            object.__setattr__(self, "modulus_bits", need)
        elif not need <= self.modulus_bits <= MAX_MODULUS_BITS:
            raise SecAggOverflowError(
                f"modulus_bits={self.modulus_bits} cannot hold the sum of {self.num_clients} "
                f"devices (|sum| <= {self.sum_bound()} needs {need} bits, at most 64)"
            )

    def device_bound(self) -> int:
        """Largest |quantized value| of one device before noise: ceil(W * clip * 2^f)."""
        return math.ceil(self.max_weight * self.clip * (1 << self.scale_bits))

    def sum_bound(self) -> int:
        """Largest |coordinate| of the sum over all devices, noise included."""
        per_device = max(self.device_bound() + self.noise_bound, self.max_weight)
        return self.num_clients * per_device

    def required_bits(self) -> int:
        """Smallest b with ``sum_bound() < 2**(b-1)``."""
        return self.sum_bound().bit_length() + 1

    def error_bound(self, survivors: int) -> float:
        """Bound on |decoded sum - sum(w_i * clip(x_i))| per coordinate, noise excluded."""
        return survivors / float(1 << self.scale_bits)


def quantize(
    values: np.ndarray,
    *,
    weight: int,
    params: QuantizationParams,
    seed: bytes | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """``w * clip(values)`` in fixed point mod 2^b, plus optional integer noise, then ``w``.

    Rounding draws its randomness from ChaCha20 keyed by ``seed`` (fresh OS randomness when
    None). Returns uint64 of length ``len(values) + 1``.
    """
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        raise SecAggOverflowError(f"a weight is an integer, not {type(weight).__name__}")
    if not 0 <= weight <= params.max_weight:
        raise SecAggOverflowError(f"weight {weight} is outside 0..{params.max_weight}")
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(flat).all():
        raise SecAggOverflowError("the values to aggregate contain NaN or infinity")
    scaled = np.clip(flat, -params.clip, params.clip) * (float(weight) * (1 << params.scale_bits))
    floor = np.floor(scaled)
    uniform = uniform_floats(seed if seed is not None else os.urandom(KEY_BYTES), flat.size)
    rounded = (floor + (uniform < (scaled - floor))).astype(np.int64)
    if noise is not None:
        noise = np.asarray(noise).reshape(-1).astype(np.int64)
        if noise.shape != rounded.shape:
            raise SecAggOverflowError(f"noise has {noise.size} values for {rounded.size}")
        if noise.size and int(np.abs(noise).max()) > params.noise_bound:
            raise SecAggOverflowError(
                f"a noise value exceeds noise_bound={params.noise_bound}: the modulus would "
                f"not hold the sum"
            )
        rounded = rounded + noise
    out = np.empty(flat.size + 1, dtype=np.uint64)
    out[:-1] = rounded.view(np.uint64)
    out[-1] = np.uint64(weight)
    return out & np.uint64(modulus_mask(params.modulus_bits))


def packed_size(length: int, bits: int) -> int:
    """Bytes of :func:`pack_vector` output for ``length`` values of ``bits`` bits."""
    return (length * bits + 7) // 8


def pack_vector(values: np.ndarray, bits: int) -> bytes:
    """Values mod ``2**bits`` packed big-endian, ``bits`` bits each, zero-padded to a byte."""
    octets = np.asarray(values, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8)
    return np.packbits(np.unpackbits(octets, axis=1)[:, 64 - bits :].reshape(-1)).tobytes()


def unpack_vector(data: bytes, length: int, bits: int) -> np.ndarray:
    """The uint64 values of :func:`pack_vector`; a wrong size or padding is refused."""
    if len(data) != packed_size(length, bits):
        raise SecAggIntegrityError(
            f"a packed vector of {length} x {bits} bits is {packed_size(length, bits)} bytes, "
            f"not {len(data)}"
        )
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    if flat[length * bits :].any():
        raise SecAggIntegrityError("a packed vector has non-zero padding bits")
    full = np.zeros((length, 64), dtype=np.uint8)
    full[:, 64 - bits :] = flat[: length * bits].reshape(length, bits)
    return np.packbits(full, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def decode_sum(
    total: np.ndarray, *, params: QuantizationParams, survivors: int
) -> tuple[np.ndarray, int]:
    """The float64 weighted sum and the total weight from an unmasked sum mod 2^b.

    A coordinate outside the bound the round allows for ``survivors`` devices means the sum
    wrapped or an input was corrupted: :class:`SecAggOverflowError`, never a wrong value.
    """
    bits = params.modulus_bits
    reduced = np.asarray(total, dtype=np.uint64) & np.uint64(modulus_mask(bits))
    signed = reduced.view(np.int64).copy()
    if bits < 64:
        signed[signed >= (1 << (bits - 1))] -= 1 << bits
    per_device = params.device_bound() + params.noise_bound
    bound = survivors * per_device
    if signed[:-1].size and int(np.abs(signed[:-1]).max()) > bound:
        raise SecAggOverflowError(
            f"an aggregated value exceeds the bound {bound} for {survivors} devices: "
            f"the sum overflowed or an input was not quantized as agreed"
        )
    weight = int(signed[-1])
    if not 0 <= weight <= survivors * params.max_weight:
        raise SecAggOverflowError(f"total weight {weight} is impossible for {survivors} devices")
    return signed[:-1].astype(np.float64) / float(1 << params.scale_bits), weight
