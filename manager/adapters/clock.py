"""The one place where the core's monotonic time meets wall-clock time.

Inside the manager process every duration and deadline comes from a monotonic clock (the core's `now`): a wall
clock that NTP steps back or forward must never make a host look silent or a retry fire twice. What leaves the
process — records in the database, events, the last ping an operator reads, restart windows another manager (or
this one after a restart) will compare — is wall-clock time, because that is all another process can compare.

`to_wall(mono)` is the wall-clock instant at which the monotonic instant `mono` happened, as the two clocks read
now; `to_mono` is its inverse. Both sample the clocks at the call, so a wall-clock step moves later conversions
(as it must: the database speaks wall time) but never the core's own deadlines. The driver converts every record
it persists (`to_wall_action`) and every record it loads after a restart (`to_mono_*`) here; nothing else converts.
In the simulator both clocks are the simulated time and the conversion is the identity.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from kvmha.manager.core import actions, facts
from kvmha.manager.core.model import HaWorkRecord, HostRecord, VmRecord
from kvmha.manager.env import Clock


class SystemClock:
    """Production: time.monotonic() (the asyncio loop's own clock) and time.time()."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def to_wall(self, mono: float) -> float:
        return time.time() - (time.monotonic() - mono)

    def to_mono(self, wall: float) -> float:
        return time.monotonic() - (time.time() - wall)


Convert = Callable[[float], float]


def _host(record: HostRecord, convert: Convert) -> HostRecord:
    if record.last_ping_at is None:
        return record
    return dataclasses.replace(record, last_ping_at=convert(record.last_ping_at))


def _vm(record: VmRecord, convert: Convert) -> VmRecord:
    if record.power_state_updated_at is None:
        return record
    return dataclasses.replace(record, power_state_updated_at=convert(record.power_state_updated_at))


def _work(record: HaWorkRecord, convert: Convert) -> HaWorkRecord:
    taken_at = None if record.taken_at is None else convert(record.taken_at)
    return dataclasses.replace(record, time_to_try_at=convert(record.time_to_try_at),
                               created_at=convert(record.created_at), updated_at=convert(record.updated_at),
                               taken_at=taken_at)


def to_wall_action(action: actions.Action, clock: Clock) -> actions.Action:
    """A persisted action with its times on the wall clock (actions without times come back unchanged)."""
    convert = clock.to_wall
    match action:
        case actions.SaveHost(host):
            return actions.SaveHost(_host(host, convert))
        case actions.SaveVm(vm):
            return actions.SaveVm(_vm(vm, convert))
        case actions.SaveWork(work):
            return actions.SaveWork(_work(work, convert))
        case actions.RecordEvent():
            return dataclasses.replace(action, at=convert(action.at))
        case _:
            return action


def to_mono_host(record: HostRecord, clock: Clock) -> HostRecord:
    return _host(record, clock.to_mono)


def to_mono_vm(record: VmRecord, clock: Clock) -> VmRecord:
    return _vm(record, clock.to_mono)


def to_mono_work(record: HaWorkRecord, clock: Clock) -> HaWorkRecord:
    return _work(record, clock.to_mono)


def to_mono_fact(fact: facts.Fact, clock: Clock) -> facts.Fact:
    """Operator facts carry records read from the store (wall clock): the core gets them on its own clock."""
    match fact:
        case facts.VmRegistered(vm):
            return facts.VmRegistered(to_mono_vm(vm, clock))
        case facts.HostRegistered(host):
            return facts.HostRegistered(to_mono_host(host, clock))
        case _:
            return fact
