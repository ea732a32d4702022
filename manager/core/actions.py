"""Actions: what the core wants done. Imperative, frozen; the service (or the simulator) carries them out.

Persistence actions carry copies of the records: the adapter writes all of one batch (the list returned by one
`Core.handle` / `Core.tick` call) in one transaction, before it executes the batch's commands and fences, so a
manager restart never finds a command in flight that the database does not know about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvmha.manager.core.model import HaWorkRecord, HostId, HostRecord, HostUuid, RequestId, VmId, VmRecord, VmUuid

Severity = Literal["info", "warning", "alert"]

# ---------------------------------------------------------------- agent commands


@dataclass(frozen=True, slots=True)
class StartVm:
    vm_uuid: VmUuid
    domain_xml: str


@dataclass(frozen=True, slots=True)
class StopVm:
    vm_uuid: VmUuid
    timeout_s: float


@dataclass(frozen=True, slots=True)
class DestroyVm:
    vm_uuid: VmUuid


@dataclass(frozen=True, slots=True)
class CheckNeighbor:
    target_host_id: HostId
    target_uuid: HostUuid
    address: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class GetCapacity:
    pass


@dataclass(frozen=True, slots=True)
class CheckLease:
    """Probe a VM's disk leases from a healthy neighbour without taking them (virtlockd's lockspace)."""

    vm_uuid: VmUuid
    domain_xml: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class MigrateVm:
    """Live-migrate a VM from the host this is sent to onto `target` (libvirt peer-to-peer). The agent gives up
    and cancels the libvirt job after `timeout_s` (auto-converge first: docs/operations.md); it answers ok only when
    libvirt completed the migration."""

    vm_uuid: VmUuid
    target_host_id: HostId
    target_uuid: HostUuid
    target_address: str
    timeout_s: float


@dataclass(frozen=True, slots=True)
class CancelMigration:
    """Abort the VM's migration job on its source (virDomainAbortJob): the VM keeps running there."""

    vm_uuid: VmUuid


AgentCommand = StartVm | StopVm | DestroyVm | CheckNeighbor | GetCapacity | CheckLease | MigrateVm | CancelMigration


@dataclass(frozen=True, slots=True)
class SendCommand:
    """Send a command to a host's agent. The adapter answers with CommandCompleted (ok=False when it cannot send);
    if nothing comes, the core times the command out itself at `timeout_s`."""

    request_id: RequestId
    host_id: HostId
    command: AgentCommand
    timeout_s: float


# ---------------------------------------------------------------- out-of-band


@dataclass(frozen=True, slots=True)
class Fence:
    """Power the host off and confirm it is off; answer with FenceCompleted."""

    request_id: RequestId
    host_id: HostId


@dataclass(frozen=True, slots=True)
class QueryBmc:
    """Read the host's power status from its BMC; answer with BmcPowerReported."""

    request_id: RequestId
    host_id: HostId


@dataclass(frozen=True, slots=True)
class DisconnectAgent:
    host_id: HostId
    reason: str


# ---------------------------------------------------------------- persistence and audit


@dataclass(frozen=True, slots=True)
class SaveHost:
    host: HostRecord


@dataclass(frozen=True, slots=True)
class SaveVm:
    vm: VmRecord


@dataclass(frozen=True, slots=True)
class DeleteVmRecord:
    vm_id: VmId


@dataclass(frozen=True, slots=True)
class SaveWork:
    work: HaWorkRecord


@dataclass(frozen=True, slots=True)
class RecordEvent:
    at: float
    severity: Severity
    subject: str  # "host:3", "vm:7", "work:12", "manager"
    kind: str  # e.g. "host.status", "vm.restart", "fence.skipped"
    message: str


Action = SendCommand | Fence | QueryBmc | DisconnectAgent | SaveHost | SaveVm | DeleteVmRecord | SaveWork | RecordEvent
