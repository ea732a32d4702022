"""Core flows driven fact by fact: VM HA, start failures, split-brain guards, fencing guards, restarts."""

from __future__ import annotations

import pytest

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.flap import FlapLog
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostId,
    HostStatus,
    PowerState,
    ResourceState,
    StopCause,
    VmId,
    VmState,
    VmUuid,
    WorkId,
    WorkStep,
    WorkType,
)
from tests.unit.core.harness import FAST, Harness, host, messages, of_type, starts, vm


def crashed(h: Harness, vm_id: int = 1, host: int = 1, at: float | None = None) -> list[a.Action]:
    return h.report(host, vm_id, PowerState.POWER_OFF, StopCause.CRASHED, at=at)


def test_crash_report_restarts_once_and_done_needs_a_power_report() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    first = crashed(h)
    duplicate = crashed(h)
    assert len(starts(first)) == 1 and starts(duplicate) == [] and len(h.core.works) == 1
    assert any("restart already scheduled" in m or "ignored" in m for m in messages(duplicate))
    start = starts(first)[0]
    h.answer(start, payload=f.VmStartConfirmed(VmUuid("v1"), False))
    assert h.core.works[WorkId(1)].step is WorkStep.RESTARTING  # the command said ok; Done needs the target's report
    h.report(start.host_id, 1, PowerState.POWER_ON)
    assert h.core.works[WorkId(1)].step is WorkStep.DONE
    record = h.core.vm(VmId(1))
    assert record is not None and record.state is VmState.RUNNING and record.host_id == start.host_id


def test_failed_starts_retry_then_end_in_error_never_done() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CoreConfig(startup_grace_s=1.0, max_retries=2, restart_retry_interval_s=5))
    h.connect_all()
    actions = crashed(h, at=1.0)
    h.answer(starts(actions)[0], ok=False, error="libvirt: boom", at=2.0)
    assert h.core.works[WorkId(1)].step is WorkStep.SCHEDULED
    retry = h.tick_until(7.0, pinging=(1, 2, 3))
    assert len(starts(retry)) == 1
    final = h.answer(starts(retry)[0], ok=False, error="libvirt: boom", at=8.0)
    assert h.core.works[WorkId(1)].step is WorkStep.ERROR
    record = h.core.vm(VmId(1))
    assert record is not None and record.state is VmState.ERROR
    assert any(e.severity == "alert" and "gave up after 2 attempts" in e.message for e in of_type(final, a.RecordEvent))


def test_start_timeout_keeps_the_vm_on_its_target_until_that_host_reports() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    start = starts(crashed(h, at=1.0))[0]
    later = h.tick_until(1.0 + h.core.config.start_timeout_s + 30.0, pinging=(1, 2, 3))  # timeout, then past retry
    record = h.core.vm(VmId(1))
    assert record is not None and record.host_id == start.host_id and record.power_state is PowerState.POWER_UNKNOWN
    assert starts(later) == []  # a late start might still land: no second copy elsewhere
    # The target's full report does not list it: after the missing grace it is known off and tried again.
    h.handle(f.PowerStateReported(start.host_id, True, True, ()), at=h.now)
    again = h.tick_until(h.now + 20.0, pinging=(1, 2, 3))
    assert len(starts(again)) == 1


def test_vm_found_running_elsewhere_is_followed_not_restarted() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    h.handle(f.AgentDisconnected(HostId(1), planned=False), at=1.0)
    h.tick_until(8.5, pinging=(2, 3))  # h1 behind: investigating, a work item waits for the verdict
    assert h.core.host_status(HostId(1)) is HostStatus.INVESTIGATING
    out = h.report(2, 1, PowerState.POWER_ON, at=9.0)  # someone migrated it out of band
    record = h.core.vm(VmId(1))
    assert record is not None and record.host_id == HostId(2)
    assert h.core.works[WorkId(1)].step is WorkStep.CANCELLED
    assert starts(out) == [] and starts(h.tick_until(60.0, pinging=(2, 3))) == []


def test_hypervisor_loss_makes_power_unknown_not_off() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    out = h.handle(f.PowerStateReported(HostId(1), True, False, ()), at=1.0)
    record = h.core.vm(VmId(1))
    assert record is not None and record.power_state is PowerState.POWER_UNKNOWN and record.state is VmState.RUNNING
    assert starts(out + h.tick_until(30.0, pinging=(1, 2, 3))) == [] and not h.core.works


def test_unregistered_domains_become_unmanaged_and_are_never_restarted() -> None:
    h = Harness()
    h.connect_all()
    h.handle(f.PowerStateReported(HostId(2), False, True, (f.DomainReport(VmUuid("x"), "stray", PowerState.POWER_ON),)))
    stray = [v for v in h.core.vms if v.uuid == "x"]
    assert len(stray) == 1 and stray[0].state is VmState.UNMANAGED
    out = h.handle(f.PowerStateReported(HostId(2), True, True, ()), at=1.0) + h.tick_until(60.0, pinging=(1, 2, 3))
    assert starts(out) == [] and not h.core.works


def test_guest_shutdown_is_respected_unless_configured() -> None:
    for restart, expected_starts in ((False, 0), (True, 1)):
        h = Harness(vms=[vm(1, on=1)], config=CoreConfig(startup_grace_s=1.0, guest_shutdown_restart=restart))
        h.connect_all()
        out = h.report(1, 1, PowerState.POWER_OFF, StopCause.GUEST_SHUTDOWN)
        assert len(starts(out)) == expected_starts


def _silent_host(h: Harness, at: float) -> list[a.Action]:
    """h1 stops pinging; answer its investigation with 'unreachable, heartbeat stale, BMC on'."""
    out = h.tick_until(at, pinging=(2, 3))
    for command in of_type(out, a.SendCommand):
        if isinstance(command.command, a.CheckNeighbor):
            out += h.answer(command, payload=f.NeighborCheck(HostId(1), False, False, 8.0))
    for query in of_type(out, a.QueryBmc):
        out += h.handle(f.BmcPowerReported(query.request_id, query.host_id, "on"))
    return out


def test_no_fencing_during_startup_grace_then_fence() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CoreConfig(startup_grace_s=30.0))
    h.connect_all()
    out = _silent_host(h, 8.0)
    assert of_type(out, a.Fence) == [] and h.core.host_status(HostId(1)) is HostStatus.ALERT
    assert any("startup.grace" in m for m in messages(out))
    for step_at in (18.0, 28.0, 38.0):
        out = _silent_host(h, step_at)
    assert len(of_type(out, a.Fence)) == 1 and h.core.host_status(HostId(1)) is HostStatus.FENCING


def test_no_fencing_when_most_hosts_are_silent() -> None:
    h = Harness(hosts=3, vms=[vm(1, on=1)])
    h.connect(1, [1])
    h.connect(2)
    h.connect(3)
    out = h.tick_until(9.0)  # nobody pings: all three behind, their neighbours are silent too
    out += h.tick_until(20.0)
    assert of_type(out, a.Fence) == []
    assert any("3 of 3 hosts are silent" in m for m in messages(out))


def test_fence_success_releases_vms_and_a_reconnect_during_fencing_is_refused() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    fence = of_type(_silent_host(h, 8.0), a.Fence)[0]
    refused = h.connect(1, [1], at=9.0)
    assert of_type(refused, a.DisconnectAgent) and h.core.host_status(HostId(1)) is HostStatus.FENCING
    assert starts(h.tick_until(9.5, pinging=(2, 3))) == []  # no restart on hope
    out = h.handle(f.FenceCompleted(fence.request_id, HostId(1), True, already_off=True), at=10.0)
    assert h.core.host_status(HostId(1)) is HostStatus.FENCED and len(starts(out)) == 1
    assert any("already off" in m for m in messages(out))


def test_failed_fence_keeps_vms_put_and_retries_with_backoff() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    fence = of_type(_silent_host(h, 8.0), a.Fence)[0]
    out = h.handle(f.FenceCompleted(fence.request_id, HostId(1), False, False, "BMC error"), at=9.0)
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT and starts(out) == []
    out = _silent_host(h, 9.0 + h.core.config.fence_retry_interval_s)
    assert len(of_type(out, a.Fence)) == 1


def test_maintenance_host_is_disconnected_without_investigation() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    out = h.handle(f.HostMaintenanceChanged(HostId(2), True))  # nothing runs on h2: Maintenance at once
    assert any("PrepareForMaintenance -> Maintenance" in m for m in messages(out))
    out = h.tick_until(9.0, pinging=(1, 3))
    assert h.core.host_status(HostId(2)) is HostStatus.DISCONNECTED
    assert not [
        c
        for c in of_type(out, a.SendCommand)
        if c.host_id != 2 and isinstance(c.command, a.CheckNeighbor) and c.command.target_host_id == 2
    ]
    assert of_type(out, a.DisconnectAgent) and not h.core.works


def test_a_vm_found_off_on_a_maintenance_host_is_stopped_not_restarted() -> None:
    """Found by the lab e2e test: a host in maintenance came back from a power loss, reported its HA VM off, and
    the VM was restarted elsewhere although HA had been skipped for that host while it was away."""
    records = [host(n) for n in (1, 2, 3)]
    records[1].resource_state = ResourceState.MAINTENANCE  # as a database of an older version may hold it
    h = Harness(vms=[vm(1, on=2)])
    h.core = Core(FAST, now=0.0, hosts=records, vms=h.vm_records)
    h.connect_all()
    out = crashed(h, host=2)
    record = h.core.vm(VmId(1))
    assert starts(out) == [] and not h.core.works
    assert record is not None and record.state is VmState.STOPPED
    assert any("Maintenance" in m and "no HA" in m for m in messages(out))
    h.handle(f.HostMaintenanceChanged(HostId(2), False))
    h.handle(f.VmStartRequested(VmId(1)))  # the operator can still start it
    assert h.core.works


def test_restart_limit_per_window_ends_in_error() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CoreConfig(startup_grace_s=1.0, restart_max_per_window=2))
    h.connect_all()
    for attempt in range(2):
        start = starts(crashed(h, host=h.core.vm(VmId(1)).host_id or 1, at=10.0 * attempt + 1))[0]  # type: ignore[union-attr]
        h.report(start.host_id, 1, PowerState.POWER_ON, at=10.0 * attempt + 2)
    record = h.core.vm(VmId(1))
    assert record is not None and record.host_id is not None
    out = crashed(h, host=record.host_id, at=30.0)
    assert starts(out) == [] and record.state is VmState.ERROR
    assert any("not restarted again" in m for m in messages(out))


def test_ids_continue_after_a_restart_and_carry_the_prefix() -> None:
    old = HaWorkRecord(WorkId(41), VmId(9), WorkType.HA, WorkStep.DONE, None, VmState.RUNNING, 0)
    h = Harness(vms=[vm(1, on=1)], works=[old], prefix="m7-")
    h.connect_all()
    out = crashed(h)
    assert WorkId(42) in h.core.works
    assert all(c.request_id.startswith("m7-") for c in of_type(out, a.SendCommand))


def test_after_a_manager_restart_agents_get_the_whole_startup_grace_to_rejoin() -> None:
    """Found by bench/manager_load.py: after a restart, thousands of reconnecting agents (backing off) were given
    only one ping timeout, and hundreds of healthy hosts were investigated."""
    config = CoreConfig(startup_grace_s=20.0, ping_timeout_s=7.0)
    h = Harness(hosts=3, vms=[vm(1, on=3)], config=config)
    out = h.tick_until(12.0)
    assert not [m for m in messages(out) if "Investigating" in m]  # past one ping timeout, nobody is behind
    h.connect(1, at=12.0)
    out = h.tick_until(18.0, pinging=(1,))
    h.connect(2, at=18.0)
    out += h.tick_until(21.0, pinging=(1, 2))
    assert h.core.host_status(HostId(3)) is HostStatus.INVESTIGATING  # never came back: behind at the grace's end
    assert h.core.host_status(HostId(1)) is HostStatus.UP and h.core.host_status(HostId(2)) is HostStatus.UP
    behind = [e.subject for e in of_type(out, a.RecordEvent) if "-> Investigating" in e.message]
    assert behind == ["host:3"]


def test_next_deadline_is_the_next_ping_timeout_and_nothing_polls() -> None:
    h = Harness(hosts=1)
    assert h.core.next_deadline() == h.core.config.ping_timeout_s  # restored hosts get one timeout to reconnect
    h.connect(1, at=1.0)
    h.handle(f.HeartbeatReceived(HostId(1), 1, True, True), at=2.0)
    assert h.core.next_deadline() == 2.0 + h.core.config.ping_timeout_s
    assert h.core.tick(3.0) == []


def test_config_changes_are_validated() -> None:
    h = Harness()
    bad = h.handle(f.ConfigChanged("ping.timeout", "never"))
    assert h.core.config.ping_timeout_s == FAST.ping_timeout_s
    assert any(e.severity == "warning" and "ping.timeout" in e.message for e in of_type(bad, a.RecordEvent))
    h.handle(f.ConfigChanged("ha.workers", "9"))
    assert h.core.config.ha_workers == 9


def test_every_host_status_change_is_audited() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    out = _silent_host(h, 8.0)
    saved = [s.host.status for s in of_type(out, a.SaveHost) if s.host.id == 1]
    audited = [m for m in messages(out) if m.startswith("host:1") and "->" in m]
    assert len(set(saved)) >= 2 and len(audited) == len(set(saved))


def _restarting_work() -> HaWorkRecord:
    return HaWorkRecord(WorkId(5), VmId(1), WorkType.HA, WorkStep.RESTARTING, HostId(1), VmState.RUNNING, 3, tried=1)


def test_restart_interrupted_by_a_manager_restart_is_confirmed_by_the_target() -> None:
    record = vm(1, on=2, state=VmState.STARTING)
    record.update_count = 3
    h = Harness(vms=[record], works=[_restarting_work()])
    out = h.tick_until(1.0)
    assert starts(out) == []  # the StartVm answer died with the old manager: never start blindly
    h.connect(1)
    h.connect(2, [1], at=1.5)  # the target lists it: the earlier start landed
    assert h.core.works[WorkId(5)].step is WorkStep.DONE


def test_restart_interrupted_by_a_manager_restart_retries_when_the_target_lacks_it() -> None:
    record = vm(1, on=2, state=VmState.STARTING)
    record.update_count = 3
    h = Harness(vms=[record], works=[_restarting_work()])
    h.connect(1, at=0.5)
    h.connect(2, at=0.5)
    h.connect(3, at=0.5)
    config = h.core.config
    out = h.tick_until(0.5 + config.power_report_missing_grace_s + 1.0, pinging=(1, 2, 3))
    assert starts(out) == [] and any("target reports it off" in m for m in messages(out))
    out = h.tick_until(h.now + config.restart_retry_interval_s, pinging=(1, 2, 3))
    assert len(starts(out)) == 1
    assert h.core.works[WorkId(5)].tried == 2


@pytest.mark.parametrize("self_fence", [True, False])
def test_a_silent_host_without_bmc_is_dead_only_if_agents_self_fence(self_fence: bool) -> None:
    config = CoreConfig(startup_grace_s=1.0, isolation_self_fence=self_fence)
    h = Harness(vms=[vm(1, on=1)], config=config, bmc=False)
    h.connect_all()
    out: list[a.Action] = []
    for step_at in range(8, 120, 2):
        new = h.tick_until(float(step_at), pinging=(2, 3))
        for command in of_type(new, a.SendCommand):
            if isinstance(command.command, a.CheckNeighbor):  # a long-stale heartbeat, nobody reaches it
                new += h.answer(command, payload=f.NeighborCheck(HostId(1), False, False, 3600.0))
        out += new
    assert of_type(out, a.Fence) == []
    if self_fence:
        assert h.core.host_status(HostId(1)) is HostStatus.DOWN and len(starts(out)) == 1
    else:
        assert h.core.host_status(HostId(1)) is HostStatus.ALERT and starts(out) == []
        assert any("isolation.self.fence=false" in m and "confirm-down h1" in m for m in messages(out))


@pytest.mark.parametrize(
    ("ok", "error", "expected"),
    [(True, "", "vm1 destroyed on h1"), (False, "libvirt: busy", "destroy of deleted vm1 on h1 failed")],
)
def test_the_answer_to_a_deleted_vms_destroy_is_recorded(ok: bool, error: str, expected: str) -> None:
    """A DestroyVm used to be answered into the void: its owner matched no branch, no event was left."""
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    out = h.handle(f.VmDeleted(VmId(1)), at=1.0)
    [destroy] = [c for c in of_type(out, a.SendCommand) if isinstance(c.command, a.DestroyVm)]
    assert destroy.host_id == 1 and h.core.vm(VmId(1)) is None
    answered = h.answer(destroy, ok=ok, error=error, at=2.0)
    assert [m for m in messages(answered) if m.startswith("vm:1")] == [m for m in messages(answered) if expected in m]
    assert any(expected in m for m in messages(answered))


def test_a_destroy_that_is_never_answered_times_out_with_an_event() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    h.handle(f.VmDeleted(VmId(1)), at=1.0)
    out = h.tick_until(1.0 + h.core.config.start_timeout_s + 1.0, pinging=(1, 2, 3))
    assert any("destroy of deleted vm1 on h1 failed: timed out" in m for m in messages(out))


def test_questions_that_left_late_get_their_whole_timeout() -> None:
    """Found by running the driver in the simulator with the database down: an investigation's questions left only
    when its record was written, 15 s after the decision, and the deadlines counted from the decision had already
    passed — the host was fenced on "no proof either way" without a single answer awaited."""
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    out = h.tick_until(8.0, pinging=(2, 3))  # h1 behind: neighbours and its BMC asked at 8.0 (decided)
    asked = [c.request_id for c in of_type(out, a.SendCommand)] + [q.request_id for q in of_type(out, a.QueryBmc)]
    assert asked and h.core.host_status(HostId(1)) is HostStatus.INVESTIGATING
    assert h.handle(f.CommandsDispatched(tuple(asked)), at=23.0) == []  # the store was down until 23.0
    late = h.tick_until(25.0, pinging=(2, 3))
    assert h.core.host_status(HostId(1)) is HostStatus.INVESTIGATING and of_type(late, a.Fence) == []
    query = of_type(out, a.QueryBmc)[0]
    h.handle(f.BmcPowerReported(query.request_id, HostId(1), "off"), at=25.5)
    assert h.core.host_status(HostId(1)) is HostStatus.DOWN  # decided on evidence, not on a deadline


def test_flap_log_forgives_the_failures_of_a_mass_incident() -> None:
    log = FlapLog()
    assert [log.note(HostId(1), t, 600.0) for t in (10.0, 100.0)] == [1, 2]
    assert log.note(HostId(2), 195.0, 600.0) == 1
    assert log.note(HostId(1), 200.0, 600.0) == 3  # flapping at 3
    assert log.forgive_since(193.0, 3) == [HostId(1)]  # both went silent with the incident; only h1 was flapping
    assert log.failures == {HostId(1): [10.0, 100.0], HostId(2): []}
    assert log.note(HostId(1), 650.0, 600.0) == 2  # 10.0 fell out of the window


def test_a_host_with_a_broken_stream_is_never_a_target_and_an_undelivered_start_is_placed_again_at_once() -> None:
    h = Harness(hosts=4, vms=[vm(1, on=1)], config=CoreConfig(startup_grace_s=1.0, placement_candidates=1))
    h.connect_all(4)
    h.handle(f.AgentDisconnected(HostId(2), planned=False), at=1.0)  # h2's stream broke: not a candidate
    first = starts(crashed(h, at=1.0))
    assert len(first) == 1 and first[0].host_id not in (HostId(1), HostId(2))
    # The transport could not deliver it (the target's stream broke in between): another host, now, not counted.
    again = h.answer(first[0], ok=False, error=f"{f.NOT_DELIVERED}: no open agent stream", at=1.1)
    assert len(starts(again)) == 1 and starts(again)[0].host_id not in (HostId(2), first[0].host_id)
    assert any("attempt void" in m for m in messages(again))
    assert h.core.works[WorkId(1)].tried == 1


def test_a_start_of_unknown_outcome_is_placed_again_the_moment_its_target_is_proven_dead() -> None:
    h = Harness(hosts=4, vms=[vm(1, on=1)])
    h.connect_all(4)
    start = starts(crashed(h, at=1.0))[0]
    target = start.host_id
    # The target goes silent before answering; its BMC says off: Down, long before start.timeout (30 s).
    out = h.tick_until(1.0 + h.core.config.ping_timeout_s + 0.5, pinging=[n for n in (1, 2, 3, 4) if n != target])
    query = [q for q in of_type(out, a.QueryBmc) if q.host_id == target]
    assert query, messages(out)
    redo = h.handle(f.BmcPowerReported(query[0].request_id, target, "off"))
    assert h.core.host_status(target) is HostStatus.DOWN
    assert len(starts(redo)) == 1 and starts(redo)[0].host_id != target
    assert h.now < 1.0 + h.core.config.start_timeout_s and h.core.works[WorkId(1)].tried == 1
    # The old attempt's answer arrives late: it settles nothing of the new attempt.
    h.answer(start, ok=False, error="timed out")
    assert h.core.works[WorkId(1)].step is WorkStep.RESTARTING
