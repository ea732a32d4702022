"""The wire side of issue 11 in the manager: Hello/Ping watchdog fields and lease reports become the core's facts,
and CheckLease goes out as the agent's command. Malformed values never arm anything."""

from __future__ import annotations

import math

import pytest

from kvmha.manager.adapters import translate
from kvmha.manager.core import actions
from kvmha.manager.core.model import RequestId, VmUuid, WatchdogReport
from kvmha.proto.v1 import agent_pb2 as pb


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (pb.WatchdogStatus(armed=True, timeout_s=20.0), WatchdogReport(True, 20.0)),
        (
            pb.WatchdogStatus(armed=False, detail="daemon unreachable"),
            WatchdogReport(False, detail="daemon unreachable"),
        ),
        (pb.WatchdogStatus(armed=False), WatchdogReport(False, detail="not armed")),
    ],
)
def test_watchdog_status_becomes_the_self_fence_fact(status: pb.WatchdogStatus, expected: WatchdogReport) -> None:
    assert translate.watchdog(status) == expected


@pytest.mark.parametrize("timeout_s", [0.0, -5.0, math.inf, math.nan, 86400.0])
def test_an_armed_watchdog_with_an_unusable_bound_counts_as_not_armed(timeout_s: float) -> None:
    report = translate.watchdog(pb.WatchdogStatus(armed=True, timeout_s=timeout_s))
    assert not report.armed and "unusable timeout" in report.detail


def test_a_ping_without_watchdog_field_is_not_armed_and_a_ping_with_it_is() -> None:
    assert not translate.heartbeat(1, pb.Ping(sequence=1)).watchdog.armed  # type: ignore[arg-type]
    armed = translate.heartbeat(1, pb.Ping(sequence=2, watchdog=pb.WatchdogStatus(armed=True, timeout_s=8.0)))  # type: ignore[arg-type]
    assert armed.watchdog == WatchdogReport(True, 8.0)


def test_hello_carries_watchdog_and_lock_manager() -> None:
    hello = pb.Hello(
        host_uuid="6f1c1a2b-0000-4000-8000-000000000001",
        hostname="h1",
        watchdog=pb.WatchdogStatus(armed=True, timeout_s=20.0),
        disk_leases=pb.DiskLeaseConfig(lock_manager="lockd", auto_disk_leases=True),
    )
    agent = translate.hello(hello)
    assert agent.watchdog == WatchdogReport(True, 20.0) and agent.lease_manager == "lockd"
    broken = pb.DiskLeaseConfig(lock_manager="lockd", auto_disk_leases=True, error="cannot read qemu-lockd.conf")
    assert translate.hello(pb.Hello(host_uuid=hello.host_uuid, hostname="h1", disk_leases=broken)).lease_manager == ""
    assert not translate.hello(pb.Hello(host_uuid=hello.host_uuid, hostname="h1")).watchdog.armed


def test_lease_report_and_check_lease_command() -> None:
    report = pb.LeaseReport(
        vm_uuid="v1",
        state=pb.LEASE_HELD,
        detail="lockspace /var/lib/libvirt/lockd",
        disks=[pb.DiskLease(disk_path="/d.img", state=pb.LEASE_HELD, holder_pid=4242)],
    )
    fact = translate.lease(report)
    assert fact.state == "held" and "4242" in fact.detail and fact.vm_uuid == "v1"
    assert translate.lease(pb.LeaseReport(vm_uuid="v1")).state == "unknown"  # unset: never "free"
    assert translate.lease(pb.LeaseReport(vm_uuid="v1", state=pb.LEASE_FREE)).state == "free"
    result = translate.command_result(pb.CommandResult(request_id="r1", ok=True, lease=report))
    assert result.payload == fact
    message = translate.command_message(RequestId("r2"), actions.CheckLease(VmUuid("v1"), "<domain/>", 5.0), 6.0)
    assert message.command.check_lease == pb.CheckLease(vm_uuid="v1", domain_xml="<domain/>", timeout_s=5.0)
