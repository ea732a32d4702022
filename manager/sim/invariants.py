"""The invariant checker: records every start and stop on the simulated hypervisors and the core's view at that
moment, and reports violations of fencing safety.

1. Never a VM running on two hosts.
2. Never a VM started on a new host while its old host was neither fenced nor proven dead — unless its previous run
   ended at VM level while the host kept running (crash, guest shutdown, destroy), which the old host reported.
   "Fenced or proven dead" is the core's view (Fenced/Down) at the moment of the start; whether that view was
   right is checked by (1): a wrong Down verdict shows up as a second running copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kvmha.manager.core.model import HostId, HostStatus, VmUuid

# How a VM's last run ended.
VM_LEVEL = "vm-level"  # crash, guest shutdown, destroy, self-fence: the host knows and tells
HOST_LOST = "host-lost"  # the host lost power (not by a fence)
FENCED = "fenced"  # the BMC powered the host off on the core's request


@dataclass(slots=True)
class Checker:
    core_status: Callable[[HostId], HostStatus | None]
    violations: list[str] = field(default_factory=list)
    starts: int = 0
    stops: int = 0
    last_run: dict[VmUuid, tuple[HostId, str]] = field(default_factory=dict)  # uuid → (host, how it ended)
    running_on: dict[VmUuid, set[HostId]] = field(default_factory=dict)
    lost_on: dict[HostId, set[VmUuid]] = field(default_factory=dict)  # VMs whose last run died with this host

    def started(self, uuid: VmUuid, host_id: HostId, at: float) -> None:
        self.starts += 1
        hosts = self.running_on.setdefault(uuid, set())
        if hosts - {host_id}:
            others = ", ".join(f"h{h}" for h in sorted(hosts - {host_id}))
            self.violations.append(f"{at:.1f}: {uuid} started on h{host_id} while running on {others}")
        previous = self.last_run.get(uuid)
        if previous is not None and previous[0] != host_id and previous[1] == HOST_LOST:
            status = self.core_status(previous[0])
            if status not in (HostStatus.DOWN, HostStatus.FENCED):
                self.violations.append(
                    f"{at:.1f}: {uuid} started on h{host_id} while its old host h{previous[0]} was "
                    f"{status.value if status else 'unknown'} (neither fenced nor proven dead)"
                )
        hosts.add(host_id)

    def stopped(self, uuid: VmUuid, host_id: HostId, how: str) -> None:
        self.stops += 1
        self.running_on.get(uuid, set()).discard(host_id)
        self.last_run[uuid] = (host_id, how)
        if how == HOST_LOST:
            self.lost_on.setdefault(host_id, set()).add(uuid)

    def host_booted(self, host_id: HostId) -> None:
        """A host that lost power is back: its agent's full report tells the core which VMs are not there."""
        for uuid in self.lost_on.pop(host_id, set()):
            if self.last_run.get(uuid) == (host_id, HOST_LOST):
                self.last_run[uuid] = (host_id, VM_LEVEL)

    def copies(self, uuid: VmUuid) -> int:
        return len(self.running_on.get(uuid, ()))
