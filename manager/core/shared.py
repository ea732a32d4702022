"""Leaf indexes that one flow writes and another reads, so that the flows need not know each other.

Each index has exactly one writer (named below); readers only ask questions. They live in the `Ctx` and import
nothing of the flows, which keeps the core's module graph a DAG:

- `UpHosts` (written by HostFlow): the Up, connected ROUTING hosts in id order — neighbours to ask about a silent
  host, and placement candidates for the scheduler.
- `HeldOut` (written by HostFlow): hosts that flapped, avoided by placement until a time (used only when no stable
  host fits).
- `Absences` (written by PowerSync): VMs missing from their host's last full report, inside the grace after which
  they count as PowerReportMissing; the scheduler waits instead of deciding on a report that is about to change.
- `Migrations` (written by MigrationFlow): migrations in progress; the scheduler never restarts a VM whose migration
  is not settled (it may run on either side), maintenance counts what is leaving a host.
"""

from __future__ import annotations

import bisect
import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from kvmha.manager.core.model import HostId, VmId, WorkId


class UpHosts:
    def __init__(self) -> None:
        self._sorted: list[HostId] = []

    @property
    def ids(self) -> Sequence[HostId]:
        return self._sorted

    def refresh(self, host_id: HostId, eligible: bool) -> None:
        ids = self._sorted
        index = bisect.bisect_left(ids, host_id)
        present = index < len(ids) and ids[index] == host_id
        if eligible and not present:
            ids.insert(index, host_id)
        elif present and not eligible:
            del ids[index]

    def after(self, host_id: HostId, count: int) -> list[HostId]:
        """Up to `count` hosts following `host_id` around the ring (never itself): spreads the questions."""
        ring = self._sorted
        start = bisect.bisect_right(ring, host_id)
        picked: list[HostId] = []
        for step in range(len(ring)):
            if len(picked) >= count:
                break
            candidate = ring[(start + step) % len(ring)]
            if candidate != host_id:
                picked.append(candidate)
        return picked


class HeldOut:
    def __init__(self) -> None:
        self._until: dict[HostId, float] = {}

    def hold(self, host_id: HostId, until: float) -> None:
        self._until[host_id] = until

    def release(self, host_id: HostId) -> None:
        self._until.pop(host_id, None)

    def at(self, now: float) -> frozenset[HostId]:
        return frozenset(host_id for host_id, until in self._until.items() if until > now)


class Absences:
    def __init__(self) -> None:
        self._host_of: dict[VmId, HostId] = {}

    def add(self, vm_id: VmId, host_id: HostId) -> None:
        self._host_of[vm_id] = host_id

    def host_of(self, vm_id: VmId) -> HostId | None:
        return self._host_of.get(vm_id)

    def pop(self, vm_id: VmId) -> HostId | None:
        return self._host_of.pop(vm_id, None)

    def __contains__(self, vm_id: object) -> bool:
        return vm_id in self._host_of


class Side(enum.Enum):
    """What one host of a migration was last seen to hold of the VM."""

    UNKNOWN = "unknown"  # nothing heard yet (or its word was lost with a manager restart)
    NONE = "none"  # no copy there (never was, or gone: off, absent from a full report, its host dead)
    PAUSED = "paused"  # a copy paused for the migration: the incoming one on the target, the source at switchover
    RUNNING = "running"  # the guest runs there


@dataclass(slots=True)
class Migration:
    """One migration of one VM in progress, started by kvmha (work_id) or seen in libvirt's reports (work_id None).

    The VM's record stays on `source` (state Migrating) until the migration settles; `target` is None while a
    migration seen from outside has not shown where it goes. What each side holds is updated from the reports; the
    outcome of the MigrateVm command (ok: on the target; failed: on the source) or of the reports decides."""

    vm_id: VmId
    source: HostId
    target: HostId | None
    started_at: float
    work_id: WorkId | None = None
    at_source: Side = Side.RUNNING
    at_target: Side = Side.UNKNOWN
    outcome_unknown: bool = False  # the command's answer is lost (timed out, or the manager restarted)
    for_maintenance: bool = False
    progress_shown_at: float | None = None  # when the last vm.migration.progress event was recorded


class Migrations:
    """Written by MigrationFlow; read by the scheduler (clearance: no HA restart while a migration is unsettled) and
    by maintenance (what is in flight off a host, which VMs failed to move)."""

    def __init__(self) -> None:
        self._by_vm: dict[VmId, Migration] = {}
        self.failed: dict[VmId, str] = {}  # the last failed migration of each VM (maintenance reads it)
        # The host each VM last left by a migration, and when: its copy's pause at switchover (a paused-for-migration
        # report that can come after the target's "running") is that migration's tail, not a new incoming copy.
        self.left: dict[VmId, tuple[HostId, float]] = {}

    def get(self, vm_id: VmId) -> Migration | None:
        return self._by_vm.get(vm_id)

    def __contains__(self, vm_id: object) -> bool:
        return vm_id in self._by_vm

    def __iter__(self) -> Iterator[Migration]:
        return iter(sorted(self._by_vm.values(), key=lambda m: m.vm_id))

    def add(self, migration: Migration) -> None:
        self._by_vm[migration.vm_id] = migration
        self.failed.pop(migration.vm_id, None)

    def pop(self, vm_id: VmId) -> Migration | None:
        return self._by_vm.pop(vm_id, None)

    def touching(self, host_id: HostId) -> list[Migration]:
        return [m for m in self if host_id in (m.source, m.target)]

    def leaving(self, host_id: HostId) -> int:
        return sum(1 for m in self if m.source == host_id)
