"""The k-regular graph derived from k and a seed: every party derives the same one, hostile
parameters are refused, and the default k survives a third of the devices dropping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from consumer.secagg import (
    QuantizationParams,
    RoundConfig,
    SecAggIntegrityError,
    SecAggProtocolError,
    advertise_keys,
    mask_input,
    share_keys,
    unmask,
)
from consumer.secagg import wire_codec as wc
from consumer.secagg.graph import (
    DEFAULT_FAILURE_PROBABILITY,
    dropout_failure_probability,
    neighbour_graph,
    safe_degree,
)
from consumer.secagg.state_codec import state_from_bytes, state_to_bytes
from producer.fl.secure_aggregation import SecureAggregationRound
from producer.fl.secure_rounds import SecureAggregation


def ids(n: int) -> list[str]:
    return [f"device-{i}" for i in range(n)]


def server_config(n: int, length: int = 4, **kw: object) -> RoundConfig:
    return SecureAggregation(**kw).round_config(  # type: ignore[arg-type]
        "run-r1a1", ids(n), length=length, max_weight=50)


def test_every_device_derives_the_servers_graph_from_k_the_seed_and_the_device_list() -> None:
    cfg = server_config(100)
    wire = wc.config_to_proto(cfg).SerializeToString()
    for device in cfg.devices:
        proto = type(wc.config_to_proto(cfg))()
        proto.ParseFromString(wire)
        mine = wc.config_from_proto(proto)
        assert mine.neighbours[device] == cfg.neighbours[device]
        state, _ = advertise_keys(mine, device)
        assert state_from_bytes(state_to_bytes(state)).config.neighbours[device] == (
            cfg.neighbours[device])
    explicit = {d: tuple(cfg.neighbours[d]) for d in cfg.devices}  # a plain dict, built anew
    assert all(len(p) == 67 for p in explicit.values())
    assert all(d in explicit[p] for d, peers in explicit.items() for p in peers)


def test_the_server_draws_a_fresh_graph_seed_for_every_round() -> None:
    first, second = server_config(100), server_config(100)
    assert first.neighbours.seed != second.neighbours.seed  # type: ignore[attr-defined]
    assert dict(first.neighbours) != dict(second.neighbours)


def test_a_graph_that_no_party_could_derive_does_not_go_on_the_wire() -> None:
    cfg = server_config(9, neighbours=4)
    hand_made = RoundConfig(
        round_id=cfg.round_id, devices=cfg.devices, neighbours=dict(cfg.neighbours),
        threshold=cfg.threshold, min_survivors=cfg.min_survivors, length=cfg.length,
        quantization=cfg.quantization)
    with pytest.raises(SecAggProtocolError, match="travels"):
        wc.config_to_proto(hand_made)


@pytest.mark.parametrize("n", [8, 9, 30, 100, 101, 300])
def test_the_default_degree_is_the_smallest_whose_failure_bound_is_negligible(n: int) -> None:
    k = SecureAggregation().degree(n)
    assert k == safe_degree(n, max_dropout=1 / 3)
    bound = dropout_failure_probability(n, k, max_dropout=1 / 3)
    assert bound <= DEFAULT_FAILURE_PROBABILITY
    smaller = [j for j in range(2, k) if j % 2 == 0 or n % 2 == 0]
    assert all(dropout_failure_probability(n, j, max_dropout=1 / 3) > DEFAULT_FAILURE_PROBABILITY
               for j in smaller)


def test_the_failure_bound_covers_simulated_dropouts_on_the_real_graph() -> None:
    n, k = 100, 40
    graph = neighbour_graph(ids(n), k=k, seed=b"s" * 32)
    t, rng, trials, failed = k // 2 + 1, np.random.default_rng(0), 400, 0
    for _ in range(trials):
        gone = set(rng.choice(ids(n), math.floor(n / 3), replace=False).tolist())
        failed += any(sum(p not in gone for p in graph[d]) < t for d in graph)
    bound = dropout_failure_probability(n, k, max_dropout=1 / 3)
    assert 0.05 < bound < 1  # a bound that says something
    assert failed / trials <= bound + 3 * math.sqrt(bound * (1 - bound) / trials)


def test_a_third_of_100_devices_dropping_at_the_default_k_commits_the_eager_weighted_sum() -> None:
    n, dim = 100, 6
    g = torch.Generator().manual_seed(12)
    inputs = {d: (torch.rand(dim, generator=g) * 2 - 1, int(torch.randint(1, 51, (), generator=g)))
              for d in ids(n)}
    cfg = server_config(n, length=dim)
    assert cfg.neighbours.k == 67 and cfg.threshold == 34  # type: ignore[attr-defined]
    proto = wc.config_to_proto(cfg)
    devices = {d: wc.config_from_proto(proto) for d in cfg.devices}  # each derives the graph
    order = np.random.default_rng(12).permutation(list(cfg.devices)).tolist()
    before_mask, after_mask = set(order[:16]), set(order[16:33])  # 33 = floor(100 / 3)
    server = SecureAggregationRound(cfg)
    states, adverts = {}, []
    for d in cfg.devices:
        states[d], advert = advertise_keys(devices[d], d)
        adverts.append(advert)
    shares = []
    for d, request in server.collect_adverts(adverts).items():
        states[d], message = share_keys(states[d], request)
        shares.append(message)
    masked = []
    for d, request in server.collect_shares(shares).items():
        if d not in before_mask:
            x, w = inputs[d]
            states[d], message = mask_input(states[d], request, x, weight=w)
            masked.append(message)
    responses = [unmask(states[d], request)[1]
                 for d, request in server.collect_masked_inputs(masked).items()
                 if d not in after_mask]
    result = server.collect_unmask_responses(responses)
    summed = [d for d in cfg.devices if d not in before_mask]
    expected = sum((inputs[d][0].double() * inputs[d][1] for d in summed),
                   torch.zeros(dim, dtype=torch.float64))
    assert result.total_weight == sum(inputs[d][1] for d in summed)
    assert np.abs(result.weighted_sum - expected.numpy()).max() <= result.error_bound
    assert set(result.dropped) == before_mask


def test_a_stored_state_with_a_graph_degree_no_graph_has_is_refused() -> None:
    cfg = server_config(101)  # k = 67 is odd: 68 is used with an odd number of devices
    state, _ = advertise_keys(cfg, cfg.devices[0])
    raw = state_to_bytes(state).replace(b'"k":68', b'"k":67')
    with pytest.raises(SecAggIntegrityError, match="degree"):
        state_from_bytes(raw)


def test_a_round_config_is_built_for_any_device_list_order() -> None:
    q = QuantizationParams(clip=1.0, num_clients=20, max_weight=5)
    a = RoundConfig.create("r", ids(20), length=2, quantization=q, k=6, graph_seed=b"x" * 32)
    b = RoundConfig.create("r", ids(20)[::-1], length=2, quantization=q, k=6,
                           graph_seed=b"x" * 32)
    assert a == b and dict(a.neighbours) == dict(b.neighbours)
