"""The formats people read: ages, local times, colours."""

from __future__ import annotations

from datetime import datetime

import pytest

from kvmha.manager import cli_render as render
from kvmha.proto.v1 import admin_pb2 as pb


@pytest.mark.parametrize(
    ("delta_s", "text"),
    [
        (0, "0 s ago"),
        (12.7, "12 s ago"),
        (119, "119 s ago"),
        (120, "2 min ago"),
        (7199, "119 min ago"),
        (7200, "2 h ago"),
        (3 * 86400, "3 d ago"),
        (-27, "in 27 s"),
        (-600, "in 10 min"),
    ],
)
def test_age(delta_s: float, text: str) -> None:
    assert render.age(1_000_000 - delta_s, now=1_000_000) == text


def test_when_is_local_time_and_age() -> None:
    now = datetime(2026, 11, 25, 8, 30, 0).timestamp()
    assert render.when(now - 12, now).plain == "08:29:48 (12 s ago)"
    assert render.when(now - 2 * 86400, now).plain == "2026-11-23 08:30:00 (2 d ago)"
    assert render.when(0, now).plain == "never"


@pytest.mark.parametrize(
    ("status", "style"),
    [("Up", "green"), ("Alert", "yellow"), ("Fencing", "yellow"), ("Down", "red"), ("Fenced", "red"),
     ("Error", "red"), ("Running", "green"), ("alert", "red"), ("SomethingNew", "")],
)  # fmt: skip
def test_status_colours(status: str, style: str) -> None:
    assert render.styled(status).style == style


def test_values_from_the_manager_are_not_rich_markup(capsys: pytest.CaptureFixture[str]) -> None:
    message = "fence failed: [Errno 111] refused [/] [red]x :smile:"
    render.print_events([pb.EventInfo(id=1, at=1.0, severity="info", subject="vm:1", kind="X", message=message)])
    render.print_host(pb.HostInfo(name="[bold]h1", address="[/]"))
    out = capsys.readouterr().out
    assert message in out and "Host [bold]h1" in out and "[/]" in out


def test_json_keys_are_proto_field_names_with_every_field() -> None:
    assert render.to_dict(pb.VmInfo(id=3)) == {
        "id": 3, "uuid": "", "name": "", "state": "", "power_state": "", "power_state_updated_at": 0.0, "host": "",
        "last_host": "", "ha_enabled": False, "restart_priority": 0, "anti_affinity_group": "", "memory_mib": 0,
        "vcpus": 0, "update_count": 0, "reason": "",
    }  # fmt: skip


def test_json_keys_come_in_the_protos_order_whatever_is_set() -> None:
    hosts = pb.ListHostsResponse(hosts=[pb.HostInfo(agent_version="1", id=2), pb.HostInfo(connected=True)])
    data = render.to_dict(hosts)
    order = [f.name for f in pb.HostInfo.DESCRIPTOR.fields]
    assert [list(h) for h in data["hosts"]] == [order, order]
    assert (data["hosts"][0]["id"], data["hosts"][0]["agent_version"], data["hosts"][1]["connected"]) == (2, "1", True)
