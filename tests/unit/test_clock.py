"""The one conversion between the core's monotonic clock and the wall clock the store and operators read."""

from __future__ import annotations

import pytest

from kvmha.manager.adapters.clock import SystemClock, to_mono_fact, to_mono_host, to_mono_work, to_wall_action
from kvmha.manager.core import actions, facts
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostId,
    HostRecord,
    HostUuid,
    VmId,
    VmRecord,
    VmState,
    VmUuid,
    WorkId,
    WorkStep,
    WorkType,
)

WALL_AT_MONO_ZERO = 1_764_000_000.0


class OffsetClock:
    """Monotonic 0 happened at WALL_AT_MONO_ZERO: a process started long after the epoch, as they all are."""

    def __init__(self, mono: float) -> None:
        self.mono = mono

    def monotonic(self) -> float:
        return self.mono

    def wall(self) -> float:
        return WALL_AT_MONO_ZERO + self.mono

    def to_wall(self, mono: float) -> float:
        return WALL_AT_MONO_ZERO + mono

    def to_mono(self, wall: float) -> float:
        return wall - WALL_AT_MONO_ZERO


def test_system_clock_round_trip() -> None:
    clock = SystemClock()
    wall = clock.wall() - 3600.0
    assert clock.to_wall(clock.to_mono(wall)) == pytest.approx(wall, abs=0.01)
    assert clock.to_wall(clock.monotonic()) == pytest.approx(clock.wall(), abs=0.01)


def test_persisted_records_and_events_leave_on_the_wall_clock() -> None:
    clock = OffsetClock(100.0)
    host = HostRecord(HostId(1), HostUuid("u1"), "h1", "10.0.0.1", last_ping_at=95.0)
    work = HaWorkRecord(WorkId(1), VmId(1), WorkType.HA, WorkStep.SCHEDULED, None, VmState.RUNNING, 0,
                        time_to_try_at=110.0, created_at=99.0, updated_at=100.0, taken_at=99.0)
    saved = to_wall_action(actions.SaveHost(host), clock)
    assert isinstance(saved, actions.SaveHost) and saved.host.last_ping_at == WALL_AT_MONO_ZERO + 95.0
    assert host.last_ping_at == 95.0  # the core's own record is not touched
    stored = to_wall_action(actions.SaveWork(work), clock)
    assert isinstance(stored, actions.SaveWork)
    assert (stored.work.created_at, stored.work.time_to_try_at) == (WALL_AT_MONO_ZERO + 99.0, WALL_AT_MONO_ZERO + 110)
    event = to_wall_action(actions.RecordEvent(100.0, "info", "host:1", "host.status", "Up -> Investigating"), clock)
    assert isinstance(event, actions.RecordEvent) and event.at == WALL_AT_MONO_ZERO + 100.0
    deleted = actions.DeleteVmRecord(VmId(1))
    assert to_wall_action(deleted, clock) is deleted


def test_records_loaded_after_a_restart_come_back_on_the_new_process_clock() -> None:
    """A new process's monotonic clock starts elsewhere: a host last heard 30 s before the old manager died, loaded by
    a new manager 10 s later, has been silent for 40 s on the new clock."""
    old = OffsetClock(5000.0)
    stored = old.to_wall(4970.0)
    new = RestartedClock(mono=20.0, started_wall=old.wall() + 10.0 - 20.0)
    host = to_mono_host(HostRecord(HostId(1), HostUuid("u1"), "h1", "", last_ping_at=stored), new)
    assert new.monotonic() - (host.last_ping_at or 0.0) == pytest.approx(40.0)
    work = HaWorkRecord(WorkId(1), VmId(1), WorkType.HA, WorkStep.DONE, None, VmState.RUNNING, 0,
                        created_at=old.to_wall(4000.0), updated_at=old.to_wall(4010.0))
    assert new.monotonic() - to_mono_work(work, new).updated_at == pytest.approx(1000.0)  # restart windows hold


class RestartedClock(OffsetClock):
    """Monotonic 0 of this process happened at wall-clock `started_wall`."""

    def __init__(self, mono: float, started_wall: float) -> None:
        super().__init__(mono)
        self.started_wall = started_wall

    def wall(self) -> float:
        return self.started_wall + self.mono

    def to_wall(self, mono: float) -> float:
        return self.started_wall + mono

    def to_mono(self, wall: float) -> float:
        return wall - self.started_wall


def test_operator_facts_with_records_reach_the_core_on_its_clock() -> None:
    clock = OffsetClock(10.0)
    vm = VmRecord(VmId(1), VmUuid("v1"), "vm1", VmState.STOPPED, power_state_updated_at=WALL_AT_MONO_ZERO + 7.0)
    fact = to_mono_fact(facts.VmRegistered(vm), clock)
    assert isinstance(fact, facts.VmRegistered) and fact.vm.power_state_updated_at == 7.0
    other = facts.VmStartRequested(VmId(1))
    assert to_mono_fact(other, clock) is other
