"""Operator operations: what the admin API (and the simulator's scripts) may ask of the manager, as functions over
the store port. No gRPC, no protobuf: the admin servicer translates requests into these calls and their results
(plain records) or `OperationError`s back into wire messages and status codes.

A change is an `Operation` (a function of one unit of work) run by the driver in order with the agents' facts
(`OperatorPort.run`), plus the operator facts derived from its result, which the core then handles; the call
returns once the core's reaction is recorded, so the caller reads its own writes. Reads (`OperatorPort.read`) run
outside that order: the driver records every change before it acts, so the store is current.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import uuid as uuid_module
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn, Protocol, TypeVar

from kvmha.manager.core import facts
from kvmha.manager.core.capacityplan import Headroom, PlannedVm
from kvmha.manager.core.config import ConfigError, CoreConfig
from kvmha.manager.core.model import HostId, HostRecord, HostStatus, PowerState, VmId, VmRecord, VmState
from kvmha.manager.core.powersync import UNMANAGED_ID_BASE
from kvmha.manager.store import BmcCredentials, ConfigRow, HostDetails, UnitOfWork

T = TypeVar("T")
Operation = Callable[[UnitOfWork], T]
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
ACTIVE_VM_STATES = (VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING)


class Refusal(enum.Enum):
    """Why an operation was refused; the admin API maps each to a gRPC status."""

    NOT_FOUND = "not found"
    INVALID = "invalid argument"
    ALREADY_EXISTS = "already exists"
    FAILED_PRECONDITION = "failed precondition"


class OperationError(Exception):
    def __init__(self, refusal: Refusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal


def refuse(refusal: Refusal, message: str) -> NoReturn:
    raise OperationError(refusal, message)


@dataclass(frozen=True, slots=True)
class LiveHosts:
    """What only the driver's memory knows about hosts: open agent streams, and each host's last ping (wall-clock
    seconds; the core does not store every ping, so the stored last_ping_at is only as new as its last save)."""

    connected: frozenset[HostId]
    last_ping_at: Mapping[HostId, float]


@dataclass(frozen=True, slots=True)
class FailurePlan:
    failed: tuple[str, ...]
    vms: tuple[PlannedVm, ...]
    headroom: tuple[Headroom, ...]
    admission_host_failures: int


class OperatorPort(Protocol):
    """What the admin API needs from the manager (implemented by ManagerService)."""

    async def run(self, operation: Operation[T], then: Callable[[T], Sequence[facts.Fact]] | None = None) -> T: ...
    async def read(self, operation: Operation[T]) -> T: ...
    def live_hosts(self) -> LiveHosts: ...
    def plan_failure(self, fail: Sequence[str]) -> FailurePlan:
        """What-if (core/capacityplan.py) on the live core; refuses unknown or non-Up hosts."""
    def admission(self, vm_ref: str, *, ha_on: bool = False) -> str:
        """'' when an operator start of the VM (`ha_on`: switching its HA on while it runs) passes admission
        control, else why it is refused."""
    @property
    def config_overrides(self) -> Mapping[str, str]:
        """manager.toml's [config] values: they win over the stored ones."""
    def on_events_recorded(self, listener: Callable[[], None]) -> None: ...
    @property
    def manager_id(self) -> str:
        """This manager's id (`manager list` marks the one that answered)."""


# ---------------------------------------------------------------------- lookups


def host(uow: UnitOfWork, ref: str) -> HostDetails:
    found = uow.hosts.find(ref) if ref else None
    if found is None:
        refuse(Refusal.NOT_FOUND, f"no host {ref!r} (give its id, uuid or name)")
    return found


def vm(uow: UnitOfWork, ref: str) -> VmRecord:
    found = uow.vms.find(ref) if ref else None
    if found is None:
        refuse(Refusal.NOT_FOUND, f"no VM {ref!r} (give its id, uuid or name)")
    return found


def vm_reason(uow: UnitOfWork, record: VmRecord) -> str:
    """Why the VM is where it is, for `kvmha vm show`: the newest of the core's events about the VM (placed on a
    flapping host, no host fits, crash loop, followed elsewhere, ...) and the reason of its latest HA work item (what
    scheduled it and how it ended)."""
    events = uow.events.all(0, 10_000, f"vm:{record.id}")
    last_event = events[-1] if events else None
    works = [w for w in uow.works.all() if w.vm_id == record.id]
    last_work = max(works, key=lambda w: (w.updated_at, w.id)) if works else None
    if last_work is not None and (last_event is None or last_work.updated_at >= last_event.at):
        return f"work {last_work.id}: {last_work.reason}"
    return last_event.message if last_event is not None else ""


# ---------------------------------------------------------------------- hosts


def maintenance(ref: str, on: bool) -> tuple[Operation[HostId], Callable[[HostId], list[facts.Fact]]]:
    return (lambda uow: host(uow, ref).host.id), (lambda host_id: [facts.HostMaintenanceChanged(host_id, on)])


def enabled(ref: str, on: bool) -> tuple[Operation[HostId], Callable[[HostId], list[facts.Fact]]]:
    """host enable / disable: a Disabled host takes no new VMs (its HA VMs stay protected: ha.disabled.hosts)."""
    return (lambda uow: host(uow, ref).host.id), (lambda host_id: [facts.HostEnabledChanged(host_id, on)])


def removable_host(ref: str) -> tuple[Operation[HostId], Callable[[HostId], list[facts.Fact]]]:
    """host remove: refused while VMs hold resources on it (move them off first: `host maintenance H on`)."""

    def check(uow: UnitOfWork) -> HostId:
        found = host(uow, ref).host
        busy = [vm.name for vm in uow.vms.all(found.id) if vm.state in (*ACTIVE_VM_STATES, VmState.UNMANAGED)]
        if busy:
            shown = ", ".join(sorted(busy)[:10]) + (" ..." if len(busy) > 10 else "")
            refuse(Refusal.FAILED_PRECONDITION, f"host {found.name} still runs {len(busy)} VMs ({shown}): "
                                                "put it in maintenance first, which moves them off")
        return found.id

    return check, lambda host_id: [facts.HostRemoved(host_id)]


def set_bmc(
    ref: str, credentials: BmcCredentials | None
) -> tuple[Operation[HostId], Callable[[HostId], list[facts.Fact]]]:
    """Configure (or with None, clear) a host's BMC; the core learns only whether it has one."""
    if credentials is not None and (not credentials.address or not 0 < credentials.port < 65536):
        refuse(Refusal.INVALID, "a BMC needs an address and a port between 1 and 65535")

    def store(uow: UnitOfWork) -> HostId:
        host_id = host(uow, ref).host.id
        uow.hosts.set_bmc(host_id, credentials, uow.now)
        uow.commit()
        return host_id

    return store, lambda host_id: [facts.HostBmcChanged(host_id, credentials is not None)]


CONFIRMABLE = (HostStatus.INVESTIGATING, HostStatus.ALERT)
MAX_CONFIRMER_CHARS = 128


def confirm_down(ref: str, by: str) -> tuple[Operation[HostId], Callable[[HostId], list[facts.Fact]]]:
    """An operator states that a silent host is powered off (admin role). Only for a host that is silent
    (Investigating or Alert: its agent does not report); `by` (who confirmed) goes into the events. The core takes it
    as evidence: a host that shows signs of life (fresh heartbeat, reached by a neighbour, BMC on) is not Down."""
    who = by.strip()[:MAX_CONFIRMER_CHARS]
    if not who:
        refuse(Refusal.INVALID, "confirm-down needs the name of whoever confirms")

    def check(uow: UnitOfWork) -> HostId:
        found = host(uow, ref).host
        if found.status not in CONFIRMABLE:
            refuse(Refusal.FAILED_PRECONDITION, f"host {found.name} is {found.status.value}: confirm-down is only "
                                                "for a silent host (Investigating or Alert) you know is powered off")
        return found.id

    return check, lambda host_id: [facts.HostConfirmedDown(host_id, who)]


def add_host(name: str, uuid: str, address: str) -> tuple[Operation[HostRecord], Callable[[HostRecord],
                                                                                        list[facts.Fact]]]:
    """Enrol a host before its agent connects (`kvmha host add`); its agent is then welcomed under this uuid."""
    if not _HOST_NAME.match(name):
        refuse(Refusal.INVALID, f"host name {name[:64]!r}: letters, digits, '.', '_' or '-' (at most 255)")
    try:
        canonical = str(uuid_module.UUID(uuid))
    except ValueError:
        refuse(Refusal.INVALID, f"--uuid {uuid[:64]!r} is not a UUID")
    if len(address) > 255 or any(ord(c) < 32 for c in address):
        refuse(Refusal.INVALID, "the address is not a host address")

    def store(uow: UnitOfWork) -> HostRecord:
        if uow.hosts.id_of(canonical) is not None:
            refuse(Refusal.ALREADY_EXISTS, f"a host with uuid {canonical} is already registered")
        if uow.hosts.find(name) is not None:
            refuse(Refusal.ALREADY_EXISTS, f"a host named {name!r} is already registered")
        record = uow.hosts.get(uow.hosts.add(canonical, name, address, uow.now))
        assert record is not None
        uow.commit()
        return record

    return store, lambda record: [facts.HostRegistered(record)]


# ---------------------------------------------------------------------- VMs


def register_vm(record: VmRecord, start: bool) -> tuple[Operation[VmRecord], Callable[[VmRecord], list[facts.Fact]]]:
    """Register a VM (or adopt the Unmanaged domain with its uuid); start it when asked and it is off."""

    def register(uow: UnitOfWork) -> VmRecord:
        same_name = uow.vms.find(record.name)
        if same_name is not None and same_name.uuid != record.uuid and same_name.name == record.name:
            refuse(Refusal.ALREADY_EXISTS, f"a VM named {record.name} is already registered "
                                           f"(uuid {same_name.uuid}); names must be unique")
        existing = uow.vms.by_uuid(record.uuid)
        if existing is not None and existing.state is not VmState.UNMANAGED:
            refuse(Refusal.ALREADY_EXISTS, f"a VM with uuid {record.uuid} is already registered ({existing.name})")
        if existing is not None:  # adopt a domain the agents reported: it keeps its host and power state
            state = VmState.RUNNING if existing.power_state is PowerState.POWER_ON else VmState.STOPPED
            return dataclasses.replace(record, id=existing.id, host_id=existing.host_id,
                                       power_state=existing.power_state, state=state)
        # Registered VMs are numbered below UNMANAGED_ID_BASE; the core numbers discovered domains above it. The
        # driver records every change before it runs an operation, so the store knows every id in use.
        return dataclasses.replace(record, id=VmId(uow.vms.max_id(below=UNMANAGED_ID_BASE) + 1))

    def then(registered: VmRecord) -> list[facts.Fact]:
        wanted: list[facts.Fact] = [facts.VmRegistered(registered)]
        if start and registered.state is VmState.STOPPED:
            wanted.append(facts.VmStartRequested(registered.id))
        return wanted

    return register, then


def managed_vm(ref: str) -> Operation[VmId]:
    """The id of a registered VM, for a start, stop or HA change (an Unmanaged one must be adopted first)."""

    def find(uow: UnitOfWork) -> VmId:
        found = vm(uow, ref)
        if found.state is VmState.UNMANAGED:
            refuse(Refusal.FAILED_PRECONDITION, f"VM {found.name} is unmanaged: register it with `kvmha vm create` "
                                                "(same uuid) to adopt it first")
        return found.id

    return find


def migratable_vm(
    ref: str, to: str | None
) -> tuple[Operation[tuple[VmId, HostId | None]], Callable[[tuple[VmId, HostId | None]], list[facts.Fact]]]:
    """vm migrate VM [--to HOST]: the VM must be Running; the core picks a target when none is given, checks
    that it is Up, Enabled and has room, and records why when it cannot (event operator.migrate)."""

    def check(uow: UnitOfWork) -> tuple[VmId, HostId | None]:
        found = vm(uow, ref)
        if found.state is not VmState.RUNNING:
            refuse(Refusal.FAILED_PRECONDITION, f"VM {found.name} is {found.state}: only a Running VM migrates")
        target = host(uow, to).host if to else None
        if target is not None and target.id == found.host_id:
            refuse(Refusal.INVALID, f"VM {found.name} already runs on {target.name}")
        return found.id, target.id if target is not None else None

    return check, lambda ids: [facts.VmMigrateRequested(ids[0], ids[1])]


def deletable_vm(ref: str) -> Operation[VmId]:
    def find(uow: UnitOfWork) -> VmId:
        found = vm(uow, ref)
        if found.state in ACTIVE_VM_STATES or found.power_state is PowerState.POWER_ON:
            refuse(Refusal.FAILED_PRECONDITION, f"VM {found.name} is {found.state} ({found.power_state}): "
                                                "stop it before deleting it")
        return found.id

    return find


# ---------------------------------------------------------------------- configuration


def set_config(
    name: str, value: str, overrides: Mapping[str, str]
) -> tuple[Operation[ConfigRow], Callable[[ConfigRow], list[facts.Fact]]]:
    def store(uow: UnitOfWork) -> ConfigRow:
        rows = {row.name: row.effective for row in uow.config.all()}
        if name not in rows:
            refuse(Refusal.NOT_FOUND, f"no setting named {name!r}")
        # The [config] table of manager.toml wins over the database: a value set here would not be used.
        if name in overrides:
            refuse(Refusal.FAILED_PRECONDITION,
                   f"{name} is set to {overrides[name]} in this manager's manager.toml ([config]), which wins over "
                   "`kvmha config set`: change it there")
        try:
            # Checked against the configuration in effect (file overrides included), which the core runs on.
            CoreConfig.from_mapping({**rows, name: value, **overrides})
        except ConfigError as error:
            refuse(Refusal.INVALID, str(error))
        row = uow.config.set(name, value, uow.now)
        uow.commit()
        return row

    return store, lambda row: [facts.ConfigChanged(row.name, row.effective)]
