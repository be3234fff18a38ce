"""A device's secure-aggregation state as bytes (strict JSON, no pickle) for its store.

The device must persist its :class:`ClientState` before each reply leaves it (so a device
killed and restarted answers a redelivered request with the same reply and never re-keys a
round), and delete it when the round ends. Loading checks every field's type and size and
rebuilds the config through its own validation; anything else is a
:class:`SecAggIntegrityError`.

Examples
--------
>>> from consumer.secagg import QuantizationParams, RoundConfig, advertise_keys
>>> cfg = RoundConfig.create("r", ["a", "b", "c"], length=2,
...                          quantization=QuantizationParams(clip=1.0, num_clients=3))
>>> state, _ = advertise_keys(cfg, "a")
>>> state_from_bytes(state_to_bytes(state)) == state
True
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from typing import Any

from consumer.secagg import shamir
from consumer.secagg.client import ClientState
from consumer.secagg.crypto import KeyPair
from consumer.secagg.errors import SecAggError, SecAggIntegrityError
from consumer.secagg.graph import NeighbourGraph
from consumer.secagg.messages import KeyAdvert, MaskedInput, RoundConfig
from consumer.secagg.quantize import QuantizationParams

FORMAT = "fedplan.secagg.state/2"
MAX_STATE_BYTES = 64 * 1024 * 1024
STAGES = ("advertised", "shared", "masked", "unmasked")
_ADVERT = (32, 32, 32)  # cipher public key, mask public key, seed commitment
_SHARES = (shamir.SHARE_BYTES, shamir.SHARE_BYTES)  # mask-key share, self-mask seed share
_PAIR_KEYS = (32, 32)  # share encryption key, pairwise mask seed


def state_to_bytes(state: ClientState) -> bytes:
    """The state as UTF-8 JSON (bytes fields in base64)."""
    cfg, q = state.config, state.config.quantization
    doc = {
        "format": FORMAT,
        "config": {
            "round_id": cfg.round_id,
            "devices": list(cfg.devices),
            **_graph_to_doc(cfg.neighbours),
            "threshold": cfg.threshold,
            "min_survivors": cfg.min_survivors,
            "length": cfg.length,
            "noise_sigma": cfg.noise_sigma,
            "noise_kind": cfg.noise_kind,
            "version": cfg.version,
            "quantization": {
                "clip": q.clip,
                "scale_bits": q.scale_bits,
                "max_weight": q.max_weight,
                "num_clients": q.num_clients,
                "noise_bound": q.noise_bound,
                "modulus_bits": q.modulus_bits,
            },
        },
        "device_id": state.device_id,
        "stage": state.stage,
        "cipher_keys": [_b64(state.cipher_keys.private), _b64(state.cipher_keys.public)],
        "mask_keys": [_b64(state.mask_keys.private), _b64(state.mask_keys.public)],
        "self_seed": _b64(state.self_seed),
        "adverts": _table({d: (a.cipher_public, a.mask_public, a.seed_commitment)
                           for d, a in state.adverts.items()}, _ADVERT),
        "held_shares": _table(state.held_shares, _SHARES),
        "pair_keys": _table(state.pair_keys, _PAIR_KEYS),
        "masked": None if state.masked is None else [
            state.masked.round_id, state.masked.device_id, _b64(state.masked.vector)
        ],
        "revealed_seed_of": sorted(state.revealed_seed_of),
        "revealed_key_of": sorted(state.revealed_key_of),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def state_from_bytes(data: bytes) -> ClientState:
    """The state saved by :func:`state_to_bytes`, checked field by field."""
    if len(data) > MAX_STATE_BYTES:
        raise SecAggIntegrityError(f"a stored state over {MAX_STATE_BYTES} bytes")
    try:
        doc = json.loads(data.decode())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SecAggIntegrityError(f"not a {FORMAT} document")
        c = _dict(doc["config"])
        q = _dict(c["quantization"])
        quantization = QuantizationParams(
            clip=float(q["clip"]),
            scale_bits=_int(q["scale_bits"]),
            max_weight=_int(q["max_weight"]),
            num_clients=_int(q["num_clients"]),
            noise_bound=_int(q["noise_bound"]),
            modulus_bits=_int(q["modulus_bits"]),
        )
        config = RoundConfig(
            round_id=_str(c["round_id"]),
            devices=tuple(_str(d) for d in c["devices"]),
            neighbours=_graph_from_doc(c),
            threshold=_int(c["threshold"]),
            min_survivors=_int(c["min_survivors"]),
            length=_int(c["length"]),
            quantization=quantization,
            noise_sigma=float(c["noise_sigma"]),
            noise_kind=_str(c["noise_kind"]),
            version=_int(c["version"]),
        )
        masked = doc["masked"]
        if doc["stage"] not in STAGES:
            raise ValueError(f"unknown stage {doc['stage']!r}")
        return ClientState(
            config=config,
            device_id=_str(doc["device_id"]),
            stage=_str(doc["stage"]),
            cipher_keys=KeyPair(*(_key(v) for v in doc["cipher_keys"])),
            mask_keys=KeyPair(*(_key(v) for v in doc["mask_keys"])),
            self_seed=_key(doc["self_seed"]),
            adverts={
                d: KeyAdvert(config.round_id, d, *row)
                for d, row in _untable(doc["adverts"], _ADVERT).items()
            },
            held_shares=_untable(doc["held_shares"], _SHARES),  # type: ignore[arg-type]
            pair_keys=_untable(doc["pair_keys"], _PAIR_KEYS),  # type: ignore[arg-type]
            masked=None if masked is None else MaskedInput(
                _str(masked[0]), _str(masked[1]), _bytes(masked[2])
            ),
            revealed_seed_of=frozenset(_str(p) for p in doc["revealed_seed_of"]),
            revealed_key_of=frozenset(_str(p) for p in doc["revealed_key_of"]),
        )
    except SecAggIntegrityError:
        raise
    except (SecAggError, KeyError, IndexError, TypeError, ValueError, binascii.Error) as exc:
        raise SecAggIntegrityError(f"a stored secure-aggregation state is corrupt: {exc!r}") \
            from None


def _table(rows: Mapping[str, Sequence[bytes]], widths: tuple[int, ...]) -> dict[str, Any]:
    """Per-peer rows of fixed-width byte fields as the peer ids and one base64 string (a
    state holds k of them: one decode, not 3k)."""
    peers = sorted(rows)
    data = b"".join(field for p in peers for field in rows[p])
    if len(data) != len(peers) * sum(widths):
        raise SecAggIntegrityError("a state field of the wrong size")
    return {"peers": peers, "data": _b64(data)}


def _untable(value: Any, widths: tuple[int, ...]) -> dict[str, tuple[bytes, ...]]:
    doc = _dict(value)
    peers, data = _strings(doc["peers"]), _bytes(doc["data"])
    width = sum(widths)
    if len(data) != len(peers) * width or len(set(peers)) != len(peers):
        raise ValueError("a stored table of the wrong size or with a repeated peer")
    out = {}
    for i, peer in enumerate(peers):
        row, start = [], i * width
        for w in widths:
            row.append(data[start:start + w])
            start += w
        out[peer] = tuple(row)
    return out


def _graph_to_doc(graph: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """A derived graph as its ``k`` and seed (O(1), not O(n·k)); any other as its lists."""
    if isinstance(graph, NeighbourGraph):
        return {"graph": {"k": graph.k, "seed": _b64(graph.seed)}}
    return {"neighbours": {d: list(p) for d, p in graph.items()}}


def _graph_from_doc(c: dict[str, Any]) -> Mapping[str, tuple[str, ...]]:
    devices = tuple(_str(d) for d in c["devices"])
    if "graph" not in c:
        return {_str(d): _strings(ps) for d, ps in _dict(c["neighbours"]).items()}
    g = _dict(c["graph"])
    k = None if g["k"] is None else _int(g["k"])
    graph = NeighbourGraph(devices, k=k, seed=_bytes(g["seed"]))
    if graph.k != k:
        raise ValueError("a stored graph degree that no graph has")
    return graph


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _bytes(value: Any) -> bytes:
    return base64.b64decode(_str(value), validate=True)


def _key(value: Any) -> bytes:
    raw = _bytes(value)
    if len(raw) != 32:
        raise ValueError("a key, seed or commitment of the wrong size")
    return raw


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, found {type(value).__name__}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(type(v) is str for v in value):
        raise TypeError("expected a list of strings")
    return tuple(value)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, found {type(value).__name__}")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, found {type(value).__name__}")
    return value
