"""The store port: what the manager keeps across restarts, as plain records in and plain commands out.

One unit of work is one transaction: ``with store.unit_of_work() as uow: ...; uow.commit()``; leaving the block
without commit undoes everything. Repositories hand out the core's records (kvmha.manager.core.model) or the small
frozen records below, never database rows, and take changes as commands (``save``, ``record_agent``, ``set_bmc``):
nothing above this port can edit a row behind the repository's back.

Two implementations keep the same contract (tests/db/test_repository.py runs on both): SQLAlchemy on SQLite,
PostgreSQL and MariaDB (adapters/repository.py), and the simulator's in-memory store (sim/memstore.py), which can
also fail or stall on demand.

Times in and out of this port are wall-clock seconds (`uow.now` is the wall clock when the transaction began): they
are read by other processes and by operators. The driver converts the core's monotonic times at its edge
(adapters/clock.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from kvmha.manager.core.model import HaWorkRecord, HostId, HostRecord, VmId, VmRecord, VmUuid


@dataclass(frozen=True, slots=True)
class BmcCredentials:
    address: str
    port: int
    user: str
    password: str

    def __repr__(self) -> str:
        return f"BmcCredentials(address={self.address!r}, port={self.port}, user={self.user!r}, password='***')"


@dataclass(frozen=True, slots=True)
class AgentInfo:
    """What an agent says about itself in its Hello (besides name, address and capacity, which the core keeps)."""

    agent_version: str = ""
    libvirt_version: str = ""
    qemu_version: str = ""
    boot_id: str = ""


@dataclass(frozen=True, slots=True)
class HostDetails:
    """A host as the operator sees it: the core's record plus what only the database keeps (no BMC password)."""

    host: HostRecord
    agent: AgentInfo
    manager_id: str | None
    bmc_address: str | None
    bmc_port: int | None


@dataclass(frozen=True, slots=True)
class EventRow:
    id: int
    at: float
    severity: str
    subject: str
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class ConfigRow:
    name: str
    value: str | None
    default_value: str
    description: str
    scope: str

    @property
    def effective(self) -> str:
        return self.default_value if self.value is None else self.value


class HostRepository(Protocol):
    def all(self) -> list[HostRecord]: ...
    def details(self, after_id: int = 0, limit: int | None = None) -> list[HostDetails]: ...  # by id
    def get(self, host_id: HostId) -> HostRecord | None: ...
    def find(self, ref: str) -> HostDetails | None:
        """A host by id, uuid or name."""
    def id_of(self, uuid: str) -> HostId | None: ...
    def ids_of(self, uuids: list[str]) -> dict[str, HostId]:
        """The stored hosts among these uuids, in one query (a registration's group of Hellos)."""
    def add(self, uuid: str, name: str, address: str, now: float) -> HostId: ...
    def save(self, record: HostRecord, now: float) -> None:
        """Store what the core decides about a host (status, name, address, capacity, last ping)."""
    def preload(self, host_ids: list[HostId]) -> None:
        """Read these hosts in one query ahead of saving them (a batch), instead of one query per save."""
    def record_agent(self, host_id: HostId, agent: AgentInfo, manager_id: str, now: float) -> bool:
        """Store what a (re)connecting agent says about itself; False when the host is not stored."""
    def set_bmc(self, host_id: HostId, credentials: BmcCredentials | None, now: float) -> None: ...
    def bmc(self, host_id: HostId) -> BmcCredentials | None: ...


class VmRepository(Protocol):
    def all(self, host_id: HostId | None = None, after_id: int = 0, limit: int | None = None) -> list[VmRecord]: ...
    def get(self, vm_id: VmId) -> VmRecord | None: ...
    def find(self, ref: str) -> VmRecord | None:
        """A VM by id, uuid or name."""
    def by_uuid(self, uuid: VmUuid | str) -> VmRecord | None: ...
    def add(self, record: VmRecord, now: float) -> VmRecord:
        """Insert a new VM with its own id (the manager numbers VMs)."""
    def upsert(self, record: VmRecord, now: float) -> None: ...
    def preload(self, vm_ids: list[VmId]) -> None:
        """Read these VMs in one query ahead of upserting them (a batch), instead of one query per upsert."""
    def running_by_host(self, host_ids: list[HostId]) -> dict[HostId, int]:
        """How many VMs are powered on on each of these hosts (one query for a listing page)."""
    def delete(self, vm_id: VmId) -> None:
        """The VM and its HA work."""
    def max_id(self, below: int | None = None) -> int: ...


class WorkRepository(Protocol):
    def all(self, active_only: bool = False) -> list[HaWorkRecord]: ...
    def save(self, record: HaWorkRecord, manager_id: str, now: float) -> None: ...
    def finished_since(self, since: float) -> list[HaWorkRecord]:
        """Items that ended (Done, Error, Cancelled) at or after `since`."""
    def max_id(self) -> int: ...
    def claim_active(self, manager_id: str, now: float, live_managers: Iterable[str]) -> list[HaWorkRecord]:
        """Take over the active items no live manager holds; return every active item this manager holds."""


class EventRepository(Protocol):
    def add(self, at: float, severity: str, subject: str, kind: str, message: str) -> int: ...
    def add_many(self, events: list[tuple[float, str, str, str, str]]) -> None:
        """(at, severity, subject, kind, message) each, in this order, in one statement (ids not returned)."""
    def all(self, after_id: int = 0, limit: int = 200, subject: str = "") -> list[EventRow]: ...
    def last_id(self) -> int: ...


class ConfigRepository(Protocol):
    def sync_defaults(self, specs: Iterable[tuple[str, str, str]], now: float) -> None:
        """Make the table list every known setting (name, default, description); operators' values are kept."""
    def all(self) -> list[ConfigRow]: ...
    def set(self, name: str, value: str | None, now: float) -> ConfigRow:
        """Raises KeyError for an unknown name."""


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """The lease over the hosts: the one manager that may act on them (investigate, fence, restart, write the
    records). `epoch` only grows: every acquisition takes one more than any before, so a command or record of an
    older epoch is recognisably stale. Times are the database's clock (seconds), never a manager's."""

    manager_id: str | None
    epoch: int
    expires_at: float
    acquired_at: float
    database_now: float  # the database's clock when the row was read: expiry is judged against it


@dataclass(frozen=True, slots=True)
class ManagerRow:
    """A manager as `kvmha manager list` shows it."""

    id: str
    address: str
    version: str
    started_at: float
    last_heartbeat_at: float  # wall clock of the manager's last lease renewal or store probe
    hosts_owned: int


class ManagerRepository(Protocol):
    def register(self, manager_id: str, address: str, version: str, now: float) -> None: ...
    def heartbeat(self, manager_id: str, now: float) -> None: ...
    def live(self, now: float, stale_after_s: float) -> list[str]: ...
    def acquire_lease(self, manager_id: str, lease_s: float) -> int | None:
        """Take the lease over the hosts when it is free, expired in database time, or this manager's own (a
        restart of the same manager): returns the new epoch, and every host is owned by this manager with it.
        None while another manager holds a lease that has not expired. One conditional update of one row, so two
        managers trying at the same instant cannot both win."""
    def renew_lease(self, manager_id: str, epoch: int, lease_s: float) -> bool:
        """Extend this manager's lease to the database's now + lease_s. False when the lease has moved on (another
        epoch: someone took the hosts over). An expired lease nobody took is renewed: nobody acted meanwhile."""
    def lease(self) -> LeaseRow | None: ...
    def all(self) -> list[ManagerRow]: ...


class UnitOfWork(Protocol):
    @property
    def now(self) -> float:
        """Wall-clock seconds when the transaction began."""
    @property
    def hosts(self) -> HostRepository: ...
    @property
    def vms(self) -> VmRepository: ...
    @property
    def works(self) -> WorkRepository: ...
    @property
    def events(self) -> EventRepository: ...
    @property
    def config(self) -> ConfigRepository: ...
    @property
    def managers(self) -> ManagerRepository: ...
    def commit(self) -> None: ...


class Store(Protocol):
    def unit_of_work(self) -> AbstractContextManager[UnitOfWork]: ...
