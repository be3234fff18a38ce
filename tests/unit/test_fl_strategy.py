"""Tests of producer.fl.strategy: FedAvg, FedProx and FedAdam as pure policies."""

from __future__ import annotations

import pytest
import torch

from producer.cli.main import build_parser
from producer.fl.demo import strategy_from_args
from producer.fl.strategy import (
    STRATEGIES,
    FedAdam,
    FedAvg,
    FedProx,
    FitFailure,
    FitResult,
    make_strategy,
    register_strategy,
)
from schemas.errors import FedplanError


def _result(device: str, value: float, n: int) -> FitResult:
    return FitResult(device, {"w": torch.full((2,), value), "b": torch.tensor([value])}, n)


def test_fedavg_commits_the_example_weighted_mean_of_the_results() -> None:
    new = FedAvg().aggregate_fit(
        1,
        {"w": torch.zeros(2), "b": torch.zeros(1)},
        [_result("a", 1.0, 1), _result("b", 4.0, 2)],
        [],
    )
    assert new is not None
    torch.testing.assert_close(new["w"], torch.full((2,), 3.0))


def test_fedavg_commits_despite_failures_when_it_accepts_them() -> None:
    new = FedAvg().aggregate_fit(
        1,
        {"w": torch.zeros(2), "b": torch.zeros(1)},
        [_result("a", 2.0, 5)],
        [FitFailure("b", "timeout")],
    )
    assert new is not None
    torch.testing.assert_close(new["b"], torch.tensor([2.0]))


def test_fedavg_refuses_a_round_with_failures_when_told_not_to_accept_them() -> None:
    s = FedAvg(accept_failures=False)
    assert s.aggregate_fit(1, {}, [_result("a", 2.0, 5)], [FitFailure("b", "error")]) is None


def test_a_round_without_results_is_not_committed() -> None:
    assert FedAvg().aggregate_fit(1, {}, [], [FitFailure("a", "timeout")]) is None


def test_fedprox_sends_its_proximal_mu_and_averages_like_fedavg() -> None:
    s = FedProx(proximal_mu=0.3)
    assert s.configure_fit(2, {}).config["proximal_mu"] == 0.3
    assert FedAvg().configure_fit(2, {}).config["proximal_mu"] == 0.0
    new = s.aggregate_fit(1, {}, [_result("a", 1.0, 3), _result("b", 5.0, 1)], [])
    assert new is not None
    torch.testing.assert_close(new["w"], torch.full((2,), 2.0))


def test_fedadam_moves_towards_the_average_by_the_adam_rule() -> None:
    s = FedAdam(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-9)
    w = {"w": torch.zeros(2), "b": torch.zeros(1)}
    new = s.aggregate_fit(1, w, [_result("a", 2.0, 1)], [])
    assert new is not None
    # first bias-corrected Adam step moves each coordinate by lr * sign(d)
    torch.testing.assert_close(new["w"], torch.full((2,), 0.1))
    new2 = s.aggregate_fit(2, new, [_result("a", -2.0, 1)], [])
    assert new2 is not None
    d1, d2 = 2.0, -2.1
    m = 0.9 * 0.1 * d1 + 0.1 * d2
    v = 0.99 * 0.01 * d1**2 + 0.01 * d2**2
    lr_t = 0.1 * (1 - 0.99**2) ** 0.5 / (1 - 0.9**2)
    torch.testing.assert_close(new2["w"], torch.full((2,), 0.1 + lr_t * m / v**0.5))


def test_fedadam_state_survives_a_state_dict_round_trip() -> None:
    s = FedAdam(lr=0.1)
    w = {"w": torch.zeros(2), "b": torch.zeros(1)}
    new = s.aggregate_fit(1, w, [_result("a", 1.0, 1)], [])
    assert new is not None
    t = FedAdam(lr=0.1)
    t.load_state_dict(s.state_dict())
    a = s.aggregate_fit(2, new, [_result("a", 3.0, 1)], [])
    b = t.aggregate_fit(2, new, [_result("a", 3.0, 1)], [])
    assert a is not None and b is not None
    assert torch.equal(a["w"], b["w"]) and t.step == s.step == 2


def test_every_strategy_is_registered_by_its_name_and_built_from_shared_options() -> None:
    assert sorted(STRATEGIES) == ["fedadam", "fedavg", "fedbuff", "fedprox"]
    options = {"proximal_mu": 0.3, "server_lr": 0.05}
    built = {name: make_strategy(name, **options) for name in STRATEGIES}
    assert all(type(s) is STRATEGIES[name] and s.name == name for name, s in built.items())
    assert built["fedprox"].proximal_mu == 0.3 and built["fedavg"].proximal_mu == 0.0
    assert isinstance(built["fedadam"], FedAdam) and built["fedadam"].lr == 0.05


def test_an_unknown_strategy_name_is_refused_with_the_registered_names() -> None:
    with pytest.raises(FedplanError, match=r"no strategy named 'fedsgd'.*'fedavg'"):
        make_strategy("fedsgd")


def test_a_registered_strategy_becomes_a_choice_of_the_demo_cli() -> None:
    def strategy_choices() -> list[str]:
        demo = build_parser()._subparsers._group_actions[0].choices["demo"]  # type: ignore[union-attr]
        (action,) = [a for a in demo._actions if a.dest == "strategy"]
        return list(action.choices)

    assert strategy_choices() == sorted(STRATEGIES)

    @register_strategy
    class Trimmed(FedAvg):
        name = "trimmed-test"

    try:
        assert "trimmed-test" in strategy_choices()
        args = build_parser().parse_args(["demo", "--strategy", "trimmed-test"])
        assert isinstance(strategy_from_args(args), Trimmed)
    finally:
        del STRATEGIES["trimmed-test"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--strategy", "trimmed-test"])


def test_registering_another_class_under_a_taken_name_is_refused() -> None:
    class Impostor(FedAvg):
        name = "fedavg"

    with pytest.raises(ValueError, match="already registered"):
        register_strategy(Impostor)
    assert STRATEGIES["fedavg"] is FedAvg
