"""Tenancy: every stored object, plan, pointer record and cached reply belongs to a producer.

The device keeps each producer's ids in a namespace of its own: the producer's id ``x`` is
stored under ``@<len>:<producer>/x`` (length-prefixed, so no producer name can forge
another's prefix). Another producer naming ``x`` reaches its own ``x`` or nothing, so it can
neither read, overwrite, delete, list, move nor use as a plan input what it did not create,
and the answer for "not yours" is the answer for "not there". Ids without the ``@`` prefix
are the device's own data (stored by its operator, e.g. ``fedplan data add``): producers may
use it as the policy says (:mod:`consumer.policy.rules`), never change or delete it.

A value computed from private data carries the reserved tag :data:`PRIVATE_TAG` (kept with
the object by every store; producers can neither set nor see reserved tags).

Example
-------
>>> key = scoped("alice", "x1")
>>> key, owner_of(key), external_id(key)
('@5:alice/x1', 'alice', 'x1')
>>> owner_of("mnist-0") is None  # the device's own data
True
"""

from __future__ import annotations

from collections.abc import Iterable

from schemas.errors import WireError

PRIVATE_TAG = "fedplan:private"
"""Marks a stored value (or a plan's state) derived from private device data."""

RESERVED_PREFIX = "fedplan:"
"""Tags with this prefix are the device's; a producer can neither set nor see them."""


def scoped(producer: str, object_id: str) -> str:
    """The store key of ``producer``'s id ``object_id``."""
    return f"@{len(producer)}:{producer}/{object_id}"


def owner_of(key: str) -> str | None:
    """The producer a store key belongs to; ``None`` for the device's own data."""
    if not key.startswith("@"):
        return None
    size, sep, rest = key[1:].partition(":")
    if not sep or not size.isdigit() or len(rest) <= int(size) or rest[int(size)] != "/":
        return None
    return rest[: int(size)]


def external_id(key: str) -> str:
    """The id the owner knows a store key by (device data keeps its key)."""
    owner = owner_of(key)
    if owner is None:
        return key
    return key[len(scoped(owner, "")) :]


def is_device_data(key: str) -> bool:
    """Whether a store key is the device's own data (not any producer's)."""
    return not key.startswith("@")


def visible_tags(tags: Iterable[str]) -> list[str]:
    """The tags a producer may see (reserved ones removed)."""
    return [t for t in tags if not t.startswith(RESERVED_PREFIX)]


def check_tags(tags: Iterable[str]) -> None:
    """Refuse tags a producer may not set."""
    for tag in tags:
        if tag.startswith(RESERVED_PREFIX):
            raise WireError(f"tag {tag!r}: tags starting with {RESERVED_PREFIX!r} are reserved")


__all__ = [
    "PRIVATE_TAG",
    "RESERVED_PREFIX",
    "check_tags",
    "external_id",
    "is_device_data",
    "owner_of",
    "scoped",
    "visible_tags",
]
