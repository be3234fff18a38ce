"""Key agreement (X25519 + HKDF-SHA256), share encryption (ChaCha20-Poly1305) and mask
expansion (the ChaCha20 stream cipher), all from the ``cryptography`` package.

Every derived key is bound to its purpose, the round and the (sorted) pair of device ids,
so a key or ciphertext of one round or pair is useless in another.

Examples
--------
>>> alice, bob = KeyPair.generate(), KeyPair.generate()
>>> k_ab = agree(alice.private, bob.public, purpose=b"mask", round_id="r1", pair=("a", "b"))
>>> k_ba = agree(bob.private, alice.public, purpose=b"mask", round_id="r1", pair=("b", "a"))
>>> k_ab == k_ba, len(k_ab)
(True, 32)
>>> mask = expand_mask(k_ab, length=4, modulus_bits=16)
>>> mask.dtype.name, bool((mask < 2**16).all())
('uint64', True)
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from consumer.secagg.errors import SecAggIntegrityError

KEY_BYTES = 32
NONCE_BYTES = 12
_DOMAIN = b"fedplan/secagg/v1"
_RAW = serialization.Encoding.Raw


@dataclass(frozen=True, slots=True)
class KeyPair:
    """An X25519 key pair as raw 32-byte strings (plain data: storable, comparable)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the operating system's randomness."""
        key = X25519PrivateKey.generate()
        return cls(
            private=key.private_bytes(_RAW, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption()),
            public=key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw),
        )


def public_key_of(private: bytes) -> bytes:
    """The public key that belongs to a raw private key (to check a reconstructed key)."""
    key = _private(private)
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def agree(
    private: bytes, peer_public: bytes, *, purpose: bytes, round_id: str, pair: tuple[str, str]
) -> bytes:
    """The 32-byte key two devices share: HKDF-SHA256 over their X25519 secret.

    ``pair`` is the two device ids in either order; ``purpose`` separates the mask seed from
    the encryption key. A low-order peer key (an all-zero secret) is a
    :class:`SecAggIntegrityError`.
    """
    me, peer = pair
    return agree_all(private, {peer: peer_public}, purpose=purpose, round_id=round_id,
                     me=me)[peer]


def agree_all(
    private: bytes, peers: Mapping[str, bytes], *, purpose: bytes, round_id: str, me: str
) -> dict[str, bytes]:
    """:func:`agree` with every peer in ``peers`` (id -> public key), the private key loaded
    once (loading one costs as much as an agreement).

    >>> a, b = KeyPair.generate(), KeyPair.generate()
    >>> agree_all(a.private, {"b": b.public}, purpose=b"m", round_id="r", me="a")["b"] == agree(
    ...     b.private, a.public, purpose=b"m", round_id="r", pair=("b", "a"))
    True
    """
    key = _private(private)
    prefix = encode_parts(_DOMAIN, purpose, round_id.encode())
    out = {}
    for peer, public in peers.items():
        try:
            shared = key.exchange(X25519PublicKey.from_public_bytes(public))
        except ValueError as exc:
            raise SecAggIntegrityError(f"key agreement failed: {exc}") from None
        info = prefix + encode_parts(*(p.encode() for p in sorted((me, peer))))
        out[peer] = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                         info=info).derive(shared)
    return out


def encrypt(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 ciphertext with a random nonce in front; ``associated`` is bound."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, *, associated: bytes) -> bytes:
    """The plaintext of :func:`encrypt`; a forged, altered or misrouted one is refused."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise SecAggIntegrityError("a ciphertext is shorter than its nonce and tag")
    try:
        return ChaCha20Poly1305(key).decrypt(
            ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated
        )
    except InvalidTag:
        raise SecAggIntegrityError("a ciphertext failed authentication") from None


def expand_mask(seed: bytes, *, length: int, modulus_bits: int, label: bytes = b"") -> np.ndarray:
    """``length`` uniform integers mod ``2**modulus_bits`` (uint64) from a 32-byte seed.

    The ChaCha20 keystream (key = seed, nonce from ``label``) read as little-endian uint64;
    the modulus is a power of two, so keeping the low bits stays uniform.
    """
    if len(seed) != KEY_BYTES:
        raise SecAggIntegrityError(f"a mask seed has {KEY_BYTES} bytes, not {len(seed)}")
    if not 1 <= modulus_bits <= 64:
        raise SecAggIntegrityError(f"modulus_bits {modulus_bits} is not in 1..64")
    stream = Cipher(algorithms.ChaCha20(seed, _stream_nonce(label)), mode=None).encryptor()
    values = np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)
    return values & np.uint64(modulus_mask(modulus_bits))


@functools.lru_cache(maxsize=64)
def _stream_nonce(label: bytes) -> bytes:
    return bytes(4) + hashlib.sha256(encode_parts(_DOMAIN, b"stream", label)).digest()[:12]


def uniform_floats(seed: bytes, length: int) -> np.ndarray:
    """``length`` float64 values uniform in [0, 1) from the ChaCha20 keystream of ``seed``."""
    bits = expand_mask(seed, length=length, modulus_bits=64, label=b"uniform")
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def seed_commitment(round_id: str, device_id: str, seed: bytes) -> bytes:
    """SHA-256 commitment to a device's self-mask seed: lets the server check the seed it
    rebuilds from shares (the seed is 256 random bits, so the hash hides it)."""
    return hashlib.sha256(
        encode_parts(_DOMAIN, b"seed", round_id.encode(), device_id.encode(), seed)
    ).digest()


def modulus_mask(bits: int) -> int:
    """``2**bits - 1``: AND with it reduces a uint64 modulo ``2**bits``."""
    return (1 << bits) - 1


def _private(raw: bytes) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(raw)
    except ValueError as exc:
        raise SecAggIntegrityError(f"not an X25519 private key: {exc}") from None


def encode_parts(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different part lists give the same label."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)
