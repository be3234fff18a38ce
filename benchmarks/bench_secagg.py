"""Secure aggregation cost per device and on the server, in process (no transport).

    .venv/bin/python benchmarks/bench_secagg.py [--dim 4810] [--out benchmarks/RESULTS.md]

For each setting (n devices, neighbourhood k, a third dropping after sharing or none) one
round runs end to end through ``consumer.secagg.client`` and
``producer.fl.secure_aggregation``. Reported: median wall time per device of each device
step, the server's time per stage, and the bytes each device sends and receives (message
payloads: keys, ciphertexts, masked vector, shares; no framing). The result is checked
against the plain weighted sum. ``dim`` defaults to the 64-64-10 MLP of the FedAvg bench.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from consumer.secagg import (
    QuantizationParams,
    RoundConfig,
    advertise_keys,
    mask_input,
    share_keys,
    unmask,
)
from producer.fl.secure_aggregation import SecureAggregationRound

START, END = "<!-- bench_secagg:start -->", "<!-- bench_secagg:end -->"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - t0) * 1000


def one_round(n: int, k: int | None, dim: int, drop_third: bool) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    ids = [f"dev{i:03d}" for i in range(n)]
    inputs = {d: (rng.uniform(-1, 1, dim), int(rng.integers(1, 51))) for d in ids}
    q = QuantizationParams(clip=1.0, scale_bits=16, max_weight=50, num_clients=n)
    cfg = RoundConfig.create("bench", ids, length=dim, quantization=q, k=k)
    gone = set(ids[:: 3][: n // 3]) if drop_third else set()
    server = SecureAggregationRound(cfg)
    device_ms: dict[str, list[float]] = {s: [] for s in ("advertise", "share", "mask", "unmask")}
    server_ms: dict[str, float] = {}
    sent = dict.fromkeys(ids, 0)
    received = dict.fromkeys(ids, 0)
    states, adverts = {}, []
    for d in ids:
        (states[d], a), ms = timed(lambda d=d: advertise_keys(cfg, d))
        device_ms["advertise"].append(ms)
        sent[d] += len(a.cipher_public) + len(a.mask_public)
        adverts.append(a)
    requests, server_ms["adverts"] = timed(lambda: server.collect_adverts(adverts))
    shares = []
    for d, req in requests.items():
        received[d] += sum(len(a.cipher_public) + len(a.mask_public) for a in req.adverts)
        (states[d], m), ms = timed(lambda d=d, req=req: share_keys(states[d], req))
        device_ms["share"].append(ms)
        sent[d] += sum(len(c) for c in m.ciphertexts.values())
        shares.append(m)
    requests2, server_ms["shares"] = timed(lambda: server.collect_shares(shares))
    masked = []
    for d, req in requests2.items():
        received[d] += sum(len(c) for c in req.ciphertexts.values())
        if d in gone:
            continue
        x, w = inputs[d]
        (states[d], m), ms = timed(lambda d=d, req=req, x=x, w=w: mask_input(
            states[d], req, x, weight=w))
        device_ms["mask"].append(ms)
        sent[d] += len(m.vector)
        masked.append(m)
    requests3, server_ms["masked"] = timed(lambda: server.collect_masked_inputs(masked))
    responses = []
    for d, req in requests3.items():
        received[d] += sum(len(s.encode()) for s in req.survivors)
        (states[d], r), ms = timed(lambda d=d, req=req: unmask(states[d], req))
        device_ms["unmask"].append(ms)
        sent[d] += sum(map(len, r.seed_shares.values())) + sum(map(len, r.key_shares.values()))
        responses.append(r)
    result, server_ms["unmask"] = timed(lambda: server.collect_unmask_responses(responses))
    who = [d for d in ids if d not in gone]
    expected = sum(inputs[d][0] * inputs[d][1] for d in who)
    assert np.abs(result.weighted_sum - expected).max() <= result.error_bound
    return {
        "n": n,
        "k": len(cfg.neighbours[ids[0]]),
        "t": cfg.threshold,
        "bits": q.modulus_bits,
        "dropped": len(gone),
        "device_ms": {s: statistics.median(v) for s, v in device_ms.items()},
        "server_ms": server_ms,
        "sent": statistics.median(sent[d] for d in who),
        "received": statistics.median(received[d] for d in who),
    }


def format_results(rows: list[dict[str, Any]], dim: int) -> str:
    lines = [
        "## Secure aggregation (issue 12 core): cost per device and on the server",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_secagg.py --dim {dim} "
        "--out benchmarks/RESULTS.md`",
        "",
        f"In process, no transport; {dim} values per device (+1 weight), 16 fractional bits, "
        f"weights <= 50. Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average {os.getloadavg()[0]:.1f} at the end, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC "
        "(other jobs share the CPUs: times are noisy, bytes are exact). Times are medians "
        "per device (ms) and the server's total per stage (ms).",
        "",
        "| n | k | t | b | dropped after sharing | device: advertise / share / mask / unmask "
        "| server: adverts / shares / masked / unmask | bytes sent / received per device |",
        "|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        dv, sv = r["device_ms"], r["server_ms"]
        lines.append(
            f"| {r['n']} | {r['k']} | {r['t']} | {r['bits']} | {r['dropped']} "
            f"| {dv['advertise']:.1f} / {dv['share']:.1f} / {dv['mask']:.1f} / "
            f"{dv['unmask']:.2f} "
            f"| {sv['adverts']:.1f} / {sv['shares']:.1f} / {sv['masked']:.1f} / "
            f"{sv['unmask']:.1f} "
            f"| {r['sent']:,.0f} / {r['received']:,.0f} |"
        )
    lines += [
        "",
        "The masked vector, packed in b bits per value, is most of what a device sends; the "
        "rest is its encrypted shares (104 bytes per neighbour: nonce, two 38-byte shares, "
        "tag). With dropouts the server rebuilds each dropped device's mask key and "
        "regenerates its pairwise masks with every surviving "
        "neighbour, which is where its unmask time goes.",
    ]
    return "\n".join(lines)


def write_section(path: Path, table: str) -> None:
    """Put ``table`` between this benchmark's markers in ``path``, keeping other sections."""
    block = f"{START}\n{table}\n{END}"
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n" if text else block + "\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4810)
    parser.add_argument("--out", default=None, help="write the Markdown table here")
    args = parser.parse_args()
    settings = [(8, None, False), (8, None, True), (100, 20, False), (100, 60, True)]
    rows = [one_round(n, k, args.dim, drop) for n, k, drop in settings]
    table = format_results(rows, args.dim)
    print(table)
    if args.out:
        write_section(Path(args.out), table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
