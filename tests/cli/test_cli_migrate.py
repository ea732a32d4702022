"""`kvmha vm migrate` and the host life-cycle commands against the fake AdminService."""

from __future__ import annotations

from kvmha.proto.v1 import admin_pb2 as pb
from tests.cli.fake_admin import FakeAdmin
from tests.cli.support import as_json, kvmha, ok


def test_vm_migrate_follows_the_migration_with_a_progress_bar(fake: FakeAdmin, manager: str) -> None:
    fake.add_event("vm.migrated", "an old migration of web1", subject="vm:7")  # before the request: not this one
    out = ok(kvmha(manager, "vm", "migrate", "web1", "--to", "h2"))
    assert fake.sent("MigrateVm") == [pb.MigrateVmRequest(vm="web1", to_host="h2")]
    assert "migrating web1" in out and "100%" in out
    assert "VM web1: migrated from h1 to h2 in 3.2 s" in out and "old migration" not in out


def test_vm_migrate_that_fails_exits_refused_with_the_reason(fake: FakeAdmin, manager: str) -> None:
    fake.migration_fails = True
    result = kvmha(manager, "vm", "migrate", "web1")
    assert result.exit_code == 4 and result.stderr == "kvmha: vm migrate: stays on h1: migration failed: boom\n"
    assert "migrating web1" in result.stdout  # the progress bar, up to the failure
    assert fake.sent("MigrateVm") == [pb.MigrateVmRequest(vm="web1", to_host="")]


def test_vm_migrate_no_wait_and_json(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "vm", "migrate", "web1", "--no-wait"))
    assert "Migration requested. VM web1 (id 7)" in out
    assert as_json(kvmha(manager, "vm", "migrate", "web1", "--json"))["name"] == "web1"
    assert not fake.sent("FollowEvents")


def test_host_disable_enable_and_remove(fake: FakeAdmin, manager: str) -> None:
    assert "Disabled" in ok(kvmha(manager, "host", "disable", "h2"))
    assert "Enabled" in ok(kvmha(manager, "host", "enable", "h2"))
    assert fake.sent("SetHostEnabled") == [
        pb.SetHostEnabledRequest(host="h2", enabled=False),
        pb.SetHostEnabledRequest(host="h2", enabled=True),
    ]
    result = kvmha(manager, "host", "remove", "h1")
    assert result.exit_code == 4 and result.stderr.startswith("kvmha: host h1 still runs ")
    assert fake.sent("RemoveHost") == [pb.Ref(ref="h1")]


def test_vm_migrate_cancel(fake: FakeAdmin, manager: str) -> None:
    assert "Cancel requested. VM web1" in ok(kvmha(manager, "vm", "migrate", "web1", "--cancel"))
    assert fake.sent("CancelMigration") == [pb.Ref(ref="web1")]
