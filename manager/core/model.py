"""The vocabulary of kvmha's decisions: ids, statuses and the records the core reasons about.

Shared by the pure core, the database models (manager/adapters/db_models.py stores these enums by name) and the
operator CLI. Enum values are the names shown to operators and stored in the database, after CloudStack's, so an
operator who knows CloudStack reads them at once.

Nothing here does I/O. Times (``at`` / ``*_at`` floats) are the core's monotonic seconds (the driver's
`Clock.monotonic`; simulated seconds in the simulator): a wall-clock step never moves a deadline. Records leave and
enter the process on the wall clock, converted in one place (manager/adapters/clock.py). Durations carry their unit
in the name (``timeout_s``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NewType

HostId = NewType("HostId", int)
HostUuid = NewType("HostUuid", str)
VmId = NewType("VmId", int)
VmUuid = NewType("VmUuid", str)
WorkId = NewType("WorkId", int)
RequestId = NewType("RequestId", str)


class HostStatus(enum.StrEnum):
    """Connection/health status of a host (CloudStack's Status, plus the fencing states kvmha makes explicit)."""

    CONNECTING = "Connecting"  # agent connected, not yet reported its first full snapshot
    UP = "Up"
    DISCONNECTED = "Disconnected"  # link lost, not investigated (planned, or resource state says do not)
    INVESTIGATING = "Investigating"  # link lost, asking neighbours / BMC
    ALERT = "Alert"  # investigation said Unknown and fencing is not possible or not allowed yet
    FENCING = "Fencing"  # power-off requested, waiting for confirmation
    FENCED = "Fenced"  # power off confirmed: its VMs may run elsewhere
    DOWN = "Down"  # proven dead (BMC says off, or stale heartbeat and no neighbour reaches it)
    REMOVED = "Removed"


class ResourceState(enum.StrEnum):
    """What the operator allows on a host (CloudStack's ResourceState)."""

    ENABLED = "Enabled"
    DISABLED = "Disabled"
    PREPARE_FOR_MAINTENANCE = "PrepareForMaintenance"
    MAINTENANCE = "Maintenance"
    ERROR_IN_MAINTENANCE = "ErrorInMaintenance"


class HostRole(enum.StrEnum):
    """Host types; only ROUTING hosts (hypervisors running VMs) are investigated and fenced."""

    ROUTING = "Routing"
    STORAGE = "Storage"
    OTHER = "Other"


class VmState(enum.StrEnum):
    """The desired/managed lifecycle state of a VM as the manager tracks it (CloudStack's VirtualMachine.State)."""

    STARTING = "Starting"
    RUNNING = "Running"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    MIGRATING = "Migrating"
    ERROR = "Error"
    UNMANAGED = "Unmanaged"  # reported by an agent but not registered: visible, never restarted


class PowerState(enum.StrEnum):
    """What the hypervisor last said about the VM (CloudStack's PowerState)."""

    POWER_ON = "PowerOn"
    POWER_OFF = "PowerOff"
    POWER_REPORT_MISSING = "PowerReportMissing"
    POWER_UNKNOWN = "PowerUnknown"


class StopCause(enum.StrEnum):
    """Why a domain stopped, as the agent decoded it from libvirt (mirrors proto StateCause)."""

    NONE = "None"
    GUEST_SHUTDOWN = "GuestShutdown"
    DESTROYED = "Destroyed"
    CRASHED = "Crashed"
    FAILED = "Failed"
    MIGRATED = "Migrated"
    SAVED = "Saved"
    PAUSED = "Paused"
    UNDEFINED = "Undefined"
    OTHER = "Other"


class WorkType(enum.StrEnum):
    HA = "HA"
    STOP = "Stop"
    FORCE_STOP = "ForceStop"
    DESTROY = "Destroy"
    CHECK_STOP = "CheckStop"
    MIGRATION = "Migration"


class WorkStep(enum.StrEnum):
    SCHEDULED = "Scheduled"
    INVESTIGATING = "Investigating"
    FENCING = "Fencing"
    STOPPING = "Stopping"
    RESTARTING = "Restarting"
    MIGRATING = "Migrating"  # a Migration item whose MigrateVm is in flight (or whose outcome is not settled)
    DONE = "Done"
    ERROR = "Error"
    CANCELLED = "Cancelled"

    @property
    def active(self) -> bool:
        """An active item still has work to do; at most one active HA item exists per VM."""
        return self not in (WorkStep.DONE, WorkStep.ERROR, WorkStep.CANCELLED)


class InvestigationResult(enum.StrEnum):
    UP = "Up"
    DOWN = "Down"
    UNKNOWN = "Unknown"


@dataclass(frozen=True, slots=True)
class WatchdogReport:
    """What an agent says about the watchdog behind it (Hello, and every Ping). `armed`: kvmha-watchdog resets the
    host at most `timeout_s` after the agent's last sign of life, whatever the agent does (it died, hangs, was
    stopped, or its isolation response did not complete). `detail` says why it is not armed."""

    armed: bool
    timeout_s: float = 0.0
    detail: str = ""


NO_WATCHDOG = WatchdogReport(armed=False, detail="not reported by the agent")


@dataclass(frozen=True, slots=True)
class HostCapacity:
    cpus: int
    memory_mib: int


@dataclass(frozen=True, slots=True)
class StorageReach:
    """One storage a host reaches: `identity` is taken from the storage itself and is the same on every host that
    sees it ("nfs:SERVER:/EXPORT", "pool:UUID", "fs:UUID"); `mount` is where this host sees it. A VM's disk under
    `mount` lives on `identity`."""

    identity: str
    mount: str
    healthy: bool = True
    detail: str = ""  # why not healthy


@dataclass(frozen=True, slots=True)
class HostInventory:
    """What a host offers a VM besides CPUs and memory, as its agent last reported it (Hello, then on change).

    `reported` False: an agent that says nothing about storage and networks (an older agent): placement does not test
    them on that host, as before. `networks`: "network:NAME" (libvirt networks, active) and "bridge:NAME".
    `free_memory_mib` caps what placement counts as free (None: not reported); `memory_reserve_mib` is kept for the
    hypervisor (None: the manager's `host.memory.reserve`)."""

    reported: bool = False
    storage: tuple[StorageReach, ...] = ()
    networks: frozenset[str] = frozenset()
    free_memory_mib: int | None = None
    memory_reserve_mib: int | None = None


UNREPORTED = HostInventory()


@dataclass(slots=True)
class HostRecord:
    """What the manager knows about a host; the core mutates its own copies, adapters persist them."""

    id: HostId
    uuid: HostUuid
    name: str
    address: str
    status: HostStatus = HostStatus.CONNECTING
    resource_state: ResourceState = ResourceState.ENABLED
    role: HostRole = HostRole.ROUTING
    capacity: HostCapacity = field(default_factory=lambda: HostCapacity(cpus=0, memory_mib=0))
    last_ping_at: float | None = None
    has_bmc: bool = False
    # The self-fence guarantee at the agent's last contact: the watchdog's bound (s) when it was armed, else None
    # (and why in `watchdog_detail`). Saved with `last_ping_at`: a restarted manager counts with the same facts.
    watchdog_timeout_s: float | None = None
    watchdog_detail: str = ""
    lease_manager: str = ""  # libvirt's lock manager on the host ("lockd"); "" = its VMs' disks have no leases
    # Storage, networks, free memory and reserve as the agent last reported them; not stored: every Hello resends it.
    inventory: HostInventory = UNREPORTED


@dataclass(slots=True)
class VmRecord:
    id: VmId
    uuid: VmUuid
    name: str
    state: VmState
    power_state: PowerState = PowerState.POWER_UNKNOWN
    power_state_updated_at: float | None = None
    host_id: HostId | None = None
    last_host_id: HostId | None = None
    ha_enabled: bool = False
    restart_priority: int = 0  # higher restarts first
    anti_affinity_group: str | None = None
    memory_mib: int = 0
    vcpus: int = 0
    domain_xml: str = ""
    update_count: int = 0  # bumped on every state change: restart(work) aborts when it moved on


@dataclass(slots=True)
class HaWorkRecord:
    id: WorkId
    vm_id: VmId
    type: WorkType
    step: WorkStep
    host_id: HostId | None  # the host the VM was on when the work was scheduled
    previous_state: VmState
    vm_update_count: int  # the VM's update_count when scheduled
    tried: int = 0
    time_to_try_at: float = 0.0
    reason: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    taken_by: str | None = None
    taken_at: float | None = None
    # A Migration item's target (None for other types): stored so that a manager restarted mid-migration knows
    # where the VM was going and waits for that host's report instead of guessing from the source's.
    target_host_id: HostId | None = None
