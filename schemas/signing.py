"""Ed25519 signatures of plans: a plan signed by a key a device trusts counts as approved.

What is signed is the plan's content hash (``schemas.plan_codec``: sha256 of its ops, state
and constants, which the device recomputes), prefixed with a domain tag so a signature can
never be taken for one of something else. Keys are the ``cryptography`` package's; a public
key travels as 64 hex digits (its raw 32 bytes).

Example
-------
>>> key = new_signing_key()
>>> content_hash = "ab" * 32
>>> signature = sign_plan_hash(key, content_hash)
>>> verify_plan_hash(public_key_hex(key), content_hash, signature)
True
>>> verify_plan_hash(public_key_hex(key), "cd" * 32, signature)
False
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DOMAIN = b"fedplan-plan-approval-v1:"


def new_signing_key() -> Ed25519PrivateKey:
    """A fresh ed25519 private key (keep it with the producer; trust its public half)."""
    return Ed25519PrivateKey.generate()


def public_key_hex(key: Ed25519PrivateKey) -> str:
    """The public key of ``key`` as 64 hex digits, for ``fedplan device policy --trust``."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign_plan_hash(key: Ed25519PrivateKey, content_hash: str) -> bytes:
    """Sign a plan's content hash."""
    return key.sign(DOMAIN + content_hash.encode())


def verify_plan_hash(public_hex: str, content_hash: str, signature: bytes) -> bool:
    """Whether ``signature`` is the key's signature of ``content_hash``; never raises."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        public.verify(bytes(signature), DOMAIN + content_hash.encode())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


__all__ = ["new_signing_key", "public_key_hex", "sign_plan_hash", "verify_plan_hash"]
