"""Leaf indexes that one flow writes and another reads, so that the flows need not know each other.

Each index has exactly one writer (named below); readers only ask questions. They live in the `Ctx` and import
nothing of the flows, which keeps the core's module graph a DAG:

- `UpHosts` (written by HostFlow): the Up, connected ROUTING hosts in id order — neighbours to ask about a silent
  host, and placement candidates for the scheduler.
- `HeldOut` (written by HostFlow): hosts that flapped, avoided by placement until a time (used only when no stable
  host fits).
- `Absences` (written by PowerSync): VMs missing from their host's last full report, inside the grace after which
  they count as PowerReportMissing; the scheduler waits instead of deciding on a report that is about to change.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from kvmha.manager.core.model import HostId, VmId


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
