"""The ``fedplan`` console script: one subcommand per module, registered here."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that provide subcommands. Each defines ``register(subparsers) -> None``, which adds
# its subparser(s) and sets ``func=<callable(args) -> int>`` as the default.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "broker_config.setup",
    "consumer.worker.cli",
    "consumer.policy.cli",
    "producer.cli.status",
    "producer.fl.demo",
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedplan", description="Federated jobs for PyTorch as traced, allow-listed plans."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    return int(func(args))


if __name__ == "__main__":
    sys.exit(main())
