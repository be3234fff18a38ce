"""The secure-aggregation messages to and from their wire form (``schemas/command.proto``).

Symmetric pairs ``x_to_proto`` / ``x_from_proto`` for the round config and every message of
the four steps. Decoding checks what the protobuf types cannot: a peer named twice, a
device list over :data:`MAX_DEVICES`, a graph ``k`` out of bounds, a protocol or graph
version this code does not speak. Bytes
fields stay bytes; their sizes are checked where they are used (client steps, server round).

Examples
--------
>>> from consumer.secagg.quantize import QuantizationParams
>>> from consumer.secagg.messages import RoundConfig
>>> cfg = RoundConfig.create("r1", ["a", "b", "c"], length=4,
...                          quantization=QuantizationParams(clip=1.0, num_clients=3))
>>> config_from_proto(config_to_proto(cfg)) == cfg
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from consumer.secagg.errors import SecAggProtocolError
from consumer.secagg.graph import GRAPH_VERSION, NeighbourGraph
from consumer.secagg.messages import (
    PROTOCOL_VERSION,
    KeyAdvert,
    MaskedInput,
    MaskInputRequest,
    RoundConfig,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from consumer.secagg.quantize import QuantizationParams
from schemas import command_pb2 as pb

MAX_DEVICES = 10_000
"""Most devices one round may name (bounds every list a device decodes and keeps)."""
MAX_NEIGHBOURS = 1_000
"""Most neighbours of one device (a device's share step costs O(k * t) field operations)."""
MIN_SEED_BYTES = 16
MAX_SEED_BYTES = 64
"""Bounds on a graph seed's length (the server draws 32 random bytes)."""

Message = KeyAdvert | ShareKeys | MaskedInput | UnmaskResponse


def config_to_proto(config: RoundConfig) -> pb.SecAggRoundConfig:
    """The round's public parameters as a ``SecAggRoundConfig``: the graph as the flag
    ``complete_graph`` or as ``k`` and its seed (``SecAggGraph``), never as edge lists."""
    q = config.quantization
    graph = config.neighbours
    if not isinstance(graph, NeighbourGraph):
        raise SecAggProtocolError("only a complete or a seeded k-regular graph (graph."
                                  "NeighbourGraph) travels; every device derives it")
    return pb.SecAggRoundConfig(
        version=config.version,
        round_id=config.round_id,
        devices=list(config.devices),
        complete_graph=graph.k is None,
        graph=None if graph.k is None else pb.SecAggGraph(
            version=GRAPH_VERSION, k=graph.k, seed=graph.seed),
        threshold=config.threshold,
        min_survivors=config.min_survivors,
        length=config.length,
        quantization=pb.SecAggQuantization(
            clip=q.clip,
            scale_bits=q.scale_bits,
            max_weight=q.max_weight,
            num_clients=q.num_clients,
            noise_bound=q.noise_bound,
            modulus_bits=q.modulus_bits,
        ),
        noise_sigma=config.noise_sigma,
        noise_kind=config.noise_kind,
    )


def config_from_proto(msg: pb.SecAggRoundConfig) -> RoundConfig:
    """A ``RoundConfig`` from the wire, validated (``SecAggProtocolError`` /
    ``SecAggOverflowError`` name what is wrong). The device derives the graph itself."""
    if msg.version != PROTOCOL_VERSION:
        raise SecAggProtocolError(
            f"secure-aggregation protocol version {msg.version}; this device speaks "
            f"{PROTOCOL_VERSION}"
        )
    n = len(msg.devices)
    if n > MAX_DEVICES:
        raise SecAggProtocolError(f"a round of more than {MAX_DEVICES} devices")
    if msg.neighbours:
        raise SecAggProtocolError("explicit neighbour lists are not accepted: the graph is "
                                  "complete_graph or a seeded k-regular graph")
    if msg.complete_graph == msg.HasField("graph"):
        raise SecAggProtocolError("a round config names exactly one graph: complete_graph "
                                  "or a seeded k-regular graph")
    k: int | None = None
    if msg.complete_graph:
        if n > MAX_NEIGHBOURS + 1:
            raise SecAggProtocolError(
                f"a complete graph of {n} devices gives each more than {MAX_NEIGHBOURS} "
                "neighbours; use a k-regular graph (SecAgg+)"
            )
    else:
        g = msg.graph
        if g.version != GRAPH_VERSION:
            raise SecAggProtocolError(f"graph derivation version {g.version}; this device "
                                      f"speaks {GRAPH_VERSION}")
        if not 2 <= g.k <= min(MAX_NEIGHBOURS, n - 2):
            raise SecAggProtocolError(
                f"k = {g.k} for {n} devices: a k-regular graph needs 2 <= k <= "
                f"min({MAX_NEIGHBOURS}, n - 2) (k >= n - 1 is the complete graph)"
            )
        if g.k % 2 and n % 2:
            raise SecAggProtocolError(f"no {g.k}-regular graph of an odd number of devices")
        if not MIN_SEED_BYTES <= len(g.seed) <= MAX_SEED_BYTES:
            raise SecAggProtocolError(
                f"a graph seed has {MIN_SEED_BYTES}..{MAX_SEED_BYTES} bytes, not {len(g.seed)}")
        k = g.k
    neighbours = NeighbourGraph(msg.devices, k=k, seed=msg.graph.seed)  # RoundConfig: sorted
    q = msg.quantization
    quantization = QuantizationParams(
        clip=q.clip,
        scale_bits=q.scale_bits,
        max_weight=q.max_weight,
        num_clients=q.num_clients,
        noise_bound=q.noise_bound,
        modulus_bits=q.modulus_bits,
    )
    return RoundConfig(
        round_id=msg.round_id,
        devices=tuple(msg.devices),
        neighbours=neighbours,
        threshold=msg.threshold,
        min_survivors=msg.min_survivors,
        length=msg.length,
        quantization=quantization,
        noise_sigma=msg.noise_sigma,
        noise_kind=msg.noise_kind or "discrete_gaussian",
        version=msg.version,
    )


def advert_to_proto(advert: KeyAdvert) -> pb.SecAggKeyAdvert:
    return pb.SecAggKeyAdvert(
        round_id=advert.round_id,
        device_id=advert.device_id,
        cipher_public=advert.cipher_public,
        mask_public=advert.mask_public,
        seed_commitment=advert.seed_commitment,
    )


def advert_from_proto(msg: pb.SecAggKeyAdvert) -> KeyAdvert:
    return KeyAdvert(
        msg.round_id, msg.device_id, msg.cipher_public, msg.mask_public, msg.seed_commitment
    )


def share_request_to_proto(request: ShareKeysRequest) -> pb.SecAggShare:
    return pb.SecAggShare(
        round_id=request.round_id, adverts=[advert_to_proto(a) for a in request.adverts]
    )


def share_request_from_proto(msg: pb.SecAggShare) -> ShareKeysRequest:
    if len(msg.adverts) > MAX_DEVICES:
        raise SecAggProtocolError(f"more than {MAX_DEVICES} adverts")
    return ShareKeysRequest(msg.round_id, tuple(advert_from_proto(a) for a in msg.adverts))


def share_keys_to_proto(message: ShareKeys) -> pb.SecAggShareKeys:
    return pb.SecAggShareKeys(
        round_id=message.round_id,
        device_id=message.device_id,
        ciphertexts=_peer_bytes(message.ciphertexts),
    )


def share_keys_from_proto(msg: pb.SecAggShareKeys) -> ShareKeys:
    return ShareKeys(msg.round_id, msg.device_id, _peer_map(msg.ciphertexts, "ciphertext"))


def mask_request_to_proto(
    request: MaskInputRequest, *, input_id: str, weight: int
) -> pb.SecAggMask:
    """The mask step's command: the ciphertexts for the device, and what to aggregate."""
    return pb.SecAggMask(
        round_id=request.round_id,
        ciphertexts=_peer_bytes(request.ciphertexts),
        input_id=input_id,
        weight=weight,
    )


def mask_request_from_proto(msg: pb.SecAggMask) -> tuple[MaskInputRequest, str, int]:
    """``(request, input_id, weight)`` of a ``SecAggMask``."""
    request = MaskInputRequest(msg.round_id, _peer_map(msg.ciphertexts, "ciphertext"))
    return request, msg.input_id, int(msg.weight)


def masked_to_proto(message: MaskedInput) -> pb.SecAggMaskedInput:
    return pb.SecAggMaskedInput(
        round_id=message.round_id, device_id=message.device_id, vector=message.vector
    )


def masked_from_proto(msg: pb.SecAggMaskedInput) -> MaskedInput:
    return MaskedInput(msg.round_id, msg.device_id, msg.vector)


def unmask_request_to_proto(request: UnmaskRequest) -> pb.SecAggUnmask:
    return pb.SecAggUnmask(round_id=request.round_id, survivors=list(request.survivors))


def unmask_request_from_proto(msg: pb.SecAggUnmask) -> UnmaskRequest:
    if len(msg.survivors) > MAX_DEVICES or len(set(msg.survivors)) != len(msg.survivors):
        raise SecAggProtocolError("a survivor list repeats a device or is too long")
    return UnmaskRequest(msg.round_id, tuple(msg.survivors))


def unmask_response_to_proto(message: UnmaskResponse) -> pb.SecAggUnmaskResponse:
    return pb.SecAggUnmaskResponse(
        round_id=message.round_id,
        device_id=message.device_id,
        seed_shares=_peer_bytes(message.seed_shares),
        key_shares=_peer_bytes(message.key_shares),
    )


def unmask_response_from_proto(msg: pb.SecAggUnmaskResponse) -> UnmaskResponse:
    return UnmaskResponse(
        msg.round_id,
        msg.device_id,
        seed_shares=_peer_map(msg.seed_shares, "seed share"),
        key_shares=_peer_map(msg.key_shares, "key share"),
    )


def reply_to_proto(message: Message) -> pb.SecAggReply:
    """A device step's reply message in the ``SecAggReply`` oneof."""
    if isinstance(message, KeyAdvert):
        return pb.SecAggReply(advert=advert_to_proto(message))
    if isinstance(message, ShareKeys):
        return pb.SecAggReply(shares=share_keys_to_proto(message))
    if isinstance(message, MaskedInput):
        return pb.SecAggReply(masked=masked_to_proto(message))
    return pb.SecAggReply(unmask=unmask_response_to_proto(message))


def reply_from_proto(msg: pb.SecAggReply) -> Message:
    """The message in a ``SecAggReply``; an empty one is a ``SecAggProtocolError``."""
    step = msg.WhichOneof("step")
    if step == "advert":
        return advert_from_proto(msg.advert)
    if step == "shares":
        return share_keys_from_proto(msg.shares)
    if step == "masked":
        return masked_from_proto(msg.masked)
    if step == "unmask":
        return unmask_response_from_proto(msg.unmask)
    raise SecAggProtocolError("a secure-aggregation reply without a message")


def _peer_bytes(values: Mapping[str, bytes]) -> list[pb.SecAggPeerBytes]:
    return [pb.SecAggPeerBytes(peer=p, data=values[p]) for p in sorted(values)]


def _peer_map(entries: Iterable[pb.SecAggPeerBytes], what: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for entry in entries:
        if entry.peer in out:
            raise SecAggProtocolError(f"two {what}s for {entry.peer!r}")
        if len(out) >= MAX_DEVICES:
            raise SecAggProtocolError(f"more than {MAX_DEVICES} {what}s")
        out[entry.peer] = entry.data
    return out


__all__ = [
    "MAX_DEVICES",
    "MAX_NEIGHBOURS",
    "advert_from_proto",
    "advert_to_proto",
    "config_from_proto",
    "config_to_proto",
    "mask_request_from_proto",
    "mask_request_to_proto",
    "masked_from_proto",
    "masked_to_proto",
    "reply_from_proto",
    "reply_to_proto",
    "share_keys_from_proto",
    "share_keys_to_proto",
    "share_request_from_proto",
    "share_request_to_proto",
    "unmask_request_from_proto",
    "unmask_request_to_proto",
    "unmask_response_from_proto",
    "unmask_response_to_proto",
]
