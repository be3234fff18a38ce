"""``fedplan device policy|pending|approve|audit``: the device operator's commands.

They act on a device's data dir (``--data-dir``, default ``FEDPLAN_DATA_DIR``) and take
effect on the next command the running worker handles (the policy file is re-read when it
changes; no restart).

Examples
--------
::

    fedplan device policy --data-dir runs/alice                      # show it
    fedplan device policy --data-dir runs/alice --public '#mnist'     # data tagged #mnist is public
    fedplan device policy --data-dir runs/alice --allow fedplan-producer-lab
    fedplan device policy --data-dir runs/alice --budget max_output_bytes=1000000
    fedplan device pending --data-dir runs/alice                     # plans waiting, with listings
    fedplan device approve --data-dir runs/alice 3f2a...             # release that plan's outputs
    fedplan device audit --data-dir runs/alice --sender p1 --refused
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from broker_config.settings import Settings
from consumer.policy.audit import AuditLog
from consumer.policy.rules import PolicyFile


def _data_dir(args: argparse.Namespace) -> str:
    return str(args.data_dir or Settings.from_env().data_dir)


def _budgets(pairs: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value.isdigit():
            raise SystemExit(f"--budget takes NAME=BYTES (an integer), not {pair!r}")
        out[key] = int(value)
    return out


def _pair(text: str) -> tuple[str, str]:
    name, sep, key = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--trust takes NAME=PUBLIC_KEY_HEX, not {text!r}")
    return name, key.lower()


def run_policy(args: argparse.Namespace) -> int:
    """``fedplan device policy``: show the policy, or change it and show the result."""
    holder = PolicyFile(_data_dir(args))
    changes: dict[str, Any] = {
        "allow": args.allow or [],
        "deny": args.deny or [],
        "public_tags": args.public or [],
        "private_tags": args.private or [],
        "revoke": args.revoke or [],
        "budgets": _budgets(args.budget or []),
        "trust": dict(_pair(p) for p in args.trust or []),
        "distrust": args.distrust or [],
    }
    try:
        policy = holder.update(**changes) if any(changes.values()) else holder.current()
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    print(json.dumps(policy.to_json(), indent=2, sort_keys=True))
    return 0


def run_pending(args: argparse.Namespace) -> int:
    """``fedplan device pending``: plans that computed on private data, waiting."""
    waiting = PolicyFile(_data_dir(args)).pending()
    if not waiting:
        print("no plans waiting for approval")
    for plan in waiting:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(plan.seen))
        print(f"{plan.content_hash}  {plan.name!r} from {plan.producer} (last seen {seen} UTC)")
        print(plan.listing)
        print()
    return 0


def run_approve(args: argparse.Namespace) -> int:
    """``fedplan device approve HASH``: outputs of that exact plan may leave the device."""
    holder = PolicyFile(_data_dir(args))
    for content_hash in args.hashes:
        if len(content_hash) != 64 or any(c not in "0123456789abcdef" for c in content_hash):
            print(f"error: {content_hash!r} is not a plan content hash (64 hex digits)")
            return 2
    holder.update(approve=list(args.hashes))
    for content_hash in args.hashes:
        print(f"approved {content_hash}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    """``fedplan device audit``: the device's record of commands, newest last."""
    log = AuditLog(_data_dir(args))
    outcome = "refused" if args.refused else args.outcome
    for e in log.entries(sender=args.sender, outcome=outcome, limit=args.limit):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.time))
        objects = ",".join(e.objects) or "-"
        print(
            f"{when}  {e.sender:<20} {e.kind:<14} {e.outcome:<16} out={e.bytes_out:<10} "
            f"rule={e.rule or '-'} plan={e.plan_hash[:12] or '-'} objects={objects}"
        )
    return 0


def register(subparsers: Any) -> None:
    """Add ``fedplan device ...`` to the console script."""
    device = subparsers.add_parser("device", help="the device operator's policy and audit log")
    sub = device.add_subparsers(dest="device_command", metavar="ACTION")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        p.add_argument("--data-dir", default=None, help="the device's data dir")
        return p

    p = add("policy", "show or change the device's policy (applies without a restart)")
    p.add_argument("--allow", action="append", help="admit this producer (broker user)")
    p.add_argument("--deny", action="append", help="stop admitting this producer")
    p.add_argument("--public", action="append", help="data with this tag may be read")
    p.add_argument("--private", action="append", help="make this tag private again")
    p.add_argument("--revoke", action="append", help="withdraw a plan's approval")
    p.add_argument("--budget", action="append", help="NAME=BYTES, e.g. max_output_bytes=1000000")
    p.add_argument(
        "--trust", action="append", help="NAME=KEY: plans this ed25519 key signs are approved"
    )
    p.add_argument("--distrust", action="append", help="stop trusting the key of this name")
    p.set_defaults(func=run_policy)
    p = add("pending", "plans waiting for approval, with their listings")
    p.set_defaults(func=run_pending)
    p = add("approve", "approve plans by content hash: their outputs may leave")
    p.add_argument("hashes", nargs="+", metavar="HASH")
    p.set_defaults(func=run_approve)
    p = add("audit", "the device's audit log")
    p.add_argument("--sender", default=None)
    p.add_argument("--outcome", default=None, help="ok or an error code")
    p.add_argument("--refused", action="store_true", help="only refused or failed commands")
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(func=run_audit)
