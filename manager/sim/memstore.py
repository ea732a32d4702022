"""The store port in memory, for the simulator: the same contract as the SQL store (tests/db/test_repository.py
runs on both), transactions that really roll back, and the database's own guards (one active HA item per VM,
unique uuids), so a driver bug that the database would refuse is refused here too.

A unit of work changes the tables in place and keeps an undo log; leaving it without commit undoes every change in
reverse. The simulator is single-threaded, so there is no isolation to provide. Records are copied in and out: no
caller holds a reference into the tables.

Faults on demand (the simulator's `database` commands, storms): `down` makes every transaction fail as a lost
connection would; `stalled_until` makes every transaction wait until then (simulated time; see sim/env.py).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self, TypeVar

from kvmha.manager.core.model import (
    HaWorkRecord,
    HostId,
    HostRecord,
    HostUuid,
    PowerState,
    VmId,
    VmRecord,
    VmUuid,
    WorkId,
    WorkType,
)
from kvmha.manager.core.powersync import UNMANAGED_ID_BASE
from kvmha.manager.store import AgentInfo, BmcCredentials, ConfigRow, EventRow, HostDetails, LeaseRow, ManagerRow

LEASE_SCOPE = "hosts"


class StoreError(RuntimeError):
    """What a database error would be: the transaction did not happen."""


@dataclass(slots=True)
class _Host:
    record: HostRecord
    agent: AgentInfo = field(default_factory=AgentInfo)
    manager_id: str | None = None
    bmc: BmcCredentials | None = None


@dataclass(slots=True)
class _Manager:
    address: str
    version: str
    started_at: float
    last_heartbeat_at: float


@dataclass(slots=True)
class Tables:
    hosts: dict[HostId, _Host] = field(default_factory=dict)
    vms: dict[VmId, VmRecord] = field(default_factory=dict)
    works: dict[WorkId, HaWorkRecord] = field(default_factory=dict)
    events: list[EventRow] = field(default_factory=list)
    config: dict[str, ConfigRow] = field(default_factory=dict)
    managers: dict[str, _Manager] = field(default_factory=dict)
    leases: dict[str, LeaseRow] = field(default_factory=dict)  # scope -> the lease (one scope today: "hosts")
    high_water: dict[str, int] = field(default_factory=dict)  # the SQL store's id_high_water: ids of deleted rows
    # Indexes, kept with the tables (and undone with them): a 100,000-VM world is seeded and queried in O(1).
    host_by_uuid: dict[str, HostId] = field(default_factory=dict)
    vm_by_uuid: dict[str, VmId] = field(default_factory=dict)
    active_work_by_vm: dict[VmId, WorkId] = field(default_factory=dict)


K = TypeVar("K")
V = TypeVar("V")


class MemoryStore:
    def __init__(self, wall: Callable[[], float]) -> None:
        self.tables = Tables()
        self.wall = wall
        self.down = False
        self.stalled_until = 0.0
        self.commits = 0
        # Called after each commit with the events it added (the simulator's log is what was recorded).
        self.event_listeners: list[Callable[[list[EventRow]], None]] = []

    def unit_of_work(self) -> MemoryUnitOfWork:
        if self.down:
            raise StoreError("database unreachable (simulated outage)")
        return MemoryUnitOfWork(self)


class MemoryUnitOfWork:
    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self._undo: list[Callable[[], None]] = []
        self._new_events: list[EventRow] = []

    def __enter__(self) -> Self:
        self.now = self._store.wall()
        t = self._store.tables
        self.hosts = MemoryHosts(t, self._undo)
        self.vms = MemoryVms(t, self._undo)
        self.works = MemoryWorks(t, self._undo)
        self.events = MemoryEvents(t, self._undo, self._new_events)
        self.config = MemoryConfig(t, self._undo)
        self.managers = MemoryManagers(t, self._undo, self._store.wall)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        for undo in reversed(self._undo):  # nothing left after a commit
            undo()
        self._undo.clear()
        self._new_events.clear()

    def commit(self) -> None:
        self._undo.clear()
        self._store.commits += 1
        added, self._new_events[:] = list(self._new_events), []
        for listener in list(self._store.event_listeners):
            listener(added)


def _set(table: dict[K, V], key: K, value: V, undo: list[Callable[[], None]]) -> None:
    if key in table:
        old = table[key]
        undo.append(lambda: table.__setitem__(key, old))
    else:
        undo.append(lambda: table.__delitem__(key))
    table[key] = value


def _delete(table: dict[K, V], key: K, undo: list[Callable[[], None]]) -> None:
    if key in table:
        old = table.pop(key)
        undo.append(lambda: table.__setitem__(key, old))


def _by_ref(items: Iterable[tuple[int, str, str]], ref: str) -> int | None:
    """id, uuid or name (the lowest id of that name), as the SQL store's find."""
    ref = ref.strip()
    rows = sorted(items)
    if ref.isdigit():
        for row_id, _, _ in rows:
            if row_id == int(ref):
                return row_id
    for getter in (1, 2):
        for row in rows:
            if row[getter] == ref:
                return row[0]
    return None


class MemoryHosts:
    def __init__(self, tables: Tables, undo: list[Callable[[], None]]) -> None:
        self._t, self._undo = tables, undo

    def preload(self, host_ids: list[HostId]) -> None:
        pass  # in memory: nothing to read ahead

    def _put(self, host_id: HostId, row: _Host) -> None:
        _set(self._t.hosts, host_id, row, self._undo)

    def all(self) -> list[HostRecord]:
        return [copy.copy(self._t.hosts[h].record) for h in sorted(self._t.hosts)]

    def details(self, after_id: int = 0, limit: int | None = None) -> list[HostDetails]:
        return [_details(self._t.hosts[h]) for h in sorted(self._t.hosts) if h > after_id][:limit]

    def get(self, host_id: HostId) -> HostRecord | None:
        row = self._t.hosts.get(host_id)
        return copy.copy(row.record) if row else None

    def find(self, ref: str) -> HostDetails | None:
        found = _by_ref(((h, r.record.uuid, r.record.name) for h, r in self._t.hosts.items()), ref)
        return _details(self._t.hosts[HostId(found)]) if found is not None else None

    def id_of(self, uuid: str) -> HostId | None:
        return self._t.host_by_uuid.get(uuid)

    def ids_of(self, uuids: list[str]) -> dict[str, HostId]:
        return {uuid: self._t.host_by_uuid[uuid] for uuid in uuids if uuid in self._t.host_by_uuid}

    def add(self, uuid: str, name: str, address: str, now: float) -> HostId:
        if self.id_of(uuid) is not None:
            raise StoreError(f"duplicate host uuid {uuid}")
        host_id = HostId(len(self._t.hosts) + 1)  # hosts are never deleted: ids are 1..n
        self._put(host_id, _Host(HostRecord(host_id, HostUuid(uuid), name, address)))
        _set(self._t.host_by_uuid, uuid, host_id, self._undo)
        return host_id

    def save(self, record: HostRecord, now: float) -> None:
        row = self._t.hosts.get(record.id)
        if row is None:
            raise LookupError(f"host {record.id} is not in the database")
        stored = copy.copy(record)
        stored.has_bmc = row.bmc is not None  # the BMC column is the operator's, not the core's
        self._put(record.id, _Host(stored, row.agent, row.manager_id, row.bmc))

    def record_agent(self, host_id: HostId, agent: AgentInfo, manager_id: str, now: float) -> bool:
        row = self._t.hosts.get(host_id)
        if row is None:
            return False
        self._put(host_id, _Host(row.record, agent, manager_id, row.bmc))
        return True

    def set_bmc(self, host_id: HostId, credentials: BmcCredentials | None, now: float) -> None:
        row = self._t.hosts.get(host_id)
        if row is None:
            raise LookupError(f"host {host_id} is not in the database")
        record = copy.copy(row.record)
        record.has_bmc = credentials is not None
        self._put(host_id, _Host(record, row.agent, row.manager_id, credentials))

    def bmc(self, host_id: HostId) -> BmcCredentials | None:
        row = self._t.hosts.get(host_id)
        return row.bmc if row else None


def _details(row: _Host) -> HostDetails:
    bmc = row.bmc
    return HostDetails(copy.copy(row.record), row.agent, row.manager_id, bmc.address if bmc else None,
                       bmc.port if bmc else None)


class MemoryVms:
    def __init__(self, tables: Tables, undo: list[Callable[[], None]]) -> None:
        self._t, self._undo = tables, undo

    def all(self, host_id: HostId | None = None, after_id: int = 0, limit: int | None = None) -> list[VmRecord]:
        vms = self._t.vms
        found = [v for v in sorted(vms) if v > after_id and (host_id is None or vms[v].host_id == host_id)]
        return [copy.copy(vms[v]) for v in found[:limit]]

    def preload(self, vm_ids: list[VmId]) -> None:
        pass  # in memory: nothing to read ahead

    def running_by_host(self, host_ids: list[HostId]) -> dict[HostId, int]:
        wanted, counts = set(host_ids), dict.fromkeys(host_ids, 0)
        for vm in self._t.vms.values():
            if vm.host_id in wanted and vm.power_state is PowerState.POWER_ON:
                counts[vm.host_id] += 1
        return counts

    def get(self, vm_id: VmId) -> VmRecord | None:
        vm = self._t.vms.get(vm_id)
        return copy.copy(vm) if vm else None

    def find(self, ref: str) -> VmRecord | None:
        found = _by_ref(((v, r.uuid, r.name) for v, r in self._t.vms.items()), ref)
        return self.get(VmId(found)) if found is not None else None

    def by_uuid(self, uuid: VmUuid | str) -> VmRecord | None:
        vm_id = self._t.vm_by_uuid.get(uuid)
        return None if vm_id is None else self.get(vm_id)

    def add(self, record: VmRecord, now: float) -> VmRecord:
        if record.id <= 0:
            raise ValueError("a VM needs an id before it is stored")
        if record.id in self._t.vms:
            raise StoreError(f"duplicate VM id {record.id}")
        self.upsert(record, now)
        return copy.copy(record)

    def upsert(self, record: VmRecord, now: float) -> None:
        current = self._t.vms.get(record.id)
        if current is None or current.uuid != record.uuid:
            if record.uuid in self._t.vm_by_uuid:
                raise StoreError(f"duplicate VM uuid {record.uuid}")
            if current is not None:
                _delete(self._t.vm_by_uuid, current.uuid, self._undo)
            _set(self._t.vm_by_uuid, record.uuid, record.id, self._undo)
        _set(self._t.vms, record.id, copy.copy(record), self._undo)

    def delete(self, vm_id: VmId) -> None:
        works = [w.id for w in self._t.works.values() if w.vm_id == vm_id]
        kind = "vm" if vm_id < UNMANAGED_ID_BASE else "vm.unmanaged"
        for used_kind, used in ((kind, vm_id), ("work", max(works, default=0))):
            if used > self._t.high_water.get(used_kind, 0):
                _set(self._t.high_water, used_kind, used, self._undo)
        for work_id in works:
            _delete(self._t.works, work_id, self._undo)
        _delete(self._t.active_work_by_vm, vm_id, self._undo)
        vm = self._t.vms.get(vm_id)
        if vm is not None:
            _delete(self._t.vm_by_uuid, vm.uuid, self._undo)
        _delete(self._t.vms, vm_id, self._undo)

    def max_id(self, below: int | None = None) -> int:
        kinds = ["vm"] if below is not None and below <= UNMANAGED_ID_BASE else ["vm", "vm.unmanaged"]
        stored = max((v for v in self._t.vms if below is None or v < below), default=0)
        return max(stored, *(self._t.high_water.get(k, 0) for k in kinds))


class MemoryWorks:
    def __init__(self, tables: Tables, undo: list[Callable[[], None]]) -> None:
        self._t, self._undo = tables, undo

    def all(self, active_only: bool = False) -> list[HaWorkRecord]:
        works = self._t.works
        return [copy.copy(works[w]) for w in sorted(works) if not active_only or works[w].step.active]

    def save(self, record: HaWorkRecord, manager_id: str, now: float) -> None:
        stored = copy.copy(record)
        current = self._t.works.get(record.id)
        stored.created_at = current.created_at if current else (record.created_at or now)
        stored.reason, stored.updated_at = record.reason[:4000], now
        stored.taken_by = manager_id if record.step.active else (current.taken_by if current else None)
        stored.taken_at = (record.taken_at or now) if record.step.active else (current.taken_at if current else None)
        active = self._t.active_work_by_vm
        if stored.step.active and stored.type is WorkType.HA:  # the SQL key covers HA items only (active_key)
            if active.get(record.vm_id, record.id) != record.id:
                # The SQL store's UNIQUE active_instance_id (cloudstack#10367): never two active HA items per VM.
                raise StoreError(f"a second active HA item for VM {record.vm_id}")
            _set(active, record.vm_id, record.id, self._undo)
        elif active.get(record.vm_id) == record.id:
            _delete(active, record.vm_id, self._undo)
        _set(self._t.works, record.id, stored, self._undo)

    def finished_since(self, since: float) -> list[HaWorkRecord]:
        return [w for w in self.all() if not w.step.active and w.updated_at >= since]

    def max_id(self) -> int:
        return max(max(self._t.works, default=0), self._t.high_water.get("work", 0))

    def claim_active(self, manager_id: str, now: float, live_managers: Iterable[str]) -> list[HaWorkRecord]:
        others = {m for m in live_managers if m != manager_id}
        for work in list(self._t.works.values()):
            if work.step.active and (work.taken_by is None or work.taken_by not in others):
                claimed = copy.copy(work)
                claimed.taken_by, claimed.taken_at = manager_id, now
                _set(self._t.works, work.id, claimed, self._undo)
        return [w for w in self.all(active_only=True) if w.taken_by == manager_id]


class MemoryEvents:
    def __init__(self, tables: Tables, undo: list[Callable[[], None]], added: list[EventRow]) -> None:
        self._t, self._undo, self._added = tables, undo, added

    def add(self, at: float, severity: str, subject: str, kind: str, message: str) -> int:
        row = EventRow(len(self._t.events) + 1, at, severity[:16], subject[:64], kind[:64], message)
        self._t.events.append(row)
        self._added.append(row)
        events = self._t.events
        self._undo.append(lambda: events.__delitem__(-1))
        return row.id

    def add_many(self, events: list[tuple[float, str, str, str, str]]) -> None:
        for event in events:
            self.add(*event)

    def all(self, after_id: int = 0, limit: int = 200, subject: str = "") -> list[EventRow]:
        rows = [e for e in self._t.events[after_id:] if not subject or e.subject == subject]
        return rows[:limit]

    def last_id(self) -> int:
        return len(self._t.events)


class MemoryConfig:
    def __init__(self, tables: Tables, undo: list[Callable[[], None]]) -> None:
        self._t, self._undo = tables, undo

    def sync_defaults(self, specs: Iterable[tuple[str, str, str]], now: float) -> None:
        for name, default, description in specs:
            row = self._t.config.get(name)
            value, scope = (row.value, row.scope) if row else (None, "global")
            _set(self._t.config, name, ConfigRow(name, value, default, description, scope), self._undo)

    def all(self) -> list[ConfigRow]:
        return [self._t.config[name] for name in sorted(self._t.config)]

    def set(self, name: str, value: str | None, now: float) -> ConfigRow:
        row = self._t.config[name]  # KeyError for an unknown name, as the port says
        changed = ConfigRow(name, value, row.default_value, row.description, row.scope)
        _set(self._t.config, name, changed, self._undo)
        return changed


class MemoryManagers:
    def __init__(self, tables: Tables, undo: list[Callable[[], None]], wall: Callable[[], float]) -> None:
        self._t, self._undo, self._wall = tables, undo, wall  # the store's clock is "the database's"

    def register(self, manager_id: str, address: str, version: str, now: float) -> None:
        _set(self._t.managers, manager_id, _Manager(address, version, now, now), self._undo)

    def heartbeat(self, manager_id: str, now: float) -> None:
        row = self._t.managers.get(manager_id)
        if row is not None:
            _set(self._t.managers, manager_id, _Manager(row.address, row.version, row.started_at, now), self._undo)

    def live(self, now: float, stale_after_s: float) -> list[str]:
        return sorted(m for m, row in self._t.managers.items() if row.last_heartbeat_at >= now - stale_after_s)

    def acquire_lease(self, manager_id: str, lease_s: float) -> int | None:
        now, current = self._wall(), self._t.leases.get(LEASE_SCOPE)
        if current is not None and current.manager_id not in (None, manager_id) and current.expires_at >= now:
            return None
        epoch = (current.epoch if current is not None else 0) + 1
        _set(self._t.leases, LEASE_SCOPE, LeaseRow(manager_id, epoch, now + lease_s, now, now), self._undo)
        hosts = self._t.hosts
        for host_id, row in hosts.items():
            if row.manager_id != manager_id:
                _set(hosts, host_id, _Host(row.record, row.agent, manager_id, row.bmc), self._undo)
        self.heartbeat(manager_id, now)
        return epoch

    def renew_lease(self, manager_id: str, epoch: int, lease_s: float) -> bool:
        now, current = self._wall(), self._t.leases.get(LEASE_SCOPE)
        if current is None or current.manager_id != manager_id or current.epoch != epoch:
            return False
        _set(self._t.leases, LEASE_SCOPE,
             LeaseRow(manager_id, epoch, now + lease_s, current.acquired_at, now), self._undo)
        self.heartbeat(manager_id, now)
        return True

    def lease(self) -> LeaseRow | None:
        current = self._t.leases.get(LEASE_SCOPE)
        if current is None:
            return None
        return LeaseRow(current.manager_id, current.epoch, current.expires_at, current.acquired_at, self._wall())

    def all(self) -> list[ManagerRow]:
        owned: dict[str, int] = {}
        for row in self._t.hosts.values():
            if row.manager_id is not None:
                owned[row.manager_id] = owned.get(row.manager_id, 0) + 1
        return [ManagerRow(m, r.address, r.version, r.started_at, r.last_heartbeat_at, owned.get(m, 0))
                for m, r in sorted(self._t.managers.items())]
