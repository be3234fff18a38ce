"""``fedplan demo`` flags for secure aggregation and DP-FedAvg (``--secagg``, ``--dp-*``).

Examples
--------
>>> import argparse
>>> p = argparse.ArgumentParser()
>>> add_arguments(p)
>>> secure, dp = from_args(p.parse_args(["--secagg", "--dp-epsilon", "8"]))
>>> secure is not None, dp.target_epsilon, dp.delta
(True, 8.0, 1e-05)
>>> args = p.parse_args(["--secagg", "--dp-epsilon", "8", "--adaptive-clip", "0.5"])
>>> from_args(args)[1].target_quantile, adaptive_secure(args)
(0.5, True)
"""

from __future__ import annotations

import argparse
from typing import Any

from producer.fl.dp_fedavg import DifferentialPrivacy
from producer.fl.secure_rounds import SecureAggregation

SETTINGS = ("secagg", "secagg_k", "dp_epsilon", "dp_delta", "dp_clip", "dp_noise",
            "adaptive_clip", "dp_count_noise")
"""The demo arguments of this module that define the job (kept in checkpoints)."""


def add_arguments(p: Any) -> None:
    """Add the secure-aggregation and differential-privacy flags to a parser."""
    p.add_argument(
        "--secagg",
        action="store_true",
        help="secure aggregation (SecAgg+): the server learns only the sum of the updates; "
        "up to a third of a round's devices may drop out",
    )
    p.add_argument("--secagg-k", type=int, default=None,
                   help="with --secagg: k of the k-regular neighbour graph (default: the "
                   "smallest k that survives a third dropping out; complete for small rounds)")
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="DP-FedAvg with this ε budget for the whole run (noise calibrated to "
                   "it; the run stops before passing it)")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="the δ of (ε, δ)-DP")
    p.add_argument("--dp-clip", type=float, default=0.5,
                   help="L2 clip norm C of each device's update")
    p.add_argument("--dp-noise", type=float, default=None,
                   help="noise multiplier z (default: calibrated from --dp-epsilon)")
    p.add_argument("--adaptive-clip", type=float, default=None, metavar="QUANTILE",
                   help="with DP: adaptive clipping (Andrew et al. 2021), --dp-clip moves "
                   "towards this quantile of the update norms (e.g. 0.5); with --secagg the "
                   "unclipped count is summed securely with the updates")
    p.add_argument("--dp-count-noise", type=float, default=None,
                   help="with --adaptive-clip: the count's noise sigma_b (default: devices/20, "
                   "or z when that is not above z/2)")


def from_args(args: argparse.Namespace) -> tuple[SecureAggregation | None,
                                                 DifferentialPrivacy | None]:
    """The job's ``secure_aggregation`` and ``privacy`` from the demo's flags."""
    secure = SecureAggregation(neighbours=args.secagg_k) if args.secagg else None
    dp = None
    if args.dp_epsilon is not None or args.dp_noise is not None:
        dp = DifferentialPrivacy(
            noise_multiplier=args.dp_noise,
            target_epsilon=args.dp_epsilon,
            delta=args.dp_delta,
            clip_norm=args.dp_clip,
            target_quantile=getattr(args, "adaptive_clip", None),
            count_stddev=getattr(args, "dp_count_noise", None),
        )
    elif getattr(args, "adaptive_clip", None) is not None:
        raise ValueError("--adaptive-clip needs DP: give --dp-epsilon or --dp-noise")
    return secure, dp


def adaptive_secure(args: argparse.Namespace) -> bool:
    """Whether the update plans must clip and append the indicator (secure, adaptive DP)."""
    dp = args.dp_epsilon is not None or args.dp_noise is not None
    return bool(args.secagg and dp and getattr(args, "adaptive_clip", None) is not None)


__all__ = ["SETTINGS", "adaptive_secure", "add_arguments", "from_args"]
