"""Tests of broker_config: names, settings, topology and device permissions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from broker_config import names, topology
from broker_config.settings import Settings
from broker_config.setup import device_permissions
from schemas.errors import FedplanError


def test_a_device_queue_name_reads_well_and_maps_back_to_its_device() -> None:
    q = names.device_queue("alice")
    assert q == "fedplan.device.alice"
    assert names.device_from_queue(q) == "alice"
    assert names.device_from_queue(names.results_queue("p1")) is None


def test_an_id_that_would_break_a_queue_name_is_refused_with_the_allowed_characters() -> None:
    with pytest.raises(FedplanError, match="letters, digits"):
        names.device_queue("a#b")
    with pytest.raises(FedplanError):
        names.results_queue("")


def test_settings_come_from_fedplan_variables_and_overrides_win() -> None:
    s = Settings.from_env(
        {
            "FEDPLAN_MAX_MESSAGE_SIZE": "65536",
            "FEDPLAN_TIME_LIMIT": "20",
            "FEDPLAN_SOFT_TIME_LIMIT": "10",
        },
        broker_url="amqp://u:p@127.0.0.1:5672/v",
    )
    assert s.max_message_size == 65536
    assert s.time_limit == 20.0
    assert s.broker_url == "amqp://u:p@127.0.0.1:5672/v"


def test_settings_refuse_a_hard_limit_below_the_soft_limit_naming_the_variable() -> None:
    with pytest.raises(FedplanError, match="FEDPLAN_TIME_LIMIT"):
        Settings(soft_time_limit=10, time_limit=5)


def test_settings_refuse_a_non_amqp_broker_url() -> None:
    with pytest.raises(FedplanError, match="amqp://"):
        Settings.from_env({"FEDPLAN_BROKER_URL": "http://x"})


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(AttributeError):
        s.heartbeat = 3  # type: ignore[misc]


def test_device_queues_dead_letter_and_push_back_when_full() -> None:
    args = topology.device_queue_arguments(Settings(queue_max_length=7))
    assert args["x-dead-letter-exchange"] == names.dead_letter_exchange()
    assert args["x-max-length"] == 7
    assert args["x-overflow"] == "reject-publish"
    assert "x-delivery-limit" not in args
    quorum = topology.device_queue_arguments(Settings(queue_type="quorum", delivery_limit=3))
    assert quorum["x-delivery-limit"] == 3


def test_a_device_user_reads_only_its_queue_and_writes_only_the_results_exchange() -> None:
    perms = device_permissions("alice")
    assert re.fullmatch(perms["read"], "fedplan.device.alice")
    assert not re.fullmatch(perms["read"], "fedplan.device.bob")
    assert re.fullmatch(perms["write"], names.results_exchange())
    assert not re.fullmatch(perms["write"], "")  # no default exchange
    assert not re.fullmatch(perms["write"], "fedplan.commands")
    exchanges = ("fedplan.device.alice", names.results_exchange(), "fedplan.commands")
    for name in (*exchanges, "fedplan.dead"):
        assert not re.fullmatch(perms["configure"], name)


def test_definitions_json_matches_the_names_module() -> None:
    path = Path(names.__file__).with_name("definitions.json")
    d = json.loads(path.read_text())
    assert {e["name"] for e in d["exchanges"]} == {e.name for e in topology.exchanges()}
    assert {q["name"] for q in d["queues"]} == {names.dead_letter_queue()}


def test_boolean_settings_read_the_usual_spellings_and_refuse_others() -> None:
    assert Settings.from_env({"FEDPLAN_WORKER_DECLARES": "false"}).worker_declares is False
    assert Settings.from_env({"FEDPLAN_WORKER_DECLARES": "1"}).worker_declares is True
    with pytest.raises(FedplanError, match="true or false"):
        Settings.from_env({"FEDPLAN_WORKER_DECLARES": "maybe"})


def test_several_broker_urls_separated_by_semicolons_are_tried_in_their_order() -> None:
    s = Settings.from_env(
        {"FEDPLAN_BROKER_URL": "amqp://u:p@h:5681/;amqp://u:p@h:5682/; amqp://u:p@h:5683/"}
    )
    assert s.broker_urls == ("amqp://u:p@h:5681/", "amqp://u:p@h:5682/", "amqp://u:p@h:5683/")
    assert Settings().broker_urls == (Settings().broker_url,)


def test_a_failover_list_with_one_url_that_is_not_amqp_is_refused_naming_the_variable() -> None:
    with pytest.raises(FedplanError, match="FEDPLAN_BROKER_URL"):
        Settings(broker_url="amqp://h:5681/;http://h:5682/")
    with pytest.raises(FedplanError, match="separated by ';'"):
        Settings(broker_url="amqp://h:5681/;")


def test_on_quorum_queues_the_results_and_dead_letter_queues_are_replicated_too() -> None:
    quorum = Settings(queue_type="quorum")
    assert topology.results_queue("p1", quorum).arguments["x-queue-type"] == "quorum"
    week_ms = 7 * 24 * 3600 * 1000
    bounds = {"x-max-length": 10_000, "x-message-ttl": week_ms, "x-overflow": "drop-head"}
    assert topology.dead_letter_queue(quorum).arguments == {**bounds, "x-queue-type": "quorum"}
    classic = Settings()
    assert "x-queue-type" not in topology.results_queue("p1", classic).arguments
    assert topology.dead_letter_queue(classic).arguments == bounds


def test_the_management_client_takes_credentials_and_vhost_from_the_first_failover_url() -> None:
    from broker_config.management import ManagementClient

    c = ManagementClient.from_urls("amqp://u:pw@h:5681/v1;amqp://x:y@h:5682/v2", None)
    assert (c.user, c.password, c.vhost, c.api_url) == ("u", "pw", "v1", "http://h:15672/api/")
