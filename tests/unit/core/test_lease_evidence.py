"""Disk-lease evidence (issue 11, item 4): before a silent host is declared dead on anything but its power being off,
a healthy neighbour probes every VM's disk lease; a held lease keeps the host from Down, its VMs are not started,
and an event says so. A BMC that reads off never waits for a probe."""

from __future__ import annotations

from collections.abc import Callable

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.model import HostId, HostStatus, VmUuid, WatchdogReport
from tests.unit.core.harness import Harness, of_type, starts, vm

CONFIG = CoreConfig(startup_grace_s=1.0)
Lease = Callable[[a.CheckLease], str]


def _run(h: Harness, until_s: float, lease: Lease, first: list[a.Action] | None = None) -> list[a.Action]:
    """h1 silent since 0 (heartbeat stale since then, unreachable); neighbours answer lease probes with `lease`."""
    out: list[a.Action] = []
    new = first or []
    step_at = h.now
    while True:
        queue = list(new)
        while queue:  # answers may ask more (the lease phase follows the neighbours' answers)
            command = queue.pop(0)
            more: list[a.Action] = []
            if isinstance(command, a.SendCommand) and isinstance(command.command, a.CheckNeighbor):
                more = h.answer(command, payload=f.NeighborCheck(HostId(1), False, False, h.now))
            elif isinstance(command, a.SendCommand) and isinstance(command.command, a.CheckLease):
                state = lease(command.command)
                assert state in ("held", "free", "unknown")
                answer = f.LeaseCheck(command.command.vm_uuid, state, "held by pid 4242")  # type: ignore[arg-type]
                more = h.answer(command, payload=answer)
            new += more
            queue += more
        out += new
        if step_at >= until_s:
            return out
        step_at += 1.0
        new = h.tick_until(step_at, pinging=(2, 3))


def _probes(actions: list[a.Action]) -> list[a.SendCommand]:
    return [c for c in of_type(actions, a.SendCommand) if isinstance(c.command, a.CheckLease)]


def _events(actions: list[a.Action], kind: str) -> list[a.RecordEvent]:
    return [e for e in of_type(actions, a.RecordEvent) if e.kind == kind]


def test_a_held_lease_keeps_a_self_fenced_host_from_down_until_it_is_free() -> None:
    h = Harness(vms=[vm(1, on=1), vm(2, on=1)], config=CONFIG, bmc=False)  # armed watchdog, lockd
    h.connect_all()
    held = {VmUuid("v1")}
    out = _run(h, 100.0, lambda probe: "held" if probe.vm_uuid in held else "free")
    probes = _probes(out)
    assert {p.command.vm_uuid for p in probes if isinstance(p.command, a.CheckLease)} == {"v1", "v2"}
    assert {p.host_id for p in probes} <= {HostId(2), HostId(3)}  # healthy neighbours, never the silent host
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT and starts(out) == []
    [told, *_] = _events(out, "vm.lease.held")
    assert told.subject == "vm:1" and "vm1" in told.message and "held by pid 4242" in told.message
    assert "seen from h" in told.message
    held.clear()  # the QEMU that held it is gone
    out = _run(h, 140.0, lambda probe: "free")
    assert h.core.host_status(HostId(1)) is HostStatus.DOWN
    assert len(starts(out)) == 2


def test_a_bmc_that_reads_off_needs_no_lease_probe() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=True)
    h.connect_all()
    out = h.tick_until(8.0, pinging=(2, 3))
    for query in of_type(out, a.QueryBmc):
        out += h.handle(f.BmcPowerReported(query.request_id, query.host_id, "off"))
    assert h.core.host_status(HostId(1)) is HostStatus.DOWN
    assert _probes(out) == [] and len(starts(out)) == 1


def test_a_host_without_leases_is_not_probed_and_the_verdict_says_so() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False, lease_manager="")
    h.connect_all()
    out = _run(h, 100.0, lambda probe: "held")
    assert _probes(out) == [] and h.core.host_status(HostId(1)) is HostStatus.DOWN
    down = [e.message for e in of_type(out, a.RecordEvent) if "-> Down" in e.message]
    assert "runs without disk leases" in down[0]


def test_an_unanswered_probe_counts_as_unknown_not_as_held() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False)
    h.connect_all()
    out: list[a.Action] = []
    for step_at in range(8, 110):
        new = h.tick_until(float(step_at), pinging=(2, 3))
        for command in of_type(new, a.SendCommand):
            if isinstance(command.command, a.CheckNeighbor):  # leases: never answered
                new += h.answer(command, payload=f.NeighborCheck(HostId(1), False, False, h.now))
        out += new
    assert _probes(out) and h.core.host_status(HostId(1)) is HostStatus.DOWN


def test_a_held_lease_refuses_an_operators_confirm_down() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False, watchdog=WatchdogReport(armed=False, detail="off"))
    h.connect_all()
    _run(h, 30.0, lambda probe: "held")
    out = _run(h, 45.0, lambda probe: "held", first=h.handle(f.HostConfirmedDown(HostId(1), "dave")))
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT and starts(out) == []
    refused = _events(out, "host.confirm.refused")
    assert refused and "dave" in refused[0].message and "lease" in refused[0].message
