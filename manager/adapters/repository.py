"""The store port (kvmha.manager.store) on SQLAlchemy: repositories and a unit of work over one session
(cosmicpython's shape).

The caller owns the transaction: ``with store.unit_of_work() as uow: ...; uow.commit()``; leaving the block without
commit rolls back. Repositories translate between database rows and the port's plain records; rows never leave this
module, so nothing above it sees SQLAlchemy or can change a column the repository did not mean to.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self, TypeVar

from sqlalchemy import Engine, delete, func, insert, or_, select, text, true, update
from sqlalchemy.orm import Session, sessionmaker

from kvmha.manager.adapters.db_models import (
    Configuration,
    Event,
    HaLease,
    HaWork,
    Host,
    IdHighWater,
    ManagerInstance,
    VmInstance,
)
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostCapacity,
    HostId,
    HostRecord,
    HostUuid,
    PowerState,
    VmId,
    VmRecord,
    VmUuid,
    WorkId,
    WorkStep,
)
from kvmha.manager.core.powersync import UNMANAGED_ID_BASE
from kvmha.manager.security.secrets import SecretBox, SecretError, is_sealed
from kvmha.manager.store import AgentInfo, BmcCredentials, ConfigRow, EventRow, HostDetails, LeaseRow, ManagerRow

log = logging.getLogger("kvmha.manager.repository")

_Row = TypeVar("_Row", Host, VmInstance)
ACTIVE_STEPS = [step for step in WorkStep if step.active]
LEASE_SCOPE = "hosts"  # one lease over every host (one acting manager); scopes could split them later
PRELOAD_CHUNK = 500  # ids per IN (...) query


class SqlHosts:
    def __init__(self, session: Session, secrets: SecretBox | None = None) -> None:
        self._session = session
        self._secrets = secrets  # BMC passwords sealed at rest (security/secrets.py); None: stored as given
        self._preloaded: list[Host] = []  # strong references: see preload
        self._owner_epochs: dict[str, int | None] = {}  # manager id -> its lease epoch, read once (record_agent)

    def all(self) -> list[HostRecord]:
        return [_host_record(row) for row in self._session.scalars(select(Host).order_by(Host.id))]

    def details(self, after_id: int = 0, limit: int | None = None) -> list[HostDetails]:
        query = select(Host).where(Host.id > after_id).order_by(Host.id).limit(limit)
        return [_host_details(row) for row in self._session.scalars(query)]

    def get(self, host_id: HostId) -> HostRecord | None:
        row = self._session.get(Host, host_id)
        return _host_record(row) if row is not None else None

    def find(self, ref: str) -> HostDetails | None:
        row = _find(self._session, Host, ref)
        return _host_details(row) if row is not None else None

    def id_of(self, uuid: str) -> HostId | None:
        found = self._session.scalar(select(Host.id).where(Host.uuid == uuid))
        return HostId(found) if found is not None else None

    def ids_of(self, uuids: list[str]) -> dict[str, HostId]:
        found: dict[str, HostId] = {}
        for first in range(0, len(uuids), PRELOAD_CHUNK):
            query = select(Host.uuid, Host.id).where(Host.uuid.in_(uuids[first:first + PRELOAD_CHUNK]))
            found.update((uuid, HostId(host_id)) for uuid, host_id in self._session.execute(query))
        return found

    def add(self, uuid: str, name: str, address: str, now: float) -> HostId:
        row = Host(uuid=uuid, name=name, address=address, created_at=now, updated_at=now)
        self._session.add(row)
        self._session.flush()
        self._preloaded.append(row)  # the registration records its agent next: found without a query
        return HostId(row.id)

    def save(self, record: HostRecord, now: float) -> None:
        row = self._session.get(Host, record.id)
        if row is None:
            raise LookupError(f"host {record.id} is not in the database")
        row.name, row.address, row.status = record.name, record.address, record.status
        row.resource_state, row.role = record.resource_state, record.role
        row.cpus, row.memory_mib = record.capacity.cpus, record.capacity.memory_mib
        row.last_ping_at, row.updated_at = record.last_ping_at, now
        row.watchdog_timeout_s, row.watchdog_detail = record.watchdog_timeout_s, record.watchdog_detail[:255]
        row.lease_manager = record.lease_manager[:32]

    def preload(self, host_ids: list[HostId]) -> None:
        """Into the session's identity map: the saves that follow find their rows there without a query each. The
        rows are kept here: the identity map holds unchanged rows weakly, and would drop them at once."""
        for first in range(0, len(host_ids), PRELOAD_CHUNK):
            chunk = host_ids[first:first + PRELOAD_CHUNK]
            self._preloaded += self._session.scalars(select(Host).where(Host.id.in_(chunk))).all()

    def record_agent(self, host_id: HostId, agent: AgentInfo, manager_id: str, now: float) -> bool:
        row = self._session.get(Host, host_id)
        if row is None:
            return False
        row.agent_version, row.libvirt_version = agent.agent_version[:64], agent.libvirt_version[:64]
        row.qemu_version, row.boot_id = agent.qemu_version[:64], agent.boot_id[:64]
        row.manager_id, row.updated_at = manager_id, now
        # The owner's epoch with it (NULL when the manager holds no lease: only a lease holder accepts agents), read
        # once per transaction: a registration records hundreds of agents. Written with the transaction's flush.
        if manager_id not in self._owner_epochs:
            self._owner_epochs[manager_id] = self._session.scalar(
                select(HaLease.epoch).where(HaLease.scope == LEASE_SCOPE, HaLease.manager_id == manager_id))
        row.owner_epoch = self._owner_epochs[manager_id]
        return True

    def set_bmc(self, host_id: HostId, credentials: BmcCredentials | None, now: float) -> None:
        row = self._session.get(Host, host_id)
        if row is None:
            raise LookupError(f"host {host_id} is not in the database")
        if credentials is None:
            row.bmc_address = row.bmc_port = row.bmc_user = row.bmc_password = None
        else:
            row.bmc_address, row.bmc_port = credentials.address, credentials.port
            row.bmc_user = credentials.user
            row.bmc_password = self._secrets.seal(credentials.password) if self._secrets else credentials.password
        row.updated_at = now
        self._session.flush()

    def bmc(self, host_id: HostId) -> BmcCredentials | None:
        row = self._session.get(Host, host_id)
        if row is None or not row.bmc_address:
            return None
        password = row.bmc_password or ""
        if self._secrets is not None:
            try:
                password = self._secrets.open(password)
            except SecretError as error:
                # Fencing then fails with an authentication error and says so; the host keeps its BMC.
                log.error("event=bmc_password_unreadable host_id=%s error=%s", host_id, error)
                password = ""
        return BmcCredentials(row.bmc_address, row.bmc_port or 623, row.bmc_user or "", password)

    def seal_stored_passwords(self) -> int:
        """Encrypt BMC passwords stored before encryption (or by a manager without a key); how many were sealed."""
        if self._secrets is None:
            return 0
        sealed = 0
        for row in self._session.scalars(select(Host).where(Host.bmc_password.is_not(None))):
            if row.bmc_password is not None and not is_sealed(row.bmc_password):
                row.bmc_password = self._secrets.seal(row.bmc_password)
                sealed += 1
        self._session.flush()
        return sealed


class SqlVms:
    def __init__(self, session: Session) -> None:
        self._session = session
        self._missing: set[int] = set()  # preloaded ids without a row (see preload)
        self._preloaded: list[VmInstance] = []  # strong references: the identity map holds unchanged rows weakly

    def all(self, host_id: HostId | None = None, after_id: int = 0, limit: int | None = None) -> list[VmRecord]:
        query = select(VmInstance).where(VmInstance.id > after_id).order_by(VmInstance.id).limit(limit)
        if host_id is not None:
            query = query.where(VmInstance.host_id == host_id)
        return [_vm_record(row) for row in self._session.scalars(query)]

    def preload(self, vm_ids: list[VmId]) -> None:
        """Into the session's identity map: the upserts that follow find their rows there, or know there is none
        (a new VM), without a query each."""
        for first in range(0, len(vm_ids), PRELOAD_CHUNK):
            chunk = vm_ids[first:first + PRELOAD_CHUNK]
            self._preloaded += self._session.scalars(select(VmInstance).where(VmInstance.id.in_(chunk))).all()
        found = {row.id for row in self._preloaded}
        self._missing = {vm_id for vm_id in vm_ids if vm_id not in found}

    def running_by_host(self, host_ids: list[HostId]) -> dict[HostId, int]:
        counts = dict.fromkeys(host_ids, 0)
        query = (select(VmInstance.host_id, func.count()).where(VmInstance.host_id.in_(host_ids),
                                                                VmInstance.power_state == PowerState.POWER_ON)
                 .group_by(VmInstance.host_id))
        for host_id, count in self._session.execute(query):
            if host_id is not None:
                counts[HostId(host_id)] = int(count)
        return counts

    def get(self, vm_id: VmId) -> VmRecord | None:
        row = self._session.get(VmInstance, vm_id)
        return _vm_record(row) if row is not None else None

    def find(self, ref: str) -> VmRecord | None:
        row = _find(self._session, VmInstance, ref)
        return _vm_record(row) if row is not None else None

    def by_uuid(self, uuid: VmUuid | str) -> VmRecord | None:
        row = self._session.scalars(select(VmInstance).where(VmInstance.uuid == uuid)).one_or_none()
        return _vm_record(row) if row is not None else None

    def add(self, record: VmRecord, now: float) -> VmRecord:
        if record.id <= 0:
            raise ValueError("a VM needs an id before it is stored")
        row = VmInstance(id=record.id, uuid=record.uuid, name=record.name, created_at=now, updated_at=now)
        _copy_vm(record, row, now)
        self._session.add(row)
        self._session.flush()
        return _vm_record(row)

    def upsert(self, record: VmRecord, now: float) -> None:
        """Update, or insert with the record's own id (the core numbers the unmanaged VMs it discovers)."""
        if record.id in self._missing:
            # Preloaded and not there: a new VM, inserted with the batch's other new VMs in one statement when
            # the session flushes (before any query, and at the commit), instead of a round trip each.
            self._missing.discard(record.id)
            new = VmInstance(id=record.id, uuid=record.uuid, created_at=now)
            _copy_vm(record, new, now)
            self._session.add(new)
            return
        row = self._session.get(VmInstance, record.id)
        if row is None:
            row = VmInstance(id=record.id, uuid=record.uuid, created_at=now)
            self._session.add(row)
        _copy_vm(record, row, now)
        self._session.flush()

    def max_id(self, below: int | None = None) -> int:
        """The highest VM id ever given out (below `below`), deleted VMs included."""
        query = select(func.coalesce(func.max(VmInstance.id), 0))
        if below is not None:
            query = query.where(VmInstance.id < below)
        kinds = [VM_KIND] if below is not None and below <= UNMANAGED_ID_BASE else [VM_KIND, VM_UNMANAGED_KIND]
        return max(int(self._session.scalar(query) or 0), *(_high_water(self._session, k) for k in kinds))

    def delete(self, vm_id: VmId) -> None:
        last_work = self._session.scalar(select(func.max(HaWork.id)).where(HaWork.instance_id == vm_id))
        _raise_high_water(self._session, VM_KIND if vm_id < UNMANAGED_ID_BASE else VM_UNMANAGED_KIND, vm_id)
        if last_work is not None:
            _raise_high_water(self._session, WORK_KIND, int(last_work))
        self._session.execute(delete(HaWork).where(HaWork.instance_id == vm_id))
        self._session.execute(delete(VmInstance).where(VmInstance.id == vm_id))


VM_KIND, VM_UNMANAGED_KIND, WORK_KIND = "vm", "vm.unmanaged", "work"


def _high_water(session: Session, kind: str) -> int:
    row = session.get(IdHighWater, kind)
    return 0 if row is None else int(row.high)


def _raise_high_water(session: Session, kind: str, used: int) -> None:
    """Only the lease holder deletes (through its driver), so read-then-write in its transaction is enough."""
    row = session.get(IdHighWater, kind)
    if row is None:
        session.add(IdHighWater(kind=kind, high=used))
    elif row.high < used:
        row.high = used


class SqlWorks:
    def __init__(self, session: Session) -> None:
        self._session = session

    def all(self, active_only: bool = False) -> list[HaWorkRecord]:
        query = select(HaWork).order_by(HaWork.id)
        if active_only:
            query = query.where(HaWork.step.in_(ACTIVE_STEPS))
        return [_work_record(row) for row in self._session.scalars(query)]

    def save(self, record: HaWorkRecord, manager_id: str, now: float) -> None:
        """Insert or update (the core allocates work ids); the active marker follows type and step."""
        row = self._session.get(HaWork, record.id)
        if row is None:
            row = HaWork(id=record.id, instance_id=record.vm_id, created_at=record.created_at or now)
            self._session.add(row)
        row.type, row.step, row.host_id = record.type, record.step, record.host_id
        row.target_host_id = record.target_host_id
        row.previous_state, row.vm_update_count = record.previous_state, record.vm_update_count
        row.tried, row.time_to_try_at, row.reason = record.tried, record.time_to_try_at, record.reason[:4000]
        row.updated_at = now
        row.active_instance_id = HaWork.active_key(record.vm_id, record.type, record.step)
        if record.step.active:
            row.taken_by, row.taken_at = manager_id, record.taken_at or now
        self._session.flush()

    def finished_since(self, since: float) -> list[HaWorkRecord]:
        query = select(HaWork).where(HaWork.step.not_in(ACTIVE_STEPS), HaWork.updated_at >= since)
        return [_work_record(row) for row in self._session.scalars(query.order_by(HaWork.id))]

    def max_id(self) -> int:
        """The highest work id ever given out, work of deleted VMs included."""
        stored = int(self._session.scalar(select(func.coalesce(func.max(HaWork.id), 0))) or 0)
        return max(stored, _high_water(self._session, WORK_KIND))

    def claim_active(self, manager_id: str, now: float, live_managers: Iterable[str]) -> list[HaWorkRecord]:
        """Take over the active items that no live manager holds, and return every item this manager holds.

        Row locks with SKIP LOCKED (PostgreSQL, MariaDB) make two managers claiming at once take disjoint sets;
        SQLite has one writer at a time, which gives the same guarantee.
        """
        others = [m for m in live_managers if m != manager_id]
        free = (
            select(HaWork)
            .where(HaWork.step.in_(ACTIVE_STEPS))
            .where(or_(HaWork.taken_by.is_(None), HaWork.taken_by.not_in(others) if others else true()))
            .with_for_update(skip_locked=True)
        )
        claimed = list(self._session.scalars(free))
        for row in claimed:
            row.taken_by, row.taken_at = manager_id, now
        self._session.flush()
        mine = select(HaWork).where(HaWork.step.in_(ACTIVE_STEPS), HaWork.taken_by == manager_id)
        return [_work_record(row) for row in self._session.scalars(mine.order_by(HaWork.id))]


class SqlEvents:
    def __init__(self, session: Session) -> None:
        self._session = session

    def add(self, at: float, severity: str, subject: str, kind: str, message: str) -> int:
        row = Event(at=at, severity=severity[:16], subject=subject[:64], kind=kind[:64], message=message)
        self._session.add(row)
        self._session.flush()
        return row.id

    def add_many(self, events: list[tuple[float, str, str, str, str]]) -> None:
        if events:  # one multi-row INSERT (a ramp's batch records hundreds), not a flush and a round trip each
            self._session.execute(insert(Event), [
                {"at": at, "severity": severity[:16], "subject": subject[:64], "kind": kind[:64], "message": message}
                for at, severity, subject, kind, message in events])

    def all(self, after_id: int = 0, limit: int = 200, subject: str = "") -> list[EventRow]:
        query = select(Event).where(Event.id > after_id)
        if subject:
            query = query.where(Event.subject == subject)
        rows = self._session.scalars(query.order_by(Event.id).limit(limit))
        return [EventRow(r.id, r.at, r.severity, r.subject, r.kind, r.message) for r in rows]

    def last_id(self) -> int:
        return int(self._session.scalar(select(func.coalesce(func.max(Event.id), 0))) or 0)


class SqlConfig:
    def __init__(self, session: Session) -> None:
        self._session = session

    def sync_defaults(self, specs: Iterable[tuple[str, str, str]], now: float) -> None:
        """Make the table list every known setting with its current default; operators' values are kept."""
        for name, default, description in specs:
            row = self._session.get(Configuration, name)
            if row is None:
                self._session.add(Configuration(name=name, value=None, default_value=default,
                                                description=description, updated_at=now))
            else:
                row.default_value, row.description = default, description
        self._session.flush()

    def all(self) -> list[ConfigRow]:
        rows = self._session.scalars(select(Configuration).order_by(Configuration.name))
        return [ConfigRow(r.name, r.value, r.default_value, r.description, r.scope) for r in rows]

    def set(self, name: str, value: str | None, now: float) -> ConfigRow:
        row = self._session.get(Configuration, name)
        if row is None:
            raise KeyError(name)
        row.value, row.updated_at = value, now
        self._session.flush()
        return ConfigRow(row.name, row.value, row.default_value, row.description, row.scope)


class SqlManagers:
    def __init__(self, session: Session, wall: Callable[[], float]) -> None:
        self._session, self._wall = session, wall

    def register(self, manager_id: str, address: str, version: str, now: float) -> None:
        row = self._session.get(ManagerInstance, manager_id)
        if row is None:
            self._session.add(ManagerInstance(id=manager_id, address=address, version=version, started_at=now,
                                              last_heartbeat_at=now))
        else:
            row.address, row.version, row.started_at, row.last_heartbeat_at = address, version, now, now
        self._session.flush()

    def heartbeat(self, manager_id: str, now: float) -> None:
        self._session.execute(
            update(ManagerInstance).where(ManagerInstance.id == manager_id).values(last_heartbeat_at=now)
        )

    def live(self, now: float, stale_after_s: float) -> list[str]:
        query = select(ManagerInstance.id).where(ManagerInstance.last_heartbeat_at >= now - stale_after_s)
        return list(self._session.scalars(query))

    def acquire_lease(self, manager_id: str, lease_s: float) -> int | None:
        now = self._database_now()
        if self._session.get(HaLease, LEASE_SCOPE) is None:
            # The first manager ever: the row appears once (two at once: one insert fails and is retried).
            self._session.add(HaLease(scope=LEASE_SCOPE, manager_id=None, epoch=0, expires_at=0.0, acquired_at=0.0))
            self._session.flush()
        taken = self._session.execute(
            update(HaLease)
            .where(HaLease.scope == LEASE_SCOPE,
                   or_(HaLease.manager_id.is_(None), HaLease.manager_id == manager_id, HaLease.expires_at < now))
            .values(manager_id=manager_id, epoch=HaLease.epoch + 1, expires_at=now + lease_s, acquired_at=now)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(taken) != 1:
            return None
        epoch = int(self._session.scalar(select(HaLease.epoch).where(HaLease.scope == LEASE_SCOPE)) or 0)
        self._session.execute(update(Host).values(manager_id=manager_id, owner_epoch=epoch)
                              .execution_options(synchronize_session=False))
        self.heartbeat(manager_id, self._wall())
        return epoch

    def renew_lease(self, manager_id: str, epoch: int, lease_s: float) -> bool:
        now = self._database_now()
        renewed = self._session.execute(
            update(HaLease)
            .where(HaLease.scope == LEASE_SCOPE, HaLease.manager_id == manager_id, HaLease.epoch == epoch)
            .values(expires_at=now + lease_s)
            .execution_options(synchronize_session=False)
        )
        if _rowcount(renewed) != 1:
            return False
        self.heartbeat(manager_id, self._wall())
        return True

    def lease(self) -> LeaseRow | None:
        row = self._session.get(HaLease, LEASE_SCOPE)
        if row is None:
            return None
        return LeaseRow(row.manager_id, row.epoch, row.expires_at, row.acquired_at, self._database_now())

    def all(self) -> list[ManagerRow]:
        owned = {str(manager_id): int(count) for manager_id, count in self._session.execute(
            select(Host.manager_id, func.count()).where(Host.manager_id.is_not(None)).group_by(Host.manager_id)
        )}
        rows = self._session.scalars(select(ManagerInstance).order_by(ManagerInstance.id))
        return [ManagerRow(r.id, r.address, r.version, r.started_at, r.last_heartbeat_at, int(owned.get(r.id, 0)))
                for r in rows]

    def _database_now(self) -> float:
        """The database's clock: leases are judged on one clock, whichever manager reads them. (SQLite is one
        process's file on one machine: its clock is that machine's.)"""
        dialect = self._session.get_bind().dialect.name
        if dialect == "postgresql":
            return float(self._session.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
        if dialect in ("mysql", "mariadb"):
            return float(self._session.scalar(text("SELECT UNIX_TIMESTAMP(SYSDATE(6))")))
        return self._wall()


def _rowcount(result: object) -> int:
    """Rows an UPDATE matched (the MySQL dialect asks for found rows, not changed ones)."""
    return int(getattr(result, "rowcount", 0))


class SqlUnitOfWork:
    """One transaction; the repositories share its session."""

    def __init__(self, session_factory: sessionmaker[Session], wall: Callable[[], float],
                 secrets: SecretBox | None = None) -> None:
        self._factory, self._wall, self._secrets = session_factory, wall, secrets

    def __enter__(self) -> Self:
        self.now = self._wall()
        self.session = self._factory()
        self.hosts = SqlHosts(self.session, self._secrets)
        self.vms = SqlVms(self.session)
        self.works = SqlWorks(self.session)
        self.events = SqlEvents(self.session)
        self.config = SqlConfig(self.session)
        self.managers = SqlManagers(self.session, self._wall)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.session.rollback()  # no-op after commit; undoes everything otherwise
        self.session.close()

    def commit(self) -> None:
        self.session.commit()


class SqlStore:
    """The store port on SQLAlchemy (SQLite, PostgreSQL, MariaDB)."""

    def __init__(self, engine: Engine, wall: Callable[[], float] = time.time,
                 secrets: SecretBox | None = None) -> None:
        self.engine = engine
        self._factory = sessionmaker(engine, expire_on_commit=False)
        self._wall = wall
        self._secrets = secrets

    def unit_of_work(self) -> SqlUnitOfWork:
        return SqlUnitOfWork(self._factory, self._wall, self._secrets)


def _find(session: Session, model: type[_Row], ref: str) -> _Row | None:
    ref = ref.strip()
    if ref.isdigit():
        found = session.get(model, int(ref))
        if found is not None:
            return found
    by_uuid = session.scalars(select(model).where(model.uuid == ref)).one_or_none()
    if by_uuid is not None:
        return by_uuid
    return session.scalars(select(model).where(model.name == ref).order_by(model.id).limit(1)).one_or_none()


def _host_record(row: Host) -> HostRecord:
    return HostRecord(
        id=HostId(row.id), uuid=HostUuid(row.uuid), name=row.name, address=row.address, status=row.status,
        resource_state=row.resource_state, role=row.role,
        capacity=HostCapacity(cpus=row.cpus, memory_mib=row.memory_mib), last_ping_at=row.last_ping_at,
        has_bmc=bool(row.bmc_address), watchdog_timeout_s=row.watchdog_timeout_s,
        watchdog_detail=row.watchdog_detail or "", lease_manager=row.lease_manager or "",
    )


def _host_details(row: Host) -> HostDetails:
    agent = AgentInfo(row.agent_version, row.libvirt_version, row.qemu_version, row.boot_id)
    return HostDetails(_host_record(row), agent, row.manager_id, row.bmc_address, row.bmc_port)


def _vm_record(row: VmInstance) -> VmRecord:
    return VmRecord(
        id=VmId(row.id), uuid=VmUuid(row.uuid), name=row.name, state=row.state, power_state=row.power_state,
        power_state_updated_at=row.power_state_updated_at,
        host_id=HostId(row.host_id) if row.host_id is not None else None,
        last_host_id=HostId(row.last_host_id) if row.last_host_id is not None else None,
        ha_enabled=row.ha_enabled, restart_priority=row.restart_priority,
        anti_affinity_group=row.anti_affinity_group, memory_mib=row.memory_mib, vcpus=row.vcpus,
        domain_xml=row.domain_xml, update_count=row.update_count,
    )


def _copy_vm(record: VmRecord, row: VmInstance, now: float) -> None:
    row.name, row.state, row.power_state = record.name, record.state, record.power_state
    row.power_state_updated_at, row.host_id, row.last_host_id = (
        record.power_state_updated_at, record.host_id, record.last_host_id,
    )
    row.ha_enabled, row.restart_priority = record.ha_enabled, record.restart_priority
    row.anti_affinity_group, row.domain_xml = record.anti_affinity_group, record.domain_xml
    row.memory_mib, row.vcpus, row.update_count = record.memory_mib, record.vcpus, record.update_count
    row.updated_at = now


def _work_record(row: HaWork) -> HaWorkRecord:
    return HaWorkRecord(
        id=WorkId(row.id), vm_id=VmId(row.instance_id), type=row.type, step=row.step,
        host_id=HostId(row.host_id) if row.host_id is not None else None, previous_state=row.previous_state,
        vm_update_count=row.vm_update_count, tried=row.tried, time_to_try_at=row.time_to_try_at,
        reason=row.reason, created_at=row.created_at, updated_at=row.updated_at, taken_by=row.taken_by,
        taken_at=row.taken_at,
        target_host_id=HostId(row.target_host_id) if row.target_host_id is not None else None,
    )
