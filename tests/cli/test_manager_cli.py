"""`kvmha manager list`: the managers sharing the database and the lease over the hosts, from any manager."""

from __future__ import annotations

from kvmha.proto.v1 import admin_pb2 as pb
from tests.cli.fake_admin import FakeAdmin
from tests.cli.support import as_json, kvmha, ok


def test_manager_list_names_the_lease_holder_and_the_standby(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "manager", "list"))
    assert fake.sent("ListManagers") == [pb.ListManagersRequest()]
    holder = next(line for line in out.splitlines() if "mgr-a" in line and "10.0.0.251" in line)
    standby = next(line for line in out.splitlines() if "mgr-b" in line)
    assert "holder" in holder and " 3 " in holder
    assert "standby" in standby and "*" in standby  # the one that answered
    assert "epoch 4" in out and "expires in 5.2 s" in out


def test_manager_list_as_json_keeps_the_lease(fake: FakeAdmin, manager: str) -> None:
    data = as_json(kvmha(manager, "manager", "list", "--json"))
    assert data["lease_holder"] == "mgr-a" and data["lease_epoch"] in (4, "4")
    assert [m["id"] for m in data["managers"]] == ["mgr-a", "mgr-b"]
