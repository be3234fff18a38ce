"""The secure-aggregation wire codecs round-trip every message, and refuse malformed ones."""

from __future__ import annotations

import pytest

from consumer.secagg import (
    QuantizationParams,
    RoundConfig,
    SecAggProtocolError,
    advertise_keys,
    mask_input,
    share_keys,
    unmask,
)
from consumer.secagg import wire_codec as wc
from producer.fl.secure_aggregation import SecureAggregationRound
from schemas import command_pb2 as pb
from schemas.errors import error_from_code
from schemas.ir import SCHEMA_VERSION
from schemas.wire import decode_command, decode_reply, encode_command, encode_reply


def config(k: int | None = None, n: int = 5, **kw: object) -> RoundConfig:
    q = QuantizationParams(clip=1.0, num_clients=n, max_weight=7, noise_bound=40)
    ids = [f"d{i}" for i in range(n)]
    return RoundConfig.create("r-1", ids, length=3, quantization=q, k=k, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [None, 2])
def test_a_round_config_survives_the_wire_unchanged(k: int | None) -> None:
    cfg = config(k=k, noise_sigma=3.5, noise_kind="skellam")
    command = pb.Command(schema_version=SCHEMA_VERSION, command_id="c")
    command.secagg_advertise.config.CopyFrom(wc.config_to_proto(cfg))
    back = decode_command(encode_command(command))
    assert wc.config_from_proto(back.secagg_advertise.config) == cfg


def test_every_message_of_a_round_survives_the_wire_unchanged() -> None:
    cfg = config()
    server = SecureAggregationRound(cfg)
    states, adverts = {}, []
    for d in cfg.devices:
        states[d], advert = advertise_keys(cfg, d)
        assert wc.advert_from_proto(wc.advert_to_proto(advert)) == advert
        assert wc.reply_from_proto(wc.reply_to_proto(advert)) == advert
        adverts.append(advert)
    shares = []
    for d, request in server.collect_adverts(adverts).items():
        assert wc.share_request_from_proto(wc.share_request_to_proto(request)) == request
        states[d], message = share_keys(states[d], request)
        assert wc.reply_from_proto(wc.reply_to_proto(message)) == message
        shares.append(message)
    masked = []
    for d, request in server.collect_shares(shares).items():
        proto = wc.mask_request_to_proto(request, input_id="upd", weight=3)
        assert wc.mask_request_from_proto(proto) == (request, "upd", 3)
        states[d], message = mask_input(states[d], request, [0.1, 0.2, 0.3], weight=3)
        reply = pb.Reply(schema_version=SCHEMA_VERSION, command_id="x",
                         ok=pb.Ok(secagg=wc.reply_to_proto(message)))
        decoded = decode_reply(encode_reply(reply))
        assert wc.reply_from_proto(decoded.ok.secagg) == message
        masked.append(message)
    responses = []
    for d, request in server.collect_masked_inputs(masked).items():
        assert wc.unmask_request_from_proto(wc.unmask_request_to_proto(request)) == request
        states[d], message = unmask(states[d], request)
        assert wc.reply_from_proto(wc.reply_to_proto(message)) == message
        responses.append(message)
    assert server.collect_unmask_responses(responses).total_weight == 15


def test_a_config_of_another_protocol_version_is_refused() -> None:
    proto = wc.config_to_proto(config())
    proto.version = 1  # version 1 sent explicit neighbour lists
    with pytest.raises(SecAggProtocolError, match="version 1"):
        wc.config_from_proto(proto)
    proto = wc.config_to_proto(config(k=2))
    proto.graph.version = 2
    with pytest.raises(SecAggProtocolError, match="graph derivation version 2"):
        wc.config_from_proto(proto)


def test_a_k_regular_graph_travels_as_k_and_a_seed_not_as_edge_lists() -> None:
    cfg = config(k=4, n=100)
    proto = wc.config_to_proto(cfg)
    assert (proto.graph.k, proto.graph.seed, proto.complete_graph) == (
        4, cfg.neighbours.seed, False)  # type: ignore[attr-defined]
    assert not proto.neighbours and proto.ByteSize() < 1400  # was ~5 kB of lists at k = 4


def test_explicit_neighbour_lists_or_two_graphs_are_refused() -> None:
    proto = wc.config_to_proto(config(k=2))
    proto.neighbours.add(device_id="d0", peers=["d1", "d2"])
    with pytest.raises(SecAggProtocolError, match="explicit neighbour lists"):
        wc.config_from_proto(proto)
    proto = wc.config_to_proto(config(k=2))
    proto.complete_graph = True
    with pytest.raises(SecAggProtocolError, match="exactly one graph"):
        wc.config_from_proto(proto)
    proto.complete_graph = False
    proto.ClearField("graph")
    with pytest.raises(SecAggProtocolError, match="exactly one graph"):
        wc.config_from_proto(proto)


@pytest.mark.parametrize(
    ("n", "k", "seed", "match"),
    [
        (5, 0, b"s" * 32, "k = 0"),
        (5, 1, b"s" * 32, "k = 1"),
        (5, 4, b"s" * 32, "k = 4"),  # k >= n - 1 is the complete graph's flag
        (2000, 1001, b"s" * 32, "k = 1001"),  # beyond MAX_NEIGHBOURS
        (7, 3, b"s" * 32, "odd number"),
        (5, 2, b"", "seed"),
        (5, 2, b"s" * 65, "seed"),
    ],
)
def test_a_hostile_graph_degree_or_seed_is_refused_with_a_typed_error(
    n: int, k: int, seed: bytes, match: str
) -> None:
    proto = wc.config_to_proto(config(k=2, n=n))
    proto.graph.k, proto.graph.seed = k, seed
    with pytest.raises(SecAggProtocolError, match=match):
        wc.config_from_proto(proto)


def test_an_unsorted_or_repeating_device_list_is_refused() -> None:
    proto = wc.config_to_proto(config(k=2))
    proto.devices[0], proto.devices[1] = proto.devices[1], proto.devices[0]
    with pytest.raises(SecAggProtocolError, match="sorted"):
        wc.config_from_proto(proto)
    proto = wc.config_to_proto(config(k=2))
    proto.devices[1] = proto.devices[0]
    with pytest.raises(SecAggProtocolError, match="distinct"):
        wc.config_from_proto(proto)


def test_a_peer_named_twice_in_a_message_is_refused() -> None:
    msg = pb.SecAggShareKeys(round_id="r", device_id="a", ciphertexts=[
        pb.SecAggPeerBytes(peer="b", data=b"1"), pb.SecAggPeerBytes(peer="b", data=b"2")])
    with pytest.raises(SecAggProtocolError, match="two ciphertexts"):
        wc.share_keys_from_proto(msg)
    with pytest.raises(SecAggProtocolError, match="repeats"):
        wc.unmask_request_from_proto(pb.SecAggUnmask(round_id="r", survivors=["a", "a"]))
    with pytest.raises(SecAggProtocolError, match="without a message"):
        wc.reply_from_proto(pb.SecAggReply())


def test_secagg_error_codes_come_back_as_their_classes_from_the_wire() -> None:
    for code in ("SECAGG_BELOW_THRESHOLD", "SECAGG_PROTOCOL", "SECAGG_OVERFLOW",
                 "PRIVACY_BUDGET"):
        assert error_from_code(code, "m").code == code


def test_a_graph_too_dense_for_a_device_to_share_over_is_refused_before_it_is_built() -> None:
    complete = wc.config_to_proto(config())
    assert complete.complete_graph and not complete.neighbours  # n ids, not n^2 entries
    complete.devices.extend(f"y{i}" for i in range(wc.MAX_NEIGHBOURS + 1))
    with pytest.raises(SecAggProtocolError, match="k-regular"):
        wc.config_from_proto(complete)
    too_many = wc.config_to_proto(config(k=2))
    too_many.devices.extend(f"z{i:05d}" for i in range(wc.MAX_DEVICES))
    with pytest.raises(SecAggProtocolError, match="more than 10000 devices"):
        wc.config_from_proto(too_many)
