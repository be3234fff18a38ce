"""``fedplan status`` with 1,000 devices (a fake management API): summary, filters, sorting."""

from __future__ import annotations

import random
from typing import Any

import pytest

from broker_config.management import ManagementClient
from producer.cli import status
from producer.cli.main import main
from producer.cli.status import StatusFilter, device_statuses, format_table, summary_line

N = 1000


def _queues(seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(N):
        out.append(
            {
                "name": f"fedplan.device.client-{i}",
                "messages_ready": rng.choice([0, 0, 0, rng.randint(1, 500)]),
                "messages_unacknowledged": rng.choice([0, 1]),
                "consumers": rng.choice([1, 1, 1, 0]),
            }
        )
    out.append({"name": "fedplan.results.p1", "messages_ready": 9, "consumers": 1})
    out.append({"name": "fedplan.dead", "messages_ready": 2, "consumers": 0})
    return out


class FleetApi(ManagementClient):
    """A broker with 1,000 device queues (and two others), nothing dead-lettered."""

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return [] if path.endswith("/get") else _queues()


def _api() -> FleetApi:
    return FleetApi(api_url="http://127.0.0.1:15672/api/", user="u", password="p")


def test_the_summary_line_counts_every_device_online_and_the_backlog() -> None:
    raw = [q for q in _queues() if q["name"].startswith("fedplan.device.")]
    rows = device_statuses(_api())
    assert len(rows) == N
    online = sum(1 for q in raw if q["consumers"])
    backlog = sum(q["messages_ready"] + q["messages_unacknowledged"] for q in raw)
    waiting = sum(1 for q in raw if q["messages_ready"] + q["messages_unacknowledged"])
    assert 0 < online < N and backlog > 0
    assert summary_line(rows) == (
        f"{N} devices: {online} online, {N - online} offline; "
        f"backlog {backlog} commands on {waiting} devices; 0 dead-lettered"
    )


def test_sorting_by_backlog_with_a_limit_shows_the_most_backlogged_devices_first() -> None:
    raw = [q for q in _queues() if q["name"].startswith("fedplan.device.")]
    depth = {
        q["name"].removeprefix("fedplan.device."): q["messages_ready"]
        + q["messages_unacknowledged"]
        for q in raw
    }
    top = StatusFilter(sort="backlog", limit=10).apply(device_statuses(_api()))
    assert [r.backlog for r in top] == sorted(depth.values(), reverse=True)[:10]
    assert all(depth[r.device_id] == r.backlog for r in top)
    table = format_table(top).splitlines()
    assert len(table) == 11 and table[1].split()[0] == top[0].device_id


def test_filters_keep_offline_backlogged_and_globbed_devices_only() -> None:
    raw = {q["name"].removeprefix("fedplan.device."): q for q in _queues()}
    rows = device_statuses(_api())
    offline = StatusFilter(state="offline").apply(rows)
    assert {r.device_id for r in offline} == {
        d for d, q in raw.items() if d.startswith("client-") and q["consumers"] == 0
    }
    waiting = StatusFilter(state="online", backlogged=True).apply(rows)
    assert waiting and all(r.online and r.backlog > 0 for r in waiting)
    globbed = StatusFilter(patterns=("client-1??",)).apply(rows)
    assert [r.device_id for r in globbed] == sorted(f"client-{i}" for i in range(100, 200))
    with pytest.raises(Exception, match="sort"):
        StatusFilter(sort="size")


def test_the_status_command_prints_the_summary_then_at_most_the_limit_of_rows(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(status.ManagementClient, "from_settings", lambda *a, **k: _api())
    assert main(["status", "--sort", "backlog", "--limit", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{N} devices: ")
    assert lines[1].split()[0] == "DEVICE" and len(lines) == 1 + 1 + 5 + 1
    assert lines[-1] == f"... {N - 5} more devices match (--limit 0 shows all)"
    assert main(["status", "--device", "nobody-*"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "no device matches the filters"
