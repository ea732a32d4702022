"""Compound fault sequences for storms (issue 12): faults that build on each other, the way real incidents do.

Each sequence takes its hosts out of the storm's pool (`Storm.busy` / `Storm.dead`), so the storm's limit on hosts
faulted at once still holds and no other fault lands on them meanwhile.

- cascade: a host loses power; the moment the core records one of its VMs Starting on a new host, that target loses
  power too (the restart target dies mid-restart).
- flap-then-fail: three hosts each lose their manager link three times inside `flap.window` (they flap); then one
  of them loses power for good.
- partition-then-power: a host is cut from the network; before it is even detected, it loses power.
- restart-mid-recovery: a host loses power; the moment the core has it Down (its VMs being restarted), the manager
  process restarts.
- capacity-later: a host with one big VM (no other host has room for it) loses power; the big VM can only run again
  when a power-cycled host comes back empty, which another host does a minute later.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmha.manager.core.model import HostStatus, VmState, VmUuid
from kvmha.manager.sim.script import apply

if TYPE_CHECKING:
    from kvmha.manager.sim.storm import Storm

SEQUENCES = ("cascade", "flap-then-fail", "partition-then-power", "restart-mid-recovery", "capacity-later")
WATCH_S = 0.1  # how often a sequence looks at the core's records for its next step
WATCH_FOR_S = 120.0  # a step that never becomes due is dropped


def start_sequence(storm: Storm, kind: str) -> None:
    """Begin one compound sequence now (skipped when the storm has no free host for it)."""
    {
        "cascade": _cascade,
        "flap-then-fail": _flap_then_fail,
        "partition-then-power": _partition_then_power,
        "restart-mid-recovery": _restart_mid_recovery,
        "capacity-later": _capacity_later,
    }[kind](storm)


def _take(storm: Storm, count: int, predicate: Callable[[str], bool] = lambda _: True) -> list[str]:
    free = [n for n in sorted(storm.sim.world.hosts_by_name) if n not in storm.busy and n not in storm.dead]
    free = [n for n in free if predicate(n) and not storm.reserved(n)]
    if len(free) < count or not storm.room_for(count):
        return []
    picked = storm.rng.sample(free, count)
    storm.busy.update(picked)
    return picked


def _count(storm: Storm, kind: str) -> None:
    storm.injected[kind] = storm.injected.get(kind, 0) + 1


def _lose_for_good(storm: Storm, host: str) -> None:
    apply(storm.sim, f"power {host} off")
    storm.busy.discard(host)
    storm.dead.add(host)


def _watch(storm: Storm, until: float, step: Callable[[], bool]) -> None:
    """Call `step` every WATCH_S until it returns True (done) or `until` passes."""

    def tick() -> None:
        if not step() and storm.sim.now < until:
            storm.sim.schedule(storm.sim.now + WATCH_S, tick)

    storm.sim.schedule(storm.sim.now + WATCH_S, tick)


def _cascade(storm: Storm) -> None:
    picked = _take(storm, 1, lambda n: bool(storm.sim.world.hosts_by_name[n].running))
    if not picked:
        return
    first = picked[0]
    sim = storm.sim
    uuids: list[VmUuid] = sorted(sim.world.hosts_by_name[first].running)
    _count(storm, "cascade")
    _lose_for_good(storm, first)

    def target_chosen() -> bool:
        if not sim.world.manager_running:
            return False
        for uuid in uuids:
            record = sim.core.vm(sim.world.vms[uuid].id)
            if record is None or record.state is not VmState.STARTING or record.host_id is None:
                continue
            target = sim.world.hosts[record.host_id].name
            if target in storm.busy or target in storm.dead or not storm.room_for(1):
                continue
            _lose_for_good(storm, target)
            _count(storm, "cascade: target lost")
            return True
        return False

    _watch(storm, sim.now + WATCH_FOR_S, target_chosen)


def _flap_then_fail(storm: Storm) -> None:
    hosts = _take(storm, 3)
    if not hosts:
        return
    _count(storm, "flap-then-fail")
    sim, now = storm.sim, storm.sim.now
    for round_no in range(3):  # three incidents each, 60 s apart: well inside flap.window (600 s)
        for offset, host in enumerate(hosts):
            cut_at = now + round_no * 60.0 + offset * 15.0
            sim.schedule(cut_at, storm.run_command, f"link {host} off")
            sim.schedule(cut_at + 12.0, storm.run_command, f"link {host} on")
    victim = hosts[0]
    for host in hosts[1:]:
        sim.schedule(now + 200.0, storm.release, host)
    sim.schedule(now + 200.0, _lose_for_good, storm, victim)


def _partition_then_power(storm: Storm) -> None:
    hosts = _take(storm, 1)
    if not hosts:
        return
    _count(storm, "partition-then-power")
    host = hosts[0]
    apply(storm.sim, f"network {host} off")
    storm.sim.schedule(storm.sim.now + storm.rng.uniform(1.0, 5.0), _lose_for_good, storm, host)


def _restart_mid_recovery(storm: Storm) -> None:
    hosts = _take(storm, 1, lambda n: bool(storm.sim.world.hosts_by_name[n].running))
    if not hosts:
        return
    _count(storm, "restart-mid-recovery")
    sim, host = storm.sim, storm.sim.world.hosts_by_name[hosts[0]]
    _lose_for_good(storm, host.name)

    def down() -> bool:
        if not sim.world.manager_running or sim.core.host_status(host.id) not in (HostStatus.DOWN, HostStatus.FENCED):
            return False
        apply(sim, "restart manager")
        _count(storm, "restart-mid-recovery: restarted")
        return True

    _watch(storm, sim.now + WATCH_FOR_S, down)


def _capacity_later(storm: Storm) -> None:
    big = [n for n in storm.big_hosts if n not in storm.busy and n not in storm.dead]
    others = _take(storm, 1)
    if not big or not others:
        storm.busy.difference_update(others)
        return
    _count(storm, "capacity-later")
    host = storm.rng.choice(big)
    storm.busy.add(host)
    _lose_for_good(storm, host)
    other = others[0]
    later = storm.sim.now + storm.rng.uniform(40.0, 90.0)
    storm.sim.schedule(later, storm.run_command, f"power {other} off")
    storm.sim.schedule(later + storm.rng.uniform(20.0, 40.0), storm.run_command, f"power {other} on")
    storm.sim.schedule(later + 60.0, storm.release, other)
