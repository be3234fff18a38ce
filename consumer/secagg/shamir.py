"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^256 + 297).

A secret (an X25519 private key or a mask seed, :data:`SECRET_BYTES` bytes) is the constant
term of a random polynomial of degree ``t - 1``; share ``x`` is the polynomial at ``x``
(``x >= 1``). Any ``t`` shares give the secret back by Lagrange interpolation at 0; fewer are
refused (:class:`SecAggThresholdError`) and, information-theoretically, say nothing about it.
Shares travel as :data:`SHARE_BYTES` bytes: version, threshold, x, y (big-endian).

Examples
--------
>>> secret = bytes(range(32))
>>> shares = split(secret, threshold=3, xs=[1, 2, 3, 4, 5])
>>> len(shares[1]) == SHARE_BYTES
True
>>> combine([shares[5], shares[2], shares[4]]) == secret
True
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence

from consumer.secagg.errors import SecAggIntegrityError, SecAggThresholdError

PRIME = (1 << 256) + 297
"""The smallest prime above 2^256: every 32-byte secret is one field element, and a share's
value fits in 33 bytes (version 1 used 2^521 - 1, 66 bytes: twice the share traffic)."""
SECRET_BYTES = 32
_VERSION = 2
_Y_BYTES = (PRIME.bit_length() + 7) // 8  # 33
SHARE_BYTES = 1 + 2 + 2 + _Y_BYTES
MAX_X = 0xFFFF


def split(secret: bytes, *, threshold: int, xs: Iterable[int]) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs`` (distinct, 1..65535); ``threshold`` rebuild it.

    Examples
    --------
    >>> sorted(split(b"k" * 32, threshold=2, xs=[7, 9]))
    [7, 9]
    """
    if len(secret) != SECRET_BYTES:
        raise SecAggIntegrityError(f"a shared secret has {SECRET_BYTES} bytes, not {len(secret)}")
    points = list(xs)
    if len(set(points)) != len(points) or any(not 1 <= x <= MAX_X for x in points):
        raise SecAggIntegrityError(f"share points must be distinct integers in 1..{MAX_X}")
    if not 1 <= threshold <= len(points):
        raise SecAggThresholdError(
            f"threshold {threshold} must be between 1 and the number of shares {len(points)}"
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _encode(threshold, x, _evaluate(coefficients, x)) for x in points}


def combine(shares: Sequence[bytes], *, check_extra: bool = True) -> bytes:
    """The secret from at least ``threshold`` shares of it (extra shares are checked too,
    unless ``check_extra`` is false: then the ``threshold`` lowest points alone rebuild it,
    for a caller that verifies the secret itself, as the server does against a commitment).

    Raises :class:`SecAggThresholdError` with fewer than the threshold (nothing is computed),
    :class:`SecAggIntegrityError` for malformed, mixed or inconsistent shares.
    """
    if not shares:
        raise SecAggThresholdError("no shares to reconstruct from")
    decoded = [decode(share) for share in shares]
    threshold = decoded[0][0]
    if any(t != threshold for t, _, _ in decoded):
        raise SecAggIntegrityError("the shares disagree on their threshold: mixed secrets?")
    points: dict[int, int] = {}
    for _, x, y in decoded:
        if points.setdefault(x, y) != y:
            raise SecAggIntegrityError(f"two different shares for point {x}")
    if len(points) < threshold:
        raise SecAggThresholdError(
            f"{len(points)} distinct shares, {threshold} needed: the secret stays hidden"
        )
    items = sorted(points.items())
    basis, extra = items[:threshold], items[threshold:] if check_extra else []
    if extra:
        weights = _barycentric_weights([x for x, _ in basis])
    for x, y in extra:  # more than t shares: they must all lie on the same polynomial
        if _evaluate_barycentric(basis, weights, x) != y:
            raise SecAggIntegrityError(f"share {x} is inconsistent with the others")
    value = _value_at_zero(basis)
    if value >> (8 * SECRET_BYTES):
        raise SecAggIntegrityError("the reconstructed value is not a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")


def decode(share: bytes) -> tuple[int, int, int]:
    """``(threshold, x, y)`` of one share, checking its length, version and ranges."""
    if len(share) != SHARE_BYTES or share[0] != _VERSION:
        raise SecAggIntegrityError(f"a share is {SHARE_BYTES} bytes of version {_VERSION}")
    threshold = int.from_bytes(share[1:3], "big")
    x = int.from_bytes(share[3:5], "big")
    y = int.from_bytes(share[5:], "big")
    if threshold < 1 or x < 1 or y >= PRIME:
        raise SecAggIntegrityError("a share has an out-of-range threshold, point or value")
    return threshold, x, y


def interpolate_at_zero(shares: Sequence[bytes]) -> int:
    """Lagrange value at 0 of exactly these shares, ignoring their threshold (for analysis)."""
    return _interpolate([(x, y) for _, x, y in map(decode, shares)], 0)


def _encode(threshold: int, x: int, y: int) -> bytes:
    return (
        bytes([_VERSION])
        + threshold.to_bytes(2, "big")
        + x.to_bytes(2, "big")
        + y.to_bytes(_Y_BYTES, "big")
    )


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    """Horner in exact integers, reduced once: ``x`` < 2^16, so each step adds 16 bits to a
    number the size of the coefficients, cheaper than a reduction mod the prime."""
    result = 0
    for c in reversed(coefficients):
        result = result * x + c
    return result % PRIME


def _value_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """Lagrange at 0: sum_i y_i * prod_{j != i} x_j / (x_j - x_i), the products in exact
    (small) integers and the divisions by one batch inversion mod the prime."""
    xs = [x for x, _ in points]
    dens = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num *= xj
                den *= xj - xi
        dens.append((num % PRIME, den % PRIME))
    prefix = [1]
    for _, d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    total = 0
    for i in range(len(dens) - 1, -1, -1):  # batch inversion, summing as it goes
        inv_i = inverse * prefix[i] % PRIME
        inverse = inverse * dens[i][1] % PRIME
        total += points[i][1] * dens[i][0] % PRIME * inv_i
    return total % PRIME


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """Lagrange interpolation at ``at``: sum_i y_i * prod_j (at - x_j) / (x_i - x_j)."""
    weights = _barycentric_weights([x for x, _ in points])
    return _evaluate_barycentric(points, weights, at)


def _barycentric_weights(xs: Sequence[int]) -> list[int]:
    """1 / prod_{j != i} (x_i - x_j) for each i, with one modular inversion in all."""
    dens = []
    for i, xi in enumerate(xs):
        den = 1
        for j, xj in enumerate(xs):
            if i != j:
                den = den * (xi - xj) % PRIME
        dens.append(den)
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    out = [0] * len(dens)
    for i in range(len(dens) - 1, -1, -1):  # batch inversion
        out[i] = inverse * prefix[i] % PRIME
        inverse = inverse * dens[i] % PRIME
    return out


def _evaluate_barycentric(
    points: Sequence[tuple[int, int]], weights: Sequence[int], at: int
) -> int:
    diffs = [(at - x) % PRIME for x, _ in points]
    suffix = [1] * (len(diffs) + 1)
    for i in range(len(diffs) - 1, -1, -1):
        suffix[i] = suffix[i + 1] * diffs[i] % PRIME
    total, prefix = 0, 1
    for i, (_, y) in enumerate(points):
        total = (total + y * weights[i] % PRIME * prefix % PRIME * suffix[i + 1]) % PRIME
        prefix = prefix * diffs[i] % PRIME
    return total
