"""Secure-aggregation primitives: Shamir, key agreement, masks, quantization, graph, noise."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from consumer.secagg import crypto, shamir
from consumer.secagg.errors import (
    SecAggIntegrityError,
    SecAggOverflowError,
    SecAggProtocolError,
    SecAggThresholdError,
)
from consumer.secagg.graph import neighbour_graph
from consumer.secagg.noise import discrete_gaussian, noise_bound, skellam
from consumer.secagg.quantize import (
    QuantizationParams,
    decode_sum,
    pack_vector,
    packed_size,
    quantize,
    unpack_vector,
)

# -- Shamir -------------------------------------------------------------------------------


def test_any_threshold_many_shares_rebuild_the_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=4, xs=range(1, 8))
    rng = np.random.default_rng(0)
    for _ in range(10):
        pick = rng.choice(list(shares), size=int(rng.integers(4, 8)), replace=False)
        assert shamir.combine([shares[int(x)] for x in pick]) == secret


def test_fewer_than_threshold_shares_reconstruct_nothing() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=4, xs=range(1, 8))
    three = [shares[1], shares[4], shares[6]]
    with pytest.raises(SecAggThresholdError, match="3 distinct shares, 4 needed"):
        shamir.combine(three)
    # interpolating them anyway gives an unrelated field element, not the secret
    assert shamir.interpolate_at_zero(three) != int.from_bytes(secret, "big")


def test_threshold_minus_one_shares_fit_every_possible_secret() -> None:
    """Information-theoretic hiding: for t-1 shares and ANY candidate secret there is a
    degree t-1 polynomial through them, so the shares cannot tell the candidates apart."""
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=3, xs=[2, 5, 9])
    known = [shamir.decode(shares[2])[1:], shamir.decode(shares[5])[1:]]
    for candidate in (bytes(32), os.urandom(32), secret):
        points = [(0, int.from_bytes(candidate, "big")), *known]
        fake_share_at_9 = shamir._interpolate(points, 9)
        forged = shamir._encode(3, 9, fake_share_at_9)
        assert shamir.combine([shares[2], shares[5], forged]) == candidate


def test_a_tampered_extra_share_is_detected() -> None:
    shares = shamir.split(os.urandom(32), threshold=2, xs=[1, 2, 3])
    _, x, y = shamir.decode(shares[3])
    bad = shamir._encode(2, x, (y + 1) % shamir.PRIME)
    with pytest.raises(SecAggIntegrityError, match="inconsistent"):
        shamir.combine([shares[1], shares[2], bad])


@pytest.mark.parametrize(
    "share",
    [b"", b"\x01" + bytes(shamir.SHARE_BYTES - 1), b"\x02" + bytes(shamir.SHARE_BYTES - 1)],
    ids=["empty", "bad-version", "zero-point"],
)
def test_a_malformed_share_is_a_typed_integrity_error(share: bytes) -> None:
    with pytest.raises(SecAggIntegrityError):
        shamir.combine([share])


def test_splitting_refuses_bad_thresholds_and_points() -> None:
    with pytest.raises(SecAggThresholdError):
        shamir.split(bytes(32), threshold=4, xs=[1, 2, 3])
    with pytest.raises(SecAggIntegrityError):
        shamir.split(bytes(32), threshold=1, xs=[1, 1])
    with pytest.raises(SecAggIntegrityError):
        shamir.split(bytes(31), threshold=1, xs=[1])


# -- key agreement, encryption, masks ----------------------------------------------------


def test_both_sides_derive_the_same_key_and_it_is_bound_to_round_pair_and_purpose() -> None:
    a, b, c = crypto.KeyPair.generate(), crypto.KeyPair.generate(), crypto.KeyPair.generate()
    k = crypto.agree(a.private, b.public, purpose=b"mask", round_id="r", pair=("a", "b"))
    assert k == crypto.agree(b.private, a.public, purpose=b"mask", round_id="r", pair=("b", "a"))
    others = {
        crypto.agree(a.private, b.public, purpose=b"cipher", round_id="r", pair=("a", "b")),
        crypto.agree(a.private, b.public, purpose=b"mask", round_id="r2", pair=("a", "b")),
        crypto.agree(a.private, c.public, purpose=b"mask", round_id="r", pair=("a", "b")),
    }
    assert k not in others and len(others) == 3


def test_a_low_order_public_key_is_refused() -> None:
    with pytest.raises(SecAggIntegrityError, match="key agreement failed"):
        crypto.agree(crypto.KeyPair.generate().private, bytes(32), purpose=b"m",
                     round_id="r", pair=("a", "b"))


def test_a_ciphertext_only_opens_with_its_key_and_routing() -> None:
    key = os.urandom(32)
    ct = crypto.encrypt(key, b"share", associated=b"r|a|b")
    assert crypto.decrypt(key, ct, associated=b"r|a|b") == b"share"
    with pytest.raises(SecAggIntegrityError):
        crypto.decrypt(key, ct, associated=b"r|a|c")  # misrouted by the server
    with pytest.raises(SecAggIntegrityError):
        crypto.decrypt(key, ct[:-1] + bytes([ct[-1] ^ 1]), associated=b"r|a|b")
    with pytest.raises(SecAggIntegrityError):
        crypto.decrypt(key, b"short", associated=b"")


def test_masks_are_deterministic_per_seed_and_label_and_cover_the_modulus() -> None:
    seed = os.urandom(32)
    m = crypto.expand_mask(seed, length=20_000, modulus_bits=20, label=b"pair")
    assert np.array_equal(m, crypto.expand_mask(seed, length=20_000, modulus_bits=20,
                                                label=b"pair"))
    assert not np.array_equal(m, crypto.expand_mask(seed, length=20_000, modulus_bits=20,
                                                    label=b"self"))
    assert int(m.max()) < 2**20
    # uniform on [0, 2^20): mean within 6 standard errors of 2^19
    assert abs(float(m.mean()) - 2**19) < 6 * (2**20 / np.sqrt(12)) / np.sqrt(m.size)


def test_the_mask_is_the_chacha20_keystream() -> None:
    """Cross-check against an independent ChaCha20 (the RFC 8439 block function in Python)."""
    seed = bytes(range(32))
    label = crypto.encode_parts(b"fedplan/secagg/v1", b"stream", b"x")
    nonce = b"\x00" * 4 + hashlib.sha256(label).digest()[:12]  # counter 0, then the nonce
    expected = np.frombuffer(_chacha20_block(seed, nonce), "<u8")
    got = crypto.expand_mask(seed, length=8, modulus_bits=64, label=b"x")
    assert np.array_equal(got, expected)


def _chacha20_block(key: bytes, nonce16: bytes) -> bytes:
    def rotl(v: int, c: int) -> int:
        return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))

    def qr(s: list[int], a: int, b: int, c: int, d: int) -> None:
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 16)  # noqa: E702
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 12)  # noqa: E702
        s[a] = (s[a] + s[b]) & 0xFFFFFFFF; s[d] = rotl(s[d] ^ s[a], 8)  # noqa: E702
        s[c] = (s[c] + s[d]) & 0xFFFFFFFF; s[b] = rotl(s[b] ^ s[c], 7)  # noqa: E702

    words = lambda b: [int.from_bytes(b[i : i + 4], "little") for i in range(0, len(b), 4)]  # noqa: E731
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574, *words(key), *words(nonce16)]
    work = list(state)
    for _ in range(10):
        qr(work, 0, 4, 8, 12); qr(work, 1, 5, 9, 13); qr(work, 2, 6, 10, 14)  # noqa: E702
        qr(work, 3, 7, 11, 15); qr(work, 0, 5, 10, 15); qr(work, 1, 6, 11, 12)  # noqa: E702
        qr(work, 2, 7, 8, 13); qr(work, 3, 4, 9, 14)  # noqa: E702
    out = [(w + s) & 0xFFFFFFFF for w, s in zip(work, state, strict=True)]
    return b"".join(v.to_bytes(4, "little") for v in out)


# -- quantization ------------------------------------------------------------------------


def test_the_modulus_is_the_smallest_that_holds_the_largest_weighted_sum() -> None:
    p = QuantizationParams(clip=1.0, scale_bits=16, max_weight=100, num_clients=100)
    assert p.sum_bound() == 100 * 100 * 2**16
    assert p.sum_bound() < 2 ** (p.modulus_bits - 1) and p.sum_bound() >= 2 ** (p.modulus_bits - 2)


def test_the_overflow_check_fires_when_the_sum_cannot_fit_64_bits() -> None:
    with pytest.raises(SecAggOverflowError, match=r"needs a 6[4-9]-bit modulus"):
        QuantizationParams(clip=1.0, scale_bits=40, max_weight=1000, num_clients=100_000)


def test_the_overflow_check_fires_for_a_modulus_chosen_too_small() -> None:
    with pytest.raises(SecAggOverflowError, match="modulus_bits=20 cannot hold"):
        QuantizationParams(clip=1.0, scale_bits=16, max_weight=10, num_clients=8,
                           modulus_bits=20)


def test_quantize_refuses_weights_above_the_bound_and_non_finite_values() -> None:
    p = QuantizationParams(clip=1.0, max_weight=5, num_clients=2)
    with pytest.raises(SecAggOverflowError, match=r"outside 0\.\.5"):
        quantize(np.zeros(3), weight=6, params=p)
    with pytest.raises(SecAggOverflowError, match="integer"):
        quantize(np.zeros(3), weight=2.5, params=p)  # type: ignore[arg-type]
    with pytest.raises(SecAggOverflowError, match="NaN"):
        quantize(np.array([np.nan]), weight=1, params=p)


def test_a_sum_that_wrapped_around_is_refused_not_decoded() -> None:
    p = QuantizationParams(clip=1.0, scale_bits=4, max_weight=1, num_clients=2)
    # a value past what 2 devices can produce (as after a wrap-around or a cheating device)
    forged = np.array([(p.sum_bound() + 1) & ((1 << p.modulus_bits) - 1), 2], dtype=np.uint64)
    with pytest.raises(SecAggOverflowError, match="exceeds the bound"):
        decode_sum(forged, params=p, survivors=2)


def test_stochastic_rounding_is_unbiased_and_off_by_less_than_one() -> None:
    p = QuantizationParams(clip=1.0, scale_bits=2, max_weight=1, num_clients=1)
    x = np.full(40_000, 0.3)  # 0.3 * 4 = 1.2: rounds to 1 or 2, mean 1.2
    q = quantize(x, weight=1, params=p, seed=os.urandom(32))
    values, _ = decode_sum(q, params=p, survivors=1)
    assert set(np.unique(values * 4).tolist()) == {1.0, 2.0}
    assert abs(float(values.mean()) - 0.3) < 6 * 0.25 * 0.4 / np.sqrt(x.size)


# -- graph -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(100, 20), (101, 20), (100, 7), (30, 29), (9, 4)])
def test_the_neighbour_graph_is_k_regular_and_symmetric(n: int, k: int) -> None:
    ids = [f"d{i}" for i in range(n)]
    g = neighbour_graph(ids, k=k, seed=b"public")
    degree = min(k, n - 1)
    assert {len(p) for p in g.values()} == {degree}
    assert all(d in g[p] and d not in peers for d, peers in g.items() for p in peers)
    assert g == neighbour_graph(list(reversed(ids)), k=k, seed=b"public")
    assert g != neighbour_graph(ids, k=k, seed=b"other") or degree == n - 1


def test_an_odd_degree_over_an_odd_number_of_devices_rounds_up() -> None:
    g = neighbour_graph([f"d{i}" for i in range(11)], k=3, seed=b"s")
    assert {len(p) for p in g.values()} == {4}


def test_duplicate_device_ids_are_refused() -> None:
    with pytest.raises(SecAggProtocolError):
        neighbour_graph(["a", "a", "b"], k=1, seed=b"")


# -- noise -------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [discrete_gaussian, skellam])
def test_noise_has_the_asked_variance_and_stays_in_its_bound(sampler: object) -> None:
    x = sampler(5.0, 50_000, seed=os.urandom(32))  # type: ignore[operator]
    assert x.dtype == np.int64
    assert abs(float(x.mean())) < 6 * 5.0 / np.sqrt(x.size)
    assert abs(float(x.var()) / 25.0 - 1) < 0.05
    assert int(np.abs(x).max()) <= noise_bound(5.0)
    y = sampler(5.0, 10_000, seed=os.urandom(32), bound=6)  # type: ignore[operator]
    assert int(np.abs(y).max()) <= 6


@pytest.mark.parametrize("bits", [1, 7, 26, 63, 64])
def test_packed_vectors_round_trip_in_b_bits_per_value(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**63, 1001, dtype=np.uint64) & np.uint64((1 << bits) - 1)
    if bits == 64:
        values |= np.uint64(1 << 63)
    data = pack_vector(values, bits)
    assert len(data) == packed_size(1001, bits) == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_vector(data, 1001, bits), values)


def test_a_packed_vector_of_the_wrong_size_or_padding_is_refused() -> None:
    data = pack_vector(np.arange(3, dtype=np.uint64), 5)  # 15 bits in 2 bytes
    with pytest.raises(SecAggIntegrityError, match="is 2 bytes, not 3"):
        unpack_vector(data + b"\x00", 3, 5)
    with pytest.raises(SecAggIntegrityError, match="padding"):
        unpack_vector(data[:-1] + bytes([data[-1] | 1]), 3, 5)
