"""Tests of ``fedplan status`` against a fake management API."""

from __future__ import annotations

from typing import Any

from broker_config.management import ManagementClient
from producer.cli.status import device_statuses, format_table


class FakeApi(ManagementClient):
    """Answers the two calls ``fedplan status`` makes with canned management API JSON."""

    def request(self, method: str, path: str, body: Any = None) -> Any:
        if path.endswith("/get"):
            dead = {"properties": {"headers": {"x-death": [{"queue": "fedplan.device.bob"}]}}}
            return [dead, dead, {"properties": {}}]
        return [
            {
                "name": "fedplan.device.bob",
                "messages_ready": 3,
                "messages_unacknowledged": 1,
                "consumers": 1,
                "message_stats": {
                    "publish_details": {"rate": 2.5},
                    "deliver_get_details": {"rate": 2.0},
                },
            },
            {"name": "fedplan.results.p1", "messages_ready": 9, "consumers": 1},
            {"name": "fedplan.device.alice", "messages_ready": 7, "consumers": 0},
        ]


def test_status_has_one_row_per_device_queue_with_depth_consumers_and_dead_letters() -> None:
    rows = device_statuses(FakeApi(api_url="http://127.0.0.1:15672/api/", user="u", password="p"))
    assert [r.device_id for r in rows] == ["alice", "bob"]
    alice, bob = rows
    assert (alice.ready, alice.online, alice.dead_lettered) == (7, False, 0)
    assert (bob.ready, bob.unacked, bob.online, bob.dead_lettered) == (3, 1, True, 2)
    assert bob.publish_rate == 2.5 and bob.deliver_rate == 2.0
    table = format_table(rows).splitlines()
    assert table[0].split()[:3] == ["DEVICE", "STATE", "READY"]
    assert table[1].split()[:3] == ["alice", "offline", "7"]
    assert table[2].split()[:2] == ["bob", "online"]


def test_status_shows_each_devices_policy_refusals_from_its_audit_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from consumer.policy.audit import AuditEntry, AuditLog
    from producer.cli.status import DeviceStatus, with_refusals

    log = AuditLog(tmp_path / "alice")
    log.record(AuditEntry(sender="p1", kind="get_object", outcome="POLICY_REFUSED"))
    log.record(AuditEntry(sender="p1", kind="store_object"))
    rows = with_refusals(
        [DeviceStatus("alice", 0, 0, 1, 0.0, 0.0, 0), DeviceStatus("bob", 0, 0, 1, 0.0, 0.0, 0)],
        str(tmp_path),
    )
    assert [r.refused for r in rows] == [1, None]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[-1] == "REFUSED"
    assert lines[1].split()[-1] == "1" and lines[2].split()[-1] == "-"
