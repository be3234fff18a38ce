"""A secure-aggregation round end to end, in process: devices' steps and the server's round."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np
import pytest
import torch

from consumer.secagg import (
    ClientState,
    MaskedInput,
    MaskInputRequest,
    QuantizationParams,
    RoundConfig,
    SecAggIntegrityError,
    SecAggProtocolError,
    SecAggThresholdError,
    ShareKeysRequest,
    UnmaskRequest,
    advertise_keys,
    mask_input,
    share_keys,
    unmask,
)
from consumer.secagg import shamir as shamir_module
from consumer.secagg.quantize import unpack_vector
from producer.fl.secure_aggregation import SecureAggregate, SecureAggregationRound

Inputs = dict[str, tuple[torch.Tensor, int]]


def make_inputs(n: int, dim: int, seed: int, max_weight: int = 50) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return {
        f"dev{i:03d}": (torch.rand(dim, generator=g) * 2 - 1,
                        int(torch.randint(1, max_weight + 1, (), generator=g)))
        for i in range(n)
    }


def plain_weighted_sum(inputs: Inputs, who: Collection[str]) -> tuple[np.ndarray, int]:
    """Eager torch, float64: sum of w_i * x_i over ``who``."""
    total = sum((inputs[d][0].double() * inputs[d][1] for d in who), torch.zeros(1).double())
    return total.numpy(), sum(inputs[d][1] for d in who)


def config_for(inputs: Inputs, dim: int, **kw: object) -> RoundConfig:
    q = QuantizationParams(clip=1.0, scale_bits=16, max_weight=50, num_clients=len(inputs))
    return RoundConfig.create("round-1", list(inputs), length=dim, quantization=q, **kw)  # type: ignore[arg-type]


@dataclasses.dataclass
class Run:
    server: SecureAggregationRound
    states: dict[str, ClientState]
    unmask_requests: dict[str, UnmaskRequest] = dataclasses.field(default_factory=dict)


def run_round(
    cfg: RoundConfig,
    inputs: Inputs,
    *,
    skip_share: Collection[str] = (),
    skip_mask: Collection[str] = (),
    skip_unmask: Collection[str] = (),
    run: Run | None = None,
) -> tuple[SecureAggregate, Run]:
    run = run or Run(SecureAggregationRound(cfg), {})
    adverts = []
    for d in cfg.devices:
        run.states[d], advert = advertise_keys(cfg, d)
        adverts.append(advert)
    shares = []
    for d, req in run.server.collect_adverts(adverts).items():
        if d not in skip_share:
            run.states[d], msg = share_keys(run.states[d], req)
            shares.append(msg)
    masked = []
    for d, req in run.server.collect_shares(shares).items():
        if d not in skip_mask:
            x, w = inputs[d]
            run.states[d], msg = mask_input(run.states[d], req, x, weight=w)
            masked.append(msg)
    run.unmask_requests = run.server.collect_masked_inputs(masked)
    responses = []
    for d, req in run.unmask_requests.items():
        if d not in skip_unmask:
            run.states[d], resp = unmask(run.states[d], req)
            responses.append(resp)
    return run.server.collect_unmask_responses(responses), run


def assert_matches_plain(result: SecureAggregate, inputs: Inputs, who: Collection[str]) -> None:
    expected, weight = plain_weighted_sum(inputs, who)
    assert result.total_weight == weight
    assert set(result.survivors) == set(who)
    err = np.abs(result.weighted_sum - expected).max()
    assert err <= result.error_bound, (err, result.error_bound)
    assert result.error_bound == len(who) / 2**16


# -- the sum ------------------------------------------------------------------------------


def test_the_secure_sum_of_8_devices_is_the_plain_weighted_sum_within_the_bound() -> None:
    inputs = make_inputs(8, 50, seed=1)
    result, _ = run_round(config_for(inputs, 50), inputs)
    assert_matches_plain(result, inputs, inputs)
    mean = result.mean()
    expected, weight = plain_weighted_sum(inputs, inputs)
    assert np.abs(mean - expected / weight).max() <= result.error_bound / weight


def test_the_secure_sum_of_100_devices_on_a_20_regular_graph_is_the_plain_sum() -> None:
    inputs = make_inputs(100, 30, seed=2)
    cfg = config_for(inputs, 30, k=20)
    assert {len(p) for p in cfg.neighbours.values()} == {20}
    result, _ = run_round(cfg, inputs)
    assert_matches_plain(result, inputs, inputs)


def test_a_masked_input_alone_looks_nothing_like_the_input() -> None:
    inputs = make_inputs(4, 2000, seed=3)
    cfg = config_for(inputs, 2000)
    _, run = run_round(cfg, inputs)
    d = cfg.devices[0]
    masked = run.states[d].masked
    assert isinstance(masked, MaskedInput)
    vector = unpack_vector(masked.vector, 2001, cfg.quantization.modulus_bits)
    modulus = 2**cfg.quantization.modulus_bits
    # uniform over the modulus, unlike the quantized input (concentrated near 0 or 2^b)
    assert abs(float(vector.mean()) / modulus - 0.5) < 0.05


# -- dropouts ------------------------------------------------------------------------------


def test_a_third_of_9_devices_dropping_after_masking_still_commits_the_right_sum() -> None:
    inputs = make_inputs(9, 20, seed=4)
    cfg = config_for(inputs, 20)  # complete graph: 8 neighbours, threshold 5
    assert cfg.threshold == 5
    gone = set(cfg.devices[::3])  # 3 of 9
    result, _ = run_round(cfg, inputs, skip_unmask=gone)
    assert_matches_plain(result, inputs, inputs)  # their masked inputs are in the sum


def test_a_third_dropping_after_sharing_removes_their_masks_and_inputs() -> None:
    inputs = make_inputs(9, 20, seed=5)
    cfg = config_for(inputs, 20)
    gone = set(cfg.devices[1::3])
    result, _ = run_round(cfg, inputs, skip_mask=gone)
    assert_matches_plain(result, inputs, set(inputs) - gone)
    assert set(result.dropped) == gone


def test_a_third_of_100_devices_dropping_after_masking_commits_on_a_60_regular_graph() -> None:
    inputs = make_inputs(100, 10, seed=6)
    cfg = config_for(inputs, 10, k=60)
    gone = set(np.random.default_rng(6).choice(list(cfg.devices), 33, replace=False).tolist())
    result, _ = run_round(cfg, inputs, skip_unmask=gone)
    assert_matches_plain(result, inputs, inputs)


def test_more_than_a_third_dropping_after_masking_fails_before_any_secret_is_rebuilt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rebuilt: list[int] = []
    real_combine = shamir_module.combine
    monkeypatch.setattr(shamir_module, "combine",
                        lambda shares, **kw: rebuilt.append(1) or real_combine(shares, **kw))
    inputs = make_inputs(9, 20, seed=7)
    cfg = config_for(inputs, 20)
    with pytest.raises(SecAggThresholdError, match="nothing is unmasked"):
        run_round(cfg, inputs, skip_unmask=set(cfg.devices[:4]))
    assert rebuilt == []


def test_more_than_a_third_dropping_before_masking_fails_before_anyone_reveals_a_share() -> None:
    inputs = make_inputs(9, 20, seed=8)
    cfg = config_for(inputs, 20)
    assert cfg.min_survivors == 6
    run = Run(SecureAggregationRound(cfg), {})
    with pytest.raises(SecAggThresholdError, match="only 5 devices sent a masked input"):
        run_round(cfg, inputs, skip_mask=set(cfg.devices[:4]), run=run)
    assert run.unmask_requests == {}
    assert all(not s.revealed_seed_of and not s.revealed_key_of for s in run.states.values())
    with pytest.raises(SecAggProtocolError, match="failed already"):
        run.server.collect_unmask_responses([])
    assert run.server.stage == "failed"


# -- refusals -----------------------------------------------------------------------------


def test_a_device_never_reveals_both_shares_of_one_peer() -> None:
    inputs = make_inputs(5, 4, seed=9)
    cfg = config_for(inputs, 4)
    _, run = run_round(cfg, inputs)
    me, peer = cfg.devices[0], cfg.devices[1]
    state = run.states[me]
    assert peer in state.revealed_seed_of  # it survived: its seed share went out
    # a lying server now claims the peer dropped, to get its mask key share too
    lie = UnmaskRequest(cfg.round_id, tuple(d for d in cfg.devices if d != peer))
    with pytest.raises(SecAggProtocolError, match="refusing to reveal both shares"):
        unmask(state, lie)
    # the honest request again gives the same answer (a redelivery is harmless)
    again, response = unmask(state, run.unmask_requests[me])
    assert set(response.seed_shares) == set(state.held_shares) and not response.key_shares
    assert again.revealed_key_of == frozenset()


def test_a_device_refuses_to_unmask_too_few_survivors() -> None:
    inputs = make_inputs(6, 4, seed=10)
    cfg = config_for(inputs, 4)
    run = Run(SecureAggregationRound(cfg), {})
    run_round(cfg, inputs, run=run)
    me = cfg.devices[0]
    state = dataclasses.replace(run.states[me], stage="masked", revealed_seed_of=frozenset())
    with pytest.raises(SecAggThresholdError, match="at least 4 are needed"):
        unmask(state, UnmaskRequest(cfg.round_id, (me, cfg.devices[1])))


def test_steps_out_of_order_or_of_another_round_are_refused() -> None:
    inputs = make_inputs(3, 2, seed=11)
    cfg = config_for(inputs, 2, threshold=2)
    state, _ = advertise_keys(cfg, cfg.devices[0])
    with pytest.raises(SecAggProtocolError, match="unmask in stage 'advertised'"):
        unmask(state, UnmaskRequest(cfg.round_id, cfg.devices))
    with pytest.raises(SecAggProtocolError):
        advertise_keys(cfg, "stranger")
    server = SecureAggregationRound(cfg)
    with pytest.raises(SecAggProtocolError, match="expects 'adverts'"):
        server.collect_shares([])


def test_a_share_ciphertext_altered_by_the_server_is_detected_by_the_device() -> None:
    inputs = make_inputs(4, 3, seed=12)
    cfg = config_for(inputs, 3)
    server = SecureAggregationRound(cfg)
    states, adverts = {}, []
    for d in cfg.devices:
        states[d], a = advertise_keys(cfg, d)
        adverts.append(a)
    shares = []
    for d, req in server.collect_adverts(adverts).items():
        states[d], msg = share_keys(states[d], req)
        shares.append(msg)
    requests = server.collect_shares(shares)
    a, b, c = cfg.devices[:3]
    swapped = dict(requests[a].ciphertexts)
    swapped[b] = requests[c].ciphertexts[b]  # b's ciphertext for c, redirected to a
    tampered = dataclasses.replace(requests[a], ciphertexts=swapped)
    with pytest.raises(SecAggIntegrityError, match="authentication"):
        mask_input(states[a], tampered, inputs[a][0], weight=inputs[a][1])


def test_bad_messages_are_rejected_with_a_reason_and_count_as_dropouts() -> None:
    inputs = make_inputs(9, 5, seed=13)
    cfg = config_for(inputs, 5)
    server = SecureAggregationRound(cfg)
    states, adverts = {}, []
    for d in cfg.devices:
        states[d], a = advertise_keys(cfg, d)
        adverts.append(a)
    adverts.append(dataclasses.replace(adverts[0], device_id="stranger"))
    requests = server.collect_adverts(adverts)
    shares = []
    for d, req in requests.items():
        states[d], msg = share_keys(states[d], req)
        shares.append(msg)
    shares.append(shares[0])  # an identical redelivery is fine
    requests = server.collect_shares(shares)
    masked = []
    for d, req in requests.items():
        x, w = inputs[d]
        states[d], msg = mask_input(states[d], req, x, weight=w)
        masked.append(msg)
    short = cfg.devices[2]
    masked = [dataclasses.replace(m, vector=m.vector[:-8]) if m.device_id == short else m
              for m in masked]
    requests = server.collect_masked_inputs(masked)
    assert short in server.rejected and isinstance(server.rejected[short], SecAggProtocolError)
    assert server.rejected[short].device_id == short
    responses = [unmask(states[d], r)[1] for d, r in requests.items()]
    result = server.collect_unmask_responses(responses)
    assert_matches_plain(result, inputs, set(inputs) - {short})


def test_a_device_that_masks_twice_sends_the_same_vector() -> None:
    inputs = make_inputs(3, 4, seed=14)
    cfg = config_for(inputs, 4, threshold=2)
    _, run = run_round(cfg, inputs)
    d = cfg.devices[1]
    first = run.states[d].masked
    state = dataclasses.replace(run.states[d], stage="masked")
    request = MaskInputRequest(cfg.round_id, dict.fromkeys(state.held_shares, b""))
    assert mask_input(state, request, torch.ones(4), weight=1)[1] == first
    other = MaskInputRequest(cfg.round_id, {})
    with pytest.raises(SecAggProtocolError, match="different mask request"):
        mask_input(state, other, torch.ones(4), weight=1)


# -- distributed noise ---------------------------------------------------------------------


def test_distributed_discrete_gaussian_noise_reaches_the_sum_with_the_planned_variance() -> None:
    from producer.fl.privacy import secure_noise_plan

    inputs = make_inputs(9, 3000, seed=15, max_weight=1)
    plan = secure_noise_plan(noise_multiplier=1.0, clip_norm=1.0, dimension=3000,
                             num_clients=9, min_survivors=6, scale_bits=8)
    cfg = RoundConfig.create("noisy", list(inputs), length=3000,
                             quantization=plan.quantization, noise_sigma=plan.device_sigma)
    gone = set(cfg.devices[:3])  # a third drop after sharing: 6 noise shares remain
    result, _ = run_round(cfg, inputs, skip_mask=gone)
    expected, weight = plain_weighted_sum(inputs, set(inputs) - gone)
    assert result.total_weight == weight  # the weight coordinate carries no noise
    noise = (result.weighted_sum - expected) * 2**8  # back to quantized units
    planned = 1.0 * plan.sensitivity  # z * sensitivity, reached by 6 devices
    assert float(noise.std()) == pytest.approx(planned, rel=0.05)
    assert abs(float(noise.mean())) < 6 * planned / np.sqrt(noise.size)


# -- hostile input -------------------------------------------------------------------------


def test_a_tampered_seed_share_fails_the_round_with_an_integrity_error_and_no_sum() -> None:
    inputs = make_inputs(5, 4, seed=16)
    cfg = config_for(inputs, 4, threshold=4)  # 4 neighbours each: exactly t shares each
    server = SecureAggregationRound(cfg)
    states, adverts = {}, []
    for d in cfg.devices:
        states[d], a = advertise_keys(cfg, d)
        adverts.append(a)
    shares = []
    for d, req in server.collect_adverts(adverts).items():
        states[d], msg = share_keys(states[d], req)
        shares.append(msg)
    masked = []
    for d, req in server.collect_shares(shares).items():
        states[d], msg = mask_input(states[d], req, inputs[d][0], weight=inputs[d][1])
        masked.append(msg)
    requests = server.collect_masked_inputs(masked)
    victim, liar = cfg.devices[0], cfg.devices[1]
    responses = []
    for d in cfg.devices:
        states[d], response = unmask(states[d], requests[d])
        if d == liar:
            t, x, y = shamir_module.decode(response.seed_shares[victim])
            forged = dict(response.seed_shares)
            forged[victim] = shamir_module._encode(t, x, (y + 1) % shamir_module.PRIME)
            response = dataclasses.replace(response, seed_shares=forged)
        responses.append(response)
    with pytest.raises(SecAggIntegrityError, match="does not match its commitment") as info:
        server.collect_unmask_responses(responses)
    assert info.value.device_id == victim
    assert server.stage == "failed"


def test_a_device_refuses_malformed_adverts_and_values_with_typed_errors() -> None:
    inputs = make_inputs(3, 2, seed=17)
    cfg = config_for(inputs, 2, threshold=2)
    states, adverts = {}, {}
    for d in cfg.devices:
        states[d], adverts[d] = advertise_keys(cfg, d)
    a, b, c = cfg.devices
    short_key = dataclasses.replace(adverts[b], cipher_public=b"\x01" * 5)
    with pytest.raises(SecAggIntegrityError, match="key agreement failed"):
        share_keys(states[a], ShareKeysRequest(cfg.round_id, (short_key, adverts[c])))
    copied = dataclasses.replace(adverts[c], mask_public=adverts[b].mask_public)
    with pytest.raises(SecAggIntegrityError, match="reuse a public key"):
        share_keys(states[a], ShareKeysRequest(cfg.round_id, (adverts[b], copied)))
    with pytest.raises(SecAggThresholdError, match="1 neighbours advertised, 2 needed"):
        share_keys(states[a], ShareKeysRequest(cfg.round_id, (adverts[b],)))
    with pytest.raises(SecAggProtocolError, match="not of distinct neighbours"):
        share_keys(states[a], ShareKeysRequest(cfg.round_id, (adverts[a], adverts[b])))
    state, _ = share_keys(states[a], ShareKeysRequest(cfg.round_id, (adverts[b], adverts[c])))
    sent = {}
    for d in (b, c):
        peers = tuple(adverts[p] for p in cfg.devices if p != d)
        sent[d] = share_keys(states[d], ShareKeysRequest(cfg.round_id, peers))[1].ciphertexts[a]
    request = MaskInputRequest(cfg.round_id, sent)
    with pytest.raises(SecAggProtocolError, match="not numbers"):
        mask_input(state, request, ["x", "y"], weight=1)
    with pytest.raises(SecAggProtocolError, match="3 values, the round aggregates 2"):
        mask_input(state, request, torch.zeros(3), weight=1)


def test_the_server_rejects_wrong_sized_keys_and_reused_keys_in_adverts() -> None:
    inputs = make_inputs(9, 2, seed=18)
    cfg = config_for(inputs, 2)
    server = SecureAggregationRound(cfg)
    adverts = [advertise_keys(cfg, d)[1] for d in cfg.devices]
    adverts[0] = dataclasses.replace(adverts[0], mask_public=b"\x00" * 10_000)
    adverts[1] = dataclasses.replace(adverts[1], cipher_public=adverts[2].cipher_public)
    requests = server.collect_adverts(adverts)
    # both holders of the copied key are out: the copier cannot push the owner out first
    assert set(server.rejected) == set(cfg.devices[:3])
    assert all(isinstance(e, SecAggIntegrityError) for e in server.rejected.values())
    assert set(requests) == set(cfg.devices[3:])


def test_the_secure_mean_of_model_weights_is_fedavgs_weighted_average() -> None:
    from producer.fl.aggregate import weighted_average
    from producer.fl.training import flatten, get_weights, unflatten

    torch.manual_seed(19)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3))
              for _ in range(6)]
    results = [(get_weights(m), n) for m, n in zip(models, (10, 25, 3, 40, 17, 5), strict=True)]
    inputs = {f"dev{i}": (flatten(w), n) for i, (w, n) in enumerate(results)}
    dim = inputs["dev0"][0].numel()
    result, _ = run_round(config_for(inputs, dim), inputs)
    secure = unflatten(torch.from_numpy(result.mean()).float(), results[0][0])
    plain = weighted_average(results)
    bound = result.error_bound / result.total_weight
    for name in plain:
        assert torch.allclose(secure[name].double(), plain[name].double(), rtol=0,
                              atol=bound + 1e-6), name  # + float32 rounding of the outputs


def test_a_device_refuses_to_mask_with_fewer_than_threshold_pairwise_masks() -> None:
    inputs = make_inputs(5, 3, seed=20)
    cfg = config_for(inputs, 3)  # threshold 3
    states, adverts = {}, {}
    for d in cfg.devices:
        states[d], adverts[d] = advertise_keys(cfg, d)
    a = cfg.devices[0]
    others = tuple(adverts[d] for d in cfg.devices[1:])
    state, _ = share_keys(states[a], ShareKeysRequest(cfg.round_id, others))
    peers = {}
    for d in cfg.devices[1:3]:  # only two neighbours' ciphertexts reach it
        mine = tuple(adverts[p] for p in cfg.devices if p != d)
        states[d], msg = share_keys(states[d], ShareKeysRequest(cfg.round_id, mine))
        peers[d] = msg.ciphertexts[a]
    with pytest.raises(SecAggThresholdError, match="2 neighbours shared, 3 needed to mask"):
        mask_input(state, MaskInputRequest(cfg.round_id, peers), inputs[a][0], weight=1)


def test_wrongly_typed_fields_are_rejected_not_raised() -> None:
    inputs = make_inputs(9, 2, seed=21)
    cfg = config_for(inputs, 2)
    server = SecureAggregationRound(cfg)
    adverts = [advertise_keys(cfg, d)[1] for d in cfg.devices]
    adverts[0] = dataclasses.replace(adverts[0], cipher_public=None)  # type: ignore[arg-type]
    adverts.append(dataclasses.replace(adverts[1], device_id=["not", "hashable"]))  # type: ignore[arg-type]
    requests = server.collect_adverts(adverts)
    assert set(server.rejected) == {cfg.devices[0]}
    assert isinstance(server.rejected[cfg.devices[0]], SecAggProtocolError)
    assert set(requests) == set(cfg.devices[1:])
