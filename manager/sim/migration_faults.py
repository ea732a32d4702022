"""Migrations under fault for storms (issue 17): live migrations and maintenance, with a side dying mid-way.

Each sequence takes its hosts out of the storm's pool like sim/sequences.py, so the storm's limit on hosts faulted at
once holds. The simulated migration (sim/migrations.py) copies memory for 2-5 s, so a fault 0.5-2 s after the
command lands while the target holds a paused copy.

- migrate-source-dies: two VMs of a host are migrated (placement picks), then the source loses power.
- migrate-target-dies: a VM is migrated to a chosen host, which then loses power (and comes back later).
- maintenance-fault: a host enters maintenance; while its VMs move off, another host loses power (maybe a target);
  maintenance is switched off again later.
- outside-migration: an admin migrates a VM with virsh (outside kvmha); its source then loses power, before or after
  the switchover.
- switchover-unseen: a VM is migrated; both hosts' manager links are cut before the switchover (neither the
  answer nor the reports arrive), then the source loses power: the VM runs on the target, which the core cannot see
  — it must wait for the target's word or verdict, never restart the VM elsewhere. The target's link comes back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmha.manager.sim.script import apply

if TYPE_CHECKING:
    from kvmha.manager.sim.storm import Storm

MIGRATION_SEQUENCES = (
    "migrate-source-dies",
    "migrate-target-dies",
    "maintenance-fault",
    "outside-migration",
    "switchover-unseen",
)


def start_migration_sequence(storm: Storm, kind: str) -> None:
    {
        "migrate-source-dies": _source_dies,
        "migrate-target-dies": _target_dies,
        "maintenance-fault": _maintenance_fault,
        "outside-migration": _outside,
        "switchover-unseen": _switchover_unseen,
    }[kind](storm)


def _take(storm: Storm, count: int) -> list[str]:
    world = storm.sim.world
    free = [
        n
        for n in sorted(world.hosts_by_name)
        if n not in storm.busy and n not in storm.dead and not storm.reserved(n) and world.hosts_by_name[n].powered
    ]
    if len(free) < count or not storm.room_for(count):
        return []
    picked = storm.rng.sample(free, count)
    storm.busy.update(picked)
    return picked


def _vms_on(storm: Storm, host: str, count: int) -> list[str]:
    world = storm.sim.world
    running = sorted(world.vms[uuid].name for uuid in world.hosts_by_name[host].running)
    return storm.rng.sample(running, min(count, len(running)))


def _pair_with_vm(storm: Storm) -> tuple[str, str, str] | None:
    """Two free hosts and one VM running on the first (source, target, vm); both released when the source runs none."""
    picked = _take(storm, 2)
    if not picked:
        return None
    source, target = picked
    vms = _vms_on(storm, source, 1)
    if not vms:
        storm.release(source)
        storm.release(target)
        return None
    return source, target, vms[0]


def _doomed(storm: Storm, host: str) -> None:
    """The host will lose its power: the storm counts it dead and never picks it again."""
    storm.dead.add(host)
    storm.busy.discard(host)


def _count(storm: Storm, kind: str) -> None:
    storm.injected[kind] = storm.injected.get(kind, 0) + 1


def _later(storm: Storm, low_s: float, high_s: float, command: str, host: str | None = None) -> None:
    at = storm.sim.now + storm.rng.uniform(low_s, high_s)
    storm.sim.schedule(at, _run, storm, command, host)


def _run(storm: Storm, command: str, host: str | None) -> None:
    apply(storm.sim, command)
    if host is not None:
        storm.release(host)


def _source_dies(storm: Storm) -> None:
    picked = _take(storm, 1)
    if not picked:
        return
    source = picked[0]
    vms = _vms_on(storm, source, 2)
    if not vms:
        storm.release(source)
        return
    _count(storm, "migrate-source-dies")
    for name in vms:
        apply(storm.sim, f"migrate {name}")
    _doomed(storm, source)
    _later(storm, 0.5, 2.0, f"power {source} off")


def _target_dies(storm: Storm) -> None:
    pair = _pair_with_vm(storm)
    if pair is None:
        return
    source, target, vm = pair
    _count(storm, "migrate-target-dies")
    apply(storm.sim, f"migrate {vm} {target}")
    storm.release(source)
    _later(storm, 0.5, 2.0, f"power {target} off")
    _later(storm, 60.0, 120.0, f"power {target} on", target)


def _maintenance_fault(storm: Storm) -> None:
    picked = _take(storm, 2)
    if not picked:
        return
    host, victim = picked
    _count(storm, "maintenance-fault")
    apply(storm.sim, f"maintenance {host} on")
    _later(storm, 0.5, 3.0, f"power {victim} off")
    _later(storm, 60.0, 120.0, f"power {victim} on", victim)
    _later(storm, 120.0, 180.0, f"maintenance {host} off", host)


def _outside(storm: Storm) -> None:
    pair = _pair_with_vm(storm)
    if pair is None:
        return
    source, target, vm = pair
    _count(storm, "outside-migration")
    apply(storm.sim, f"virsh-migrate {vm} {target}")
    storm.release(target)
    _doomed(storm, source)
    _later(storm, 0.5, 8.0, f"power {source} off")


def _switchover_unseen(storm: Storm) -> None:
    pair = _pair_with_vm(storm)
    if pair is None:
        return
    source, target, vm = pair
    _count(storm, "switchover-unseen")
    apply(storm.sim, f"migrate {vm} {target}")
    _doomed(storm, source)
    cut_at = storm.rng.uniform(0.4, 1.5)  # both manager links, while the memory is copied: nothing is seen
    _later(storm, cut_at, cut_at, f"link {target} off")
    _later(storm, cut_at, cut_at, f"link {source} off")
    _later(storm, 8.0, 12.0, f"power {source} off")
    _later(storm, 90.0, 150.0, f"link {target} on", target)
