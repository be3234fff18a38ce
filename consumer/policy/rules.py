"""The device owner's policy: who may use the device, which tags are public, approved plans.

The policy of a Celery device lives in its data dir as ``policy.json`` (written by
``fedplan device policy ...``) and is read again whenever its modification time changes, so
an operator's change applies to the next command without a restart. An embedded device
holds its policy in memory (:class:`MemoryPolicy`).

Rules (the defaults are the safe ones):

- ``producers``: the AMQP users (embedded: producer ids) that may use the device; ``["*"]``
  (the default) admits every producer the broker lets publish to the device's queue.
- ``public_tags``: device data (stored by the operator, ``fedplan data add``) whose tags are
  *all* public may be read by producers; any other device data is private (the default).
- ``approved_plans``: content hashes of plans whose outputs may leave the device even when
  computed from private data (``fedplan device approve HASH``).
- ``trusted_keys``: ed25519 public keys by name (``schemas.signing``); a plan signed by one
  of them counts as approved.
- ``budgets``: limits per command and per producer (see :class:`Budgets`).

Example
-------
>>> policy = Policy.from_json({"public_tags": ["#mnist"]})
>>> policy.is_public(("#mnist",)), policy.is_public(("#mnist", "#labels")), policy.is_public(())
(True, False, False)
>>> policy.admits("anyone")
True
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from schemas.errors import PolicyError

POLICY_FILE = "policy.json"
LOCK_FILE = ".policy.lock"
PENDING_FILE = "policy-pending.json"
MAX_PENDING = 256
"""Plans kept waiting for approval (the oldest are forgotten first)."""


@dataclass(frozen=True)
class Budgets:
    """Limits of the policy; ``0`` means no limit beyond the device's settings.

    ``max_plan_ops`` / ``max_plan_bytes``: size of a plan a producer may store;
    ``max_alloc_bytes``: bytes a plan's (or op's) tensor-creating ops with literal sizes
    allocate (:mod:`consumer.policy.allocation`), checked before it is stored or run;
    ``max_output_bytes``: bytes of results one command may store or return;
    ``max_stored_bytes``: bytes one producer may keep stored on the device;
    ``max_wall_seconds``: seconds one command may run (below the device's
    ``FEDPLAN_SOFT_TIME_LIMIT``), ended with a ``TIME_LIMIT`` error;
    ``max_commands_per_minute`` / ``max_device_seconds_per_minute``: commands, and seconds
    of the device's time, one producer may use a minute (buckets refilled at that rate;
    :mod:`consumer.policy.fairness`), beyond which its commands are refused unrun so other
    producers' work goes on.
    """

    max_plan_ops: int = 0
    max_plan_bytes: int = 0
    max_alloc_bytes: int = 0
    max_output_bytes: int = 0
    max_stored_bytes: int = 0
    max_wall_seconds: int = 0
    max_commands_per_minute: int = 0
    max_device_seconds_per_minute: int = 0

    @classmethod
    def from_json(cls, data: Any) -> Budgets:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError("policy 'budgets' must be an object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown budgets {sorted(unknown)}; known: {sorted(known)}")
        values = {}
        for key, value in data.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"budget {key!r} must be an integer >= 0")
            values[key] = value
        return cls(**values)


@dataclass(frozen=True)
class Policy:
    """One version of a device's policy (immutable; see the module docstring)."""

    producers: tuple[str, ...] = ("*",)
    public_tags: frozenset[str] = frozenset()
    approved_plans: frozenset[str] = frozenset()
    budgets: Budgets = field(default_factory=Budgets)
    trusted_keys: tuple[tuple[str, str], ...] = ()
    """(name, public key hex) pairs."""

    def trusted_key(self, name: str) -> str | None:
        """The public key trusted under ``name``, if any."""
        return dict(self.trusted_keys).get(name)

    def admits(self, producer: str) -> bool:
        """Whether ``producer`` may use the device at all."""
        return "*" in self.producers or producer in self.producers

    def is_public(self, tags: tuple[str, ...] | list[str]) -> bool:
        """Device data with these tags is public: it has tags and every one is public."""
        return bool(tags) and all(t in self.public_tags for t in tags)

    def approves(self, content_hash: str) -> bool:
        return bool(content_hash) and content_hash in self.approved_plans

    def check_admits(self, producer: str, device_id: str) -> None:
        if not self.admits(producer):
            raise PolicyError(
                f"producer {producer!r} may not use device {device_id!r} (rule: producers; "
                f"the operator adds it with `fedplan device policy --allow {producer}`)",
                device_id=device_id,
            )

    @classmethod
    def from_json(cls, data: Any) -> Policy:
        """Parse and validate the JSON form; ``ValueError`` names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a policy is a JSON object")
        known = {"producers", "public_tags", "approved_plans", "budgets", "trusted_keys"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown policy keys {sorted(unknown)}; known: {sorted(known)}")
        lists = {}
        for key in ("producers", "public_tags", "approved_plans"):
            value = data.get(key, ["*"] if key == "producers" else [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"policy {key!r} must be a list of non-empty strings")
            lists[key] = value
        keys = data.get("trusted_keys", {})
        if not isinstance(keys, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and _is_key(v) for k, v in keys.items()
        ):
            raise ValueError("policy 'trusted_keys' maps names to ed25519 keys (64 hex digits)")
        return cls(
            producers=tuple(lists["producers"]),
            public_tags=frozenset(lists["public_tags"]),
            approved_plans=frozenset(lists["approved_plans"]),
            budgets=Budgets.from_json(data.get("budgets")),
            trusted_keys=tuple(sorted(keys.items())),
        )

    def to_json(self) -> dict[str, Any]:
        budgets = {f.name: getattr(self.budgets, f.name) for f in fields(Budgets)}
        return {
            "producers": list(self.producers),
            "public_tags": sorted(self.public_tags),
            "approved_plans": sorted(self.approved_plans),
            "budgets": {k: v for k, v in budgets.items() if v},
            "trusted_keys": dict(self.trusted_keys),
        }


@dataclass(frozen=True)
class PendingPlan:
    """A plan that computed on private data and waits for the operator's approval."""

    content_hash: str
    name: str
    producer: str
    listing: str
    seen: float

    def to_json(self) -> dict[str, Any]:
        return {
            "content_hash": self.content_hash,
            "name": self.name,
            "producer": self.producer,
            "listing": self.listing,
            "seen": self.seen,
        }


class MemoryPolicy:
    """The policy of an embedded device, held in memory; change it with :meth:`set`.

    Example
    -------
    >>> holder = MemoryPolicy()
    >>> holder.approve("abc").approves("abc")
    True
    """

    def __init__(self, policy: Policy | None = None) -> None:
        self._policy = policy or Policy()
        self._pending: dict[str, PendingPlan] = {}
        self._lock = threading.Lock()

    def current(self) -> Policy:
        return self._policy

    def set(self, policy: Policy) -> None:
        self._policy = policy

    def approve(self, content_hash: str) -> Policy:
        with self._lock:
            hashes = self._policy.approved_plans | {content_hash}
            self._policy = replace(self._policy, approved_plans=hashes)
            self._pending.pop(content_hash, None)
            return self._policy

    def note_pending(self, plan: PendingPlan) -> None:
        with self._lock:
            self._pending[plan.content_hash] = plan
            while len(self._pending) > MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))

    def pending(self) -> list[PendingPlan]:
        with self._lock:
            return list(self._pending.values())


class PolicyFile:
    """The policy in ``<data dir>/policy.json``, parsed again whenever the file's bytes
    change (read on every command: a rewrite within one mtime tick, of the same size, is
    seen too).

    A missing file is the default policy; an unreadable one refuses every command (the
    operator's rules are never silently dropped). Changes (:meth:`update`) hold an
    exclusive lock on ``<data dir>/.policy.lock``, so two operators' edits at once both
    apply.

    Example
    -------
    >>> import tempfile
    >>> holder = PolicyFile(tempfile.mkdtemp())
    >>> holder.update(public_tags=["#digits"]).is_public(("#digits",))
    True
    """

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(data_dir)
        self.path = self.dir / POLICY_FILE
        self.pending_path = self.dir / PENDING_FILE
        self._lock = threading.Lock()
        self._stamp: bytes | None = None
        self._policy = Policy()
        self._error: str | None = None

    def current(self) -> Policy:
        """The policy as the file says now (reloaded on change)."""
        with self._lock:
            try:
                stamp: bytes | None = self.path.read_bytes()
            except FileNotFoundError:
                stamp = None
            except OSError as exc:
                self._stamp, self._error = None, f"{self.path}: {exc}"
                raise PolicyError(f"the device's policy file is invalid: {self._error}") from None
            if stamp != self._stamp or self._error is not None:
                self._load(stamp)
            if self._error is not None:
                raise PolicyError(f"the device's policy file is invalid: {self._error}")
            return self._policy

    def _load(self, stamp: bytes | None) -> None:
        self._stamp = stamp
        self._error = None
        if stamp is None:
            self._policy = Policy()
            return
        try:
            self._policy = Policy.from_json(json.loads(stamp))
        except ValueError as exc:  # also undecodable bytes (UnicodeDecodeError)
            self._error = f"{self.path}: {exc}"

    def save(self, policy: Policy) -> None:
        """Write the policy atomically (a reader sees the old or the new file)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.path, policy.to_json())

    def update(
        self,
        *,
        allow: list[str] = (),  # type: ignore[assignment]
        deny: list[str] = (),  # type: ignore[assignment]
        public_tags: list[str] = (),  # type: ignore[assignment]
        private_tags: list[str] = (),  # type: ignore[assignment]
        approve: list[str] = (),  # type: ignore[assignment]
        revoke: list[str] = (),  # type: ignore[assignment]
        budgets: dict[str, int] | None = None,
        trust: dict[str, str] | None = None,
        distrust: list[str] = (),  # type: ignore[assignment]
    ) -> Policy:
        """Change the policy file; returns the new policy."""
        with self._edit_lock():
            return self._update(
                allow, deny, public_tags, private_tags, approve, revoke, budgets, trust, distrust
            )

    @contextlib.contextmanager
    def _edit_lock(self) -> Iterator[None]:
        """Hold the exclusive edit lock of the policy (across processes)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_FILE, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _update(
        self,
        allow: list[str],
        deny: list[str],
        public_tags: list[str],
        private_tags: list[str],
        approve: list[str],
        revoke: list[str],
        budgets: dict[str, int] | None,
        trust: dict[str, str] | None,
        distrust: list[str],
    ) -> Policy:
        policy = self.current()
        producers = [p for p in policy.producers if p not in deny]
        for p in allow:
            if p not in producers:
                producers.append(p)
        if allow and "*" in producers and "*" not in allow:
            producers.remove("*")  # naming producers means only those
        budget_values = {f.name: getattr(policy.budgets, f.name) for f in fields(Budgets)}
        budget_values.update(budgets or {})
        keys = {k: v for k, v in policy.trusted_keys if k not in distrust}
        keys.update(trust or {})
        for name, key in keys.items():
            if not _is_key(key):
                raise ValueError(f"trusted key {name!r} is not an ed25519 key (64 hex digits)")
        new = Policy(
            trusted_keys=tuple(sorted(keys.items())),
            producers=tuple(producers),
            public_tags=(policy.public_tags | set(public_tags)) - set(private_tags),
            approved_plans=(policy.approved_plans | set(approve)) - set(revoke),
            budgets=Budgets.from_json(budget_values),
        )
        self.save(new)
        if approve:
            self._drop_pending(set(approve))
        return self.current()

    def approve(self, content_hash: str) -> Policy:
        return self.update(approve=[content_hash])

    def note_pending(self, plan: PendingPlan) -> None:
        """Remember a plan waiting for approval (best effort, bounded)."""
        with self._edit_lock(), self._lock:
            waiting = self._read_pending()
            waiting[plan.content_hash] = plan.to_json()
            while len(waiting) > MAX_PENDING:
                waiting.pop(next(iter(waiting)))
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.pending_path, waiting)

    def pending(self) -> list[PendingPlan]:
        with self._lock:
            waiting = self._read_pending()
        approved = self.current().approved_plans
        return [PendingPlan(**entry) for h, entry in waiting.items() if h not in approved]

    def _drop_pending(self, hashes: set[str]) -> None:
        with self._lock:
            waiting = self._read_pending()
            if hashes & set(waiting):
                _write_json(
                    self.pending_path, {h: e for h, e in waiting.items() if h not in hashes}
                )

    def _read_pending(self) -> dict[str, Any]:
        try:
            data = json.loads(self.pending_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


def _is_key(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


PolicySource = MemoryPolicy | PolicyFile
"""Where a device runtime reads its policy from."""

__all__ = [
    "Budgets",
    "MemoryPolicy",
    "PendingPlan",
    "Policy",
    "PolicyFile",
    "PolicySource",
]
