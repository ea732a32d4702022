"""Live migration in the core (core/migration.py): kvmha's own and libvirt's seen from outside, and the deaths of
either side mid-migration. Each test drives the core with the facts the agents would send and checks the promise:
the VM is recorded where it runs, a paused copy is never a second run, and nothing is started while a side may
still hold the VM."""

from __future__ import annotations

import dataclasses

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.model import (
    HostCapacity,
    HostId,
    PowerState,
    StopCause,
    VmId,
    VmState,
    VmUuid,
    WorkStep,
    WorkType,
)
from tests.unit.core.harness import ARMED, Harness, messages, of_type, starts, vm


def _paused(h: Harness, n: int, vm_id: int, at: float | None = None) -> list[a.Action]:
    """Host n reports the VM paused for a migration (its incoming copy, or the source at switchover)."""
    domain = f.DomainReport(VmUuid(f"v{vm_id}"), f"vm{vm_id}", PowerState.POWER_ON, StopCause.NONE, migrating=True)
    return h.handle(f.PowerStateReported(HostId(n), False, True, (domain,)), at)


def _migrate(h: Harness, vm_id: int, to: int | None) -> a.SendCommand:
    out = h.handle(f.VmMigrateRequested(VmId(vm_id), HostId(to) if to else None))
    commands = [c for c in of_type(out, a.SendCommand) if isinstance(c.command, a.MigrateVm)]
    assert len(commands) == 1, messages(out)
    return commands[0]


def _state(h: Harness, vm_id: int) -> tuple[VmState, int | None]:
    record = h.core.vm(VmId(vm_id))
    assert record is not None
    return record.state, record.host_id


def _power_lost(h: Harness, n: int, at: float) -> list[a.Action]:
    """Host n's link breaks and its BMC says off: Down at once (core/linkloss.py)."""
    out = h.handle(f.AgentDisconnected(HostId(n), planned=False), at)
    query = next(q for q in of_type(out, a.QueryBmc) if q.host_id == n)
    return out + h.handle(f.BmcPowerReported(query.request_id, HostId(n), "off"), at)


def test_a_migration_moves_the_record_when_the_target_runs_it() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    command = _migrate(h, 1, 2)
    assert command.host_id == 1 and isinstance(command.command, a.MigrateVm) and command.command.target_host_id == 2
    assert _state(h, 1) == (VmState.MIGRATING, 1)
    out = _paused(h, 2, 1, at=1.0)  # the incoming copy: not a second run
    assert not [m for m in messages(out) if "two copies" in m] and _state(h, 1) == (VmState.MIGRATING, 1)
    out = h.report(2, 1, PowerState.POWER_ON, at=3.0)
    assert _state(h, 1) == (VmState.RUNNING, 2)
    out += h.report(1, 1, PowerState.POWER_OFF, StopCause.MIGRATED, at=3.1)
    out += h.answer(command, at=3.2)
    assert starts(out) == [] and _state(h, 1) == (VmState.RUNNING, 2)
    work = next(w for w in h.core.works.values() if w.type is WorkType.MIGRATION)
    assert work.step is WorkStep.DONE


def test_a_failed_migration_leaves_the_vm_on_its_source() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    command = _migrate(h, 1, None)
    target = command.command.target_host_id if isinstance(command.command, a.MigrateVm) else None
    _paused(h, target or 2, 1, at=1.0)
    out = h.answer(command, ok=False, error="ERROR_LIBVIRT: unable to connect", at=2.0)
    assert _state(h, 1) == (VmState.RUNNING, 1) and starts(out) == []
    assert any("stays on h1" in m for m in messages(out))


def test_an_unanswered_migration_is_settled_by_the_reports() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    command = _migrate(h, 1, 2)
    _paused(h, 2, 1, at=1.0)
    h.tick_until(command.timeout_s + 1.0, pinging=(1, 2, 3))  # the answer never comes
    assert _state(h, 1) == (VmState.MIGRATING, 1)
    # h2's full report no longer lists the copy, h1 reports it running: it stayed on h1.
    out = h.handle(f.PowerStateReported(HostId(2), True, True, ()))
    out += h.report(1, 1, PowerState.POWER_ON)
    assert _state(h, 1) == (VmState.RUNNING, 1) and starts(out) == []


def test_a_migration_done_outside_kvmha_is_followed_not_restarted() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    out = h.report(1, 1, PowerState.POWER_OFF, StopCause.MIGRATED, at=1.0)  # the source's word comes first
    assert _state(h, 1) == (VmState.MIGRATING, 1)
    out += h.tick_until(30.0, pinging=(1, 2, 3))
    out += h.report(3, 1, PowerState.POWER_ON, at=30.0)
    assert _state(h, 1) == (VmState.RUNNING, 3)
    assert starts(out) == [] and not [w for w in h.core.works.values() if w.type is WorkType.HA]


def test_source_dies_mid_migration_restarted_once_when_neither_side_holds_it() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    _migrate(h, 1, 2)
    _paused(h, 2, 1, at=1.0)
    out = _power_lost(h, 1, at=2.0)
    assert starts(out) == []  # h2's paused copy may still become the VM: wait for its word
    out = h.report(2, 1, PowerState.POWER_OFF, StopCause.FAILED, at=2.5)  # libvirt destroyed the incoming copy
    assert len(starts(out)) == 1


def test_source_dies_after_switchover_nothing_restarted() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    _migrate(h, 1, 2)
    out = h.report(2, 1, PowerState.POWER_ON, at=3.0)
    out += _power_lost(h, 1, at=3.1)
    out += h.tick_until(60.0, pinging=(2, 3))
    assert starts(out) == [] and _state(h, 1) == (VmState.RUNNING, 2)


def test_target_silent_mid_migration_after_the_source_let_go_waits_for_its_verdict() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    command = _migrate(h, 1, 2)
    _paused(h, 2, 1, at=1.0)
    out = h.report(1, 1, PowerState.POWER_OFF, StopCause.MIGRATED, at=2.0)  # switchover done, h2's word is lost
    out += h.tick_until(command.timeout_s + 1.0, pinging=(1, 3))  # h2 silent, its BMC answers nothing
    assert starts(out) == []  # h2 may run it: never a restart on silence


def test_a_paused_copy_on_the_target_never_settles_the_migration() -> None:
    """An incoming copy reported paused for another reason (still starting up) is not the VM running there."""
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    command = _migrate(h, 1, 2)
    domain = f.DomainReport(VmUuid("v1"), "vm1", PowerState.POWER_ON, StopCause.PAUSED, paused=True)
    h.handle(f.PowerStateReported(HostId(2), False, True, (domain,)), at=1.0)
    assert _state(h, 1) == (VmState.MIGRATING, 1)
    out = h.answer(command, ok=False, error="ERROR_LIBVIRT: migration failed", at=2.0)
    assert _state(h, 1) == (VmState.RUNNING, 1) and starts(out) == []


def test_progress_reports_become_rate_limited_events_of_the_vm() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    command = _migrate(h, 1, 2)
    shown: list[str] = []
    for second in range(1, 6):
        fact = f.MigrationProgressed(HostId(1), command.request_id, VmUuid("v1"), float(second), 1 << 30,
                                     second << 27, (1 << 30) - (second << 27), second)
        shown += [m for m in messages(h.handle(fact, at=float(second))) if "memory copied" in m]
    assert shown == [  # every 2 s at most; the share is of the memory sent so far
        "vm:1 12% of memory copied to h2 (0.12 GiB sent, 0.88 GiB left, pass 1, 1 s)",
        "vm:1 37% of memory copied to h2 (0.38 GiB sent, 0.62 GiB left, pass 3, 3 s)",
        "vm:1 62% of memory copied to h2 (0.62 GiB sent, 0.38 GiB left, pass 5, 5 s)",
    ]
    other = f.MigrationProgressed(HostId(3), command.request_id, VmUuid("v1"), 9.0, 1, 1, 0, 1)
    assert not [m for m in messages(h.handle(other, at=9.0)) if "copied" in m]  # not from its source: ignored


def test_the_old_sources_pause_at_switchover_after_the_target_runs_it_is_no_new_migration() -> None:
    """Seen in the lab: h1's SUSPENDED_MIGRATED came after h2's RESUMED had settled the migration; it was taken for
    an incoming copy on h1 (a migration outside kvmha back to h1), which then 'failed'."""
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    command = _migrate(h, 1, 2)
    out = h.report(2, 1, PowerState.POWER_ON, at=2.0)
    out += _paused(h, 1, 1, at=2.1)  # the source paused at switchover, reported late
    out += h.report(1, 1, PowerState.POWER_OFF, StopCause.MIGRATED, at=2.2)
    out += h.answer(command, at=2.3)
    assert _state(h, 1) == (VmState.RUNNING, 2)
    assert not [m for m in messages(out) if "not started by kvmha" in m or "stays on" in m], messages(out)
    # Later, a real migration back to h1 done outside kvmha is followed again.
    out = _paused(h, 1, 1, at=60.0)
    assert _state(h, 1) == (VmState.MIGRATING, 2) and any("not started by kvmha" in m for m in messages(out))


def _restarted(h: Harness) -> Harness:
    """A new manager (Core) on what the old one stored: its VM records and its active work items."""
    vms = [dataclasses.replace(record) for record in h.vm_records]
    works = [dataclasses.replace(w) for w in h.core.works.values() if w.step.active]
    return Harness(vms=vms, works=works, now=h.now + 5.0)


def _incoming(n: int, vm_id: int) -> f.PowerStateReported:
    """Host n's full report listing only the VM's incoming copy (paused for migration)."""
    domain = f.DomainReport(VmUuid(f"v{vm_id}"), f"vm{vm_id}", PowerState.POWER_ON, StopCause.NONE, migrating=True)
    return f.PowerStateReported(HostId(n), True, True, (domain,))


def test_the_migration_item_stores_its_target() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    _migrate(h, 1, 2)
    work = next(w for w in h.core.works.values() if w.type is WorkType.MIGRATION)
    assert (work.host_id, work.target_host_id) == (1, 2)


def test_a_manager_restarted_mid_migration_waits_for_the_stored_target() -> None:
    """The old manager died with the migration in flight: its source still runs the VM (the memory is being
    copied), which proves nothing while the stored target holds an incoming copy. Before the target was stored the
    new manager settled it on the source at once, and the migration's completion then looked like a new one."""
    old = Harness(vms=[vm(1, on=1)])
    old.connect_all()
    _migrate(old, 1, 2)
    h = _restarted(old)
    out = h.connect(1, running=[1])
    out += h.connect(3)
    assert _state(h, 1) == (VmState.MIGRATING, 1), messages(out)
    out += h.handle(f.AgentConnected(HostId(2), "u2", "h2", "10.0.0.2", HostCapacity(16, 16384), "b", ARMED,
                                     "lockd"))
    out += h.handle(_incoming(2, 1))
    assert _state(h, 1) == (VmState.MIGRATING, 1), messages(out)
    out += h.report(2, 1, PowerState.POWER_ON)  # switchover: the guest runs on h2
    out += h.report(1, 1, PowerState.POWER_OFF, StopCause.MIGRATED)
    assert _state(h, 1) == (VmState.RUNNING, 2) and starts(out) == []
    assert not [m for m in messages(out) if "not started by kvmha" in m or "stays on" in m], messages(out)
    work = next(w for w in h.core.works.values() if w.type is WorkType.MIGRATION)
    assert work.step is WorkStep.DONE


def test_a_manager_restarted_mid_migration_keeps_it_on_the_source_when_the_target_holds_no_copy() -> None:
    old = Harness(vms=[vm(1, on=1)])
    old.connect_all()
    _migrate(old, 1, 2)
    h = _restarted(old)
    out = h.connect(1, running=[1])
    assert _state(h, 1) == (VmState.MIGRATING, 1)
    out += h.connect(2)  # its full report lists no copy: the migration failed while no manager watched
    assert _state(h, 1) == (VmState.RUNNING, 1) and starts(out) == []
    assert any("stays on h1" in m for m in messages(out)), messages(out)


def test_a_stored_target_that_was_removed_leaves_the_reports_to_find_it() -> None:
    old = Harness(vms=[vm(1, on=1)])
    old.connect_all()
    _migrate(old, 1, 2)
    works = [dataclasses.replace(w, target_host_id=HostId(9)) for w in old.core.works.values() if w.step.active]
    h = Harness(vms=[dataclasses.replace(r) for r in old.vm_records], works=works, now=old.now + 5.0)
    h.connect(1)  # the source no longer holds it
    assert _state(h, 1) == (VmState.MIGRATING, 1)
    out = h.connect(2, running=[1])  # it runs where it went
    assert _state(h, 1) == (VmState.RUNNING, 2) and starts(out) == []


def test_the_source_agent_killed_mid_migration_the_reports_settle_it_without_its_answer() -> None:
    """The agent that ran MigrateVm died (its answer will never come); libvirt failed the job meanwhile. The VM is
    settled on its source from the reports once the agent is back, not after the command's timeout (minutes)."""
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    command = _migrate(h, 1, 2)
    _paused(h, 2, 1, at=1.0)
    out = h.handle(f.AgentDisconnected(HostId(1), planned=False), at=2.0)
    assert _state(h, 1) == (VmState.MIGRATING, 1) and starts(out) == []  # h2's copy may still become the VM
    out += h.handle(f.PowerStateReported(HostId(2), True, True, ()), at=3.0)  # libvirt destroyed the copy
    assert _state(h, 1) == (VmState.MIGRATING, 1)  # h1's last word predates the break: it may be dying
    out += h.connect(1, running=[1], at=4.0)  # the agent is back: h1 runs it
    assert h.now < command.timeout_s
    assert _state(h, 1) == (VmState.RUNNING, 1) and starts(out) == []


def test_the_source_agent_killed_mid_migration_that_completed_the_vm_is_on_the_target() -> None:
    h = Harness(vms=[vm(1, on=1)])
    h.connect_all()
    _migrate(h, 1, 2)
    _paused(h, 2, 1, at=1.0)
    out = h.handle(f.AgentDisconnected(HostId(1), planned=False), at=2.0)
    out += h.report(2, 1, PowerState.POWER_ON, at=3.0)  # libvirt completed it without the agent
    out += h.connect(1, at=4.0)  # no copy left on h1
    out += h.tick_until(60.0, pinging=(1, 2, 3))
    assert _state(h, 1) == (VmState.RUNNING, 2) and starts(out) == []
