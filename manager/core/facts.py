"""Facts: what happened, as the service (or the simulator) observed it. Past tense, frozen, no behaviour.

The core is fed facts with the time they were observed (``Core.handle(fact, now)``) and answers with actions.
An agent-reported PAUSED domain is a PowerOn (it holds its disk); CRASHED is a PowerOff with cause CRASHED: the
adapter maps the wire enums onto `PowerState` and `StopCause` before building a `DomainReport`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvmha.manager.core.model import (
    NO_WATCHDOG,
    UNREPORTED,
    HostCapacity,
    HostId,
    HostInventory,
    HostRecord,
    PowerState,
    RequestId,
    StopCause,
    VmId,
    VmRecord,
    VmUuid,
    WatchdogReport,
)

# ---------------------------------------------------------------- agent link


NOT_DELIVERED = "not delivered"  # CommandCompleted.error prefix: the command never reached its host


@dataclass(frozen=True, slots=True)
class AgentConnected:
    """An agent said Hello and was accepted; host_id is resolved by the service (new uuids get a fresh id)."""

    host_id: HostId
    uuid: str
    name: str
    address: str
    capacity: HostCapacity
    boot_id: str
    watchdog: WatchdogReport = NO_WATCHDOG  # an agent that says nothing has no self-fence the manager counts on
    lease_manager: str = ""
    inventory: HostInventory = UNREPORTED  # storage, networks, free memory, reserve (an older agent: unreported)


@dataclass(frozen=True, slots=True)
class AgentHeard:
    """A known host's agent said Hello; its registration is under way (AgentConnected follows once it is stored).
    Under a reconnect storm (a restarted manager, thousands of agents) registering can take longer than a ping
    timeout: the agent spoke, so its host is alive from this arrival on, whatever the store takes."""

    host_id: HostId


@dataclass(frozen=True, slots=True)
class InventoryChanged:
    """An agent's storage, networks, free memory or reserve changed since it last said (or its Hello)."""

    host_id: HostId
    inventory: HostInventory


@dataclass(frozen=True, slots=True)
class HeartbeatReceived:
    host_id: HostId
    sequence: int
    hypervisor_connected: bool
    storage_ok: bool
    watchdog: WatchdogReport = NO_WATCHDOG


@dataclass(frozen=True, slots=True)
class AgentDisconnected:
    host_id: HostId
    planned: bool  # the agent said Goodbye: the host is not failing


@dataclass(frozen=True, slots=True)
class DomainReport:
    uuid: VmUuid
    name: str
    power: PowerState  # only POWER_ON or POWER_OFF come from agents
    cause: StopCause = StopCause.NONE
    # libvirt paused it for a migration (PAUSED / VIR_DOMAIN_PAUSED_MIGRATION, or the STARTED_MIGRATED and
    # SUSPENDED_MIGRATED events): the incoming copy on a target, or the source at switchover. Such a copy holds its
    # disks but runs no guest code: it is never a second running copy.
    migrating: bool = False
    paused: bool = False  # paused for any reason (PowerOn: it holds its disks); never a migration's running side


@dataclass(frozen=True, slots=True)
class PowerStateReported:
    host_id: HostId
    full: bool  # True: every domain of the host is listed; a registered VM that is absent is not running there
    hypervisor_connected: bool  # False: `domains` says nothing, power states become unknown
    domains: tuple[DomainReport, ...] = ()


@dataclass(frozen=True, slots=True)
class NeighborCheck:
    """A neighbour's view of a silent host: can it reach it, and how old is its storage heartbeat."""

    target_host_id: HostId
    tcp_reachable: bool
    icmp_reachable: bool | None  # None: ICMP could not be tried
    heartbeat_age_s: float | None  # None: no heartbeat file found


@dataclass(frozen=True, slots=True)
class LeaseCheck:
    """A neighbour's probe of a VM's disk leases (CheckLease): "held", "free" or "unknown", and what it saw."""

    vm_uuid: VmUuid
    state: Literal["held", "free", "unknown"]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class MigrationProgressed:
    """How far a MigrateVm has come, as the source's libvirt says (about once a second)."""

    host_id: HostId
    request_id: RequestId
    vm_uuid: VmUuid
    elapsed_s: float
    data_total_bytes: int
    data_processed_bytes: int
    data_remaining_bytes: int
    memory_iteration: int


@dataclass(frozen=True, slots=True)
class VmStartConfirmed:
    vm_uuid: VmUuid
    already_running: bool


@dataclass(frozen=True, slots=True)
class CommandCompleted:
    """An agent's answer to a command, or the transport's: an error starting with NOT_DELIVERED means the command never
    left the manager (no open stream to its host), so it certainly did nothing."""

    request_id: RequestId
    ok: bool
    error: str = ""
    payload: NeighborCheck | VmStartConfirmed | LeaseCheck | None = None


# ---------------------------------------------------------------- out-of-band management


@dataclass(frozen=True, slots=True)
class FenceCompleted:
    request_id: RequestId
    host_id: HostId
    ok: bool  # power off confirmed (already off counts)
    already_off: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class BmcPowerReported:
    request_id: RequestId
    host_id: HostId
    power: Literal["on", "off", "unknown"]  # "unknown": the BMC did not answer
    detail: str = ""


# ---------------------------------------------------------------- the driver


@dataclass(frozen=True, slots=True)
class CommandsDispatched:
    """The commands, fences and queries of an earlier batch left only now: the driver records a batch before it
    acts, and the store made it wait. Their deadlines (and the investigations waiting on them) count from now, so
    a slow database never turns into answers that "did not come" — a verdict without evidence."""

    request_ids: tuple[RequestId, ...]


@dataclass(frozen=True, slots=True)
class StoreRecovered:
    """The store commits again after `down_s` seconds in which it could not. While it was down the driver made no
    decision (nothing could be recorded) and agents may have failed to reconnect (registering needs the store):
    every host gets a fresh silence window before anyone is judged."""

    down_s: float


# ---------------------------------------------------------------- operator


@dataclass(frozen=True, slots=True)
class HostRegistered:
    host: HostRecord


@dataclass(frozen=True, slots=True)
class HostRemoved:
    host_id: HostId


@dataclass(frozen=True, slots=True)
class HostMaintenanceChanged:
    host_id: HostId
    on: bool


@dataclass(frozen=True, slots=True)
class HostEnabledChanged:
    """host disable / enable: a Disabled host takes no new VMs."""

    host_id: HostId
    enabled: bool


@dataclass(frozen=True, slots=True)
class VmMigrateRequested:
    """kvmha vm migrate VM [--to HOST]: target None lets placement choose."""

    vm_id: VmId
    target_host_id: HostId | None


@dataclass(frozen=True, slots=True)
class VmMigrationCancelRequested:
    """kvmha vm migrate VM --cancel."""

    vm_id: VmId


@dataclass(frozen=True, slots=True)
class HostBmcChanged:
    host_id: HostId
    has_bmc: bool


@dataclass(frozen=True, slots=True)
class HostConfirmedDown:
    """An operator (`by`) states that a silent host is powered off (`kvmha host confirm-down`): evidence for the
    investigation, which still refuses it when the host shows signs of life."""

    host_id: HostId
    by: str


@dataclass(frozen=True, slots=True)
class VmRegistered:
    vm: VmRecord


@dataclass(frozen=True, slots=True)
class VmStartRequested:
    vm_id: VmId


@dataclass(frozen=True, slots=True)
class VmStopRequested:
    vm_id: VmId


@dataclass(frozen=True, slots=True)
class VmDeleted:
    vm_id: VmId


@dataclass(frozen=True, slots=True)
class VmHaChanged:
    vm_id: VmId
    enabled: bool


@dataclass(frozen=True, slots=True)
class ConfigChanged:
    name: str
    value: str


Fact = (
    AgentConnected
    | AgentHeard
    | HeartbeatReceived
    | InventoryChanged
    | AgentDisconnected
    | PowerStateReported
    | CommandCompleted
    | MigrationProgressed
    | FenceCompleted
    | BmcPowerReported
    | CommandsDispatched
    | StoreRecovered
    | HostRegistered
    | HostRemoved
    | HostMaintenanceChanged
    | HostBmcChanged
    | HostConfirmedDown
    | HostEnabledChanged
    | VmMigrateRequested
    | VmMigrationCancelRequested
    | VmRegistered
    | VmStartRequested
    | VmStopRequested
    | VmDeleted
    | VmHaChanged
    | ConfigChanged
)
