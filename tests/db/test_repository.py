"""The store port's contract, on SQLite, PostgreSQL and MariaDB (here) and on the simulator's in-memory store
(tests/sim/test_memstore.py runs these same functions): plain records in and out, commands for changes,
transactions that roll back, and the database's guard against two active HA items for one VM."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import Engine, event

from kvmha.manager.adapters.db import migrate
from kvmha.manager.adapters.repository import SqlStore
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostCapacity,
    HostId,
    HostStatus,
    PowerState,
    VmId,
    VmRecord,
    VmState,
    VmUuid,
    WorkId,
    WorkStep,
    WorkType,
)
from kvmha.manager.core.powersync import UNMANAGED_ID_BASE
from kvmha.manager.sim.memstore import MemoryStore
from kvmha.manager.store import AgentInfo, BmcCredentials, Store

NOW = 1_764_057_600.5


@pytest.fixture
def store(engine: Engine) -> Store:
    migrate(engine)
    return SqlStore(engine)


def _vm(name: str, host_id: int | None) -> VmRecord:
    return VmRecord(
        id=VmId(int(name.removeprefix("vm")) + 1),
        uuid=VmUuid(f"00000000-0000-4000-8000-{name.rjust(12, '0')}"),
        name=name,
        state=VmState.RUNNING,
        power_state=PowerState.POWER_ON,
        host_id=HostId(host_id) if host_id else None,
        ha_enabled=True,
        memory_mib=64,
        vcpus=1,
        domain_xml=f"<domain><name>{name}</name></domain>",
    )


def _work(work_id: int, vm_id: int, step: WorkStep = WorkStep.SCHEDULED) -> HaWorkRecord:
    return HaWorkRecord(
        id=WorkId(work_id),
        vm_id=VmId(vm_id),
        type=WorkType.HA,
        step=step,
        host_id=None,
        previous_state=VmState.RUNNING,
        vm_update_count=0,
        created_at=NOW,
    )


def test_host_and_vm_records_round_trip(store: Store) -> None:
    with store.unit_of_work() as uow:
        host_id = uow.hosts.add("uuid-h1", "h1", "10.251.0.11", NOW)
        vm = uow.vms.add(_vm("vm1", host_id), NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        [record] = uow.hosts.all()
        record.status, record.capacity, record.last_ping_at = HostStatus.UP, HostCapacity(4, 8192), NOW + 1
        record.watchdog_timeout_s, record.lease_manager = 20.0, "lockd"
        uow.hosts.save(record, NOW + 1)
        not_armed = dataclasses.replace(record, watchdog_timeout_s=None, watchdog_detail="daemon unreachable")
        uow.hosts.save(not_armed, NOW + 1)
        assert uow.hosts.get(record.id) == not_armed
        uow.hosts.save(record, NOW + 1)
        changed = dataclasses.replace(vm, state=VmState.STOPPED, power_state=PowerState.POWER_OFF, update_count=5)
        uow.vms.upsert(changed, NOW + 1)
        uow.commit()
    with store.unit_of_work() as uow:
        assert uow.hosts.all() == [record]
        assert uow.vms.all() == [changed]
        assert uow.vms.find("vm1") is not None and uow.vms.find(str(vm.id)) is not None
        assert uow.hosts.find("h1") is not None and uow.hosts.find("uuid-h1") is not None
        assert uow.hosts.find("nope") is None


def test_uncommitted_unit_of_work_leaves_nothing(store: Store) -> None:
    with store.unit_of_work() as uow:
        uow.hosts.add("uuid-h1", "h1", "", NOW)
    with store.unit_of_work() as uow:
        assert uow.hosts.all() == []


def test_work_save_keeps_one_active_item_per_vm_and_ends_it(store: Store) -> None:
    with store.unit_of_work() as uow:
        vm = uow.vms.add(_vm("vm1", None), NOW)
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        uow.works.save(_work(1, vm.id), "m1", NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        uow.works.save(_work(1, vm.id, WorkStep.DONE), "m1", NOW + 1)
        uow.works.save(_work(2, vm.id), "m1", NOW + 1)  # allowed: the first one is no longer active
        uow.commit()
    with store.unit_of_work() as uow:
        steps = [(w.id, w.step) for w in uow.works.all()]
        assert steps == [(1, WorkStep.DONE), (2, WorkStep.SCHEDULED)]
        assert [w.id for w in uow.works.all(active_only=True)] == [2]
        assert uow.works.max_id() == 2


def test_events_and_config(store: Store) -> None:
    with store.unit_of_work() as uow:
        uow.config.sync_defaults([("ping.interval", "2", "agent ping period")], NOW)
        first = uow.events.add(NOW, "info", "host:1", "host.status", "Up -> Investigating")
        uow.events.add(NOW, "alert", "vm:1", "vm.restart", "restart failed")
        uow.commit()
    with store.unit_of_work() as uow:
        assert [e.subject for e in uow.events.all(after_id=first)] == ["vm:1"]
        assert [e.kind for e in uow.events.all(subject="host:1")] == ["host.status"]
        uow.config.set("ping.interval", "1", NOW)
        uow.config.sync_defaults([("ping.interval", "3", "changed default")], NOW)  # operator's value is kept
        uow.commit()
    with store.unit_of_work() as uow:
        [row] = uow.config.all()
        assert (row.value, row.default_value, row.effective) == ("1", "3", "1")
        with pytest.raises(KeyError):
            uow.config.set("no.such.key", "1", NOW)


def test_two_managers_claim_disjoint_work(store: Store) -> None:
    with store.unit_of_work() as uow:
        vms = [uow.vms.add(_vm(f"vm{i}", None), NOW) for i in range(4)]
        for manager in ("m1", "m2"):
            uow.managers.register(manager, "127.0.0.1", "0.1.0", NOW)
        for i, vm in enumerate(vms):
            uow.works.save(_work(i + 1, vm.id), "m1", NOW)
        uow.commit()
    # m1 died (its heartbeat is stale). m2 claims and still holds its row locks when m3, which also thinks the
    # items are free (it has not seen m2's heartbeat), claims: SKIP LOCKED hands m3 nothing instead of a copy.
    if not isinstance(store, SqlStore) or store.engine.dialect.name == "sqlite":
        pytest.skip("one writer at a time (SQLite, the simulator's store): a concurrent claim waits, never skips")
    first, second = store.unit_of_work(), store.unit_of_work()
    with first, second:
        taken_by_m2 = first.works.claim_active("m2", NOW + 60, live_managers=["m2"])
        taken_by_m3 = second.works.claim_active("m3", NOW + 60, live_managers=["m3"])
        first.commit()
        second.commit()
    assert sorted(w.id for w in taken_by_m2) == [1, 2, 3, 4]
    assert taken_by_m3 == []
    with store.unit_of_work() as uow:
        assert {w.taken_by for w in uow.works.all()} == {"m2"}


def test_hosts_take_commands_and_hand_out_details(store: Store) -> None:
    with store.unit_of_work() as uow:
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        host_id = uow.hosts.add("uuid-h1", "h1", "10.251.0.11", NOW)
        assert uow.hosts.id_of("uuid-h1") == host_id and uow.hosts.id_of("uuid-nope") is None
        assert uow.hosts.record_agent(host_id, AgentInfo("0.1.0", "9.0", "8.0", "boot-1"), "m1", NOW)
        assert not uow.hosts.record_agent(HostId(999), AgentInfo(), "m1", NOW)
        uow.hosts.set_bmc(host_id, BmcCredentials("10.0.0.1", 6230, "admin", "secret"), NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        details = uow.hosts.find("h1")
        assert details is not None and details.host.has_bmc and details.agent.boot_id == "boot-1"
        assert (details.bmc_address, details.bmc_port, details.manager_id) == ("10.0.0.1", 6230, "m1")
        assert uow.hosts.bmc(host_id) == BmcCredentials("10.0.0.1", 6230, "admin", "secret")
        record = uow.hosts.get(host_id)
        assert record is not None
        record.status = HostStatus.DOWN
        uow.hosts.save(record, NOW + 1)  # the core's save keeps the operator's BMC
        uow.hosts.set_bmc(host_id, None, NOW + 1)
        uow.commit()
    with store.unit_of_work() as uow:
        [details] = uow.hosts.details()
        assert details.host.status is HostStatus.DOWN and not details.host.has_bmc and details.bmc_address is None
        assert uow.hosts.bmc(host_id) is None
        with pytest.raises(LookupError):
            uow.hosts.save(dataclasses.replace(details.host, id=HostId(999)), NOW)


def test_a_groups_stored_hosts_are_found_by_uuid_at_once(store: Store) -> None:
    """ids_of: the stored hosts among a group's uuids (a registration's Hellos), the others absent."""
    with store.unit_of_work() as uow:
        hosts = {f"uuid-i{n}": uow.hosts.add(f"uuid-i{n}", f"i{n}", "10.0.0.1", NOW) for n in range(3)}
        uow.commit()
    with store.unit_of_work() as uow:
        assert uow.hosts.ids_of([*reversed(hosts), "uuid-nope"]) == hosts
        assert uow.hosts.ids_of([]) == {}


def test_records_handed_out_are_copies(store: Store) -> None:
    with store.unit_of_work() as uow:
        uow.vms.add(_vm("vm1", None), NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        [vm] = uow.vms.all()
        vm.state = VmState.ERROR  # editing a record changes nothing stored
        assert uow.vms.get(vm.id) == dataclasses.replace(vm, state=VmState.RUNNING)
        assert uow.vms.by_uuid(vm.uuid) is not None and uow.vms.max_id(below=2) == 0 and uow.vms.max_id() == 2


def test_deleting_a_vm_deletes_its_work_and_a_rollback_undoes_it(store: Store) -> None:
    with store.unit_of_work() as uow:
        vm = uow.vms.add(_vm("vm1", None), NOW)
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        uow.works.save(_work(1, vm.id), "m1", NOW)
        uow.events.add(NOW, "info", "vm:2", "vm.registered", "registered")
        uow.commit()
    with store.unit_of_work() as uow:
        uow.vms.delete(vm.id)
        uow.events.add(NOW, "info", "vm:2", "vm.deleted", "deleted")
        assert uow.vms.all() == [] and uow.works.all() == []
        # no commit: rolled back
    with store.unit_of_work() as uow:
        assert [v.id for v in uow.vms.all()] == [vm.id] and [w.id for w in uow.works.all()] == [1]
        assert [e.kind for e in uow.events.all()] == ["vm.registered"] and uow.events.last_id() == 1
        uow.vms.delete(vm.id)
        uow.commit()
    with store.unit_of_work() as uow:
        assert uow.vms.all() == [] and uow.works.all() == []


def test_ids_of_deleted_vms_and_their_work_are_never_given_again(store: Store) -> None:
    """Events and history name VMs and work by id: a new VM must not inherit a deleted one's past."""
    unmanaged = VmId(UNMANAGED_ID_BASE + 5)
    with store.unit_of_work() as uow:
        first = uow.vms.add(_vm("vm0", None), NOW)
        last = uow.vms.add(_vm("vm1", None), NOW)
        uow.vms.add(dataclasses.replace(_vm("vm2", None), id=unmanaged), NOW)
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        uow.works.save(_work(1, first.id, WorkStep.DONE), "m1", NOW)
        uow.works.save(_work(2, last.id, WorkStep.DONE), "m1", NOW)
        uow.works.save(_work(3, last.id), "m1", NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        uow.vms.delete(last.id)
        uow.vms.delete(unmanaged)
        # not committed: nothing was deleted, so nothing is remembered either
    with store.unit_of_work() as uow:
        uow.vms.delete(last.id)
        uow.commit()
    with store.unit_of_work() as uow:
        assert uow.vms.max_id(below=UNMANAGED_ID_BASE) == last.id and uow.works.max_id() == 3
        assert uow.vms.max_id() == unmanaged
        uow.vms.delete(unmanaged)
        uow.commit()
    with store.unit_of_work() as uow:
        assert [v.id for v in uow.vms.all()] == [first.id] and [w.id for w in uow.works.all()] == [1]
        assert uow.vms.max_id(below=UNMANAGED_ID_BASE) == last.id and uow.vms.max_id() == unmanaged
        assert uow.works.max_id() == 3


def test_two_active_items_for_one_vm_are_refused(store: Store) -> None:
    with store.unit_of_work() as uow:
        vm = uow.vms.add(_vm("vm1", None), NOW)
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        uow.works.save(_work(1, vm.id), "m1", NOW)
        uow.commit()
    with pytest.raises(Exception), store.unit_of_work() as uow:  # noqa: B017 - IntegrityError / StoreError
        uow.works.save(_work(2, vm.id), "m1", NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        assert [w.id for w in uow.works.all()] == [1]


def test_an_active_migration_item_beside_an_active_ha_item(store: Store) -> None:
    """A VM being migrated whose source goes silent has both: the migration (Migrating) and the HA item that waits
    for it to settle. Only HA items are one per VM (the key covers type HA); both are claimed after a restart."""
    with store.unit_of_work() as uow:
        vm = uow.vms.add(_vm("vm1", None), NOW)
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        migration = dataclasses.replace(_work(1, vm.id, WorkStep.MIGRATING), type=WorkType.MIGRATION)
        uow.works.save(migration, "m1", NOW)
        uow.works.save(_work(2, vm.id), "m1", NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        uow.managers.register("m2", "127.0.0.1:50052", "0.1.0", NOW + 60)
        claimed = uow.works.claim_active("m2", NOW + 60, live_managers=["m2"])
        assert sorted((w.id, w.type, w.step) for w in claimed) == [
            (1, WorkType.MIGRATION, WorkStep.MIGRATING),
            (2, WorkType.HA, WorkStep.SCHEDULED),
        ]


def test_a_migration_item_keeps_its_target_across_a_restart(store: Store) -> None:
    """The target of a migration in flight is stored with its item, so that the manager that claims the item
    after a restart knows where the VM was going (core/migration.py restore)."""
    with store.unit_of_work() as uow:
        source = uow.hosts.add("uuid-h1", "h1", "10.251.0.11", NOW)
        target = uow.hosts.add("uuid-h2", "h2", "10.251.0.12", NOW)
        vm = uow.vms.add(_vm("vm1", source), NOW)
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        migration = dataclasses.replace(_work(1, vm.id, WorkStep.MIGRATING), type=WorkType.MIGRATION,
                                        host_id=source, target_host_id=target)
        uow.works.save(migration, "m1", NOW)
        uow.works.save(_work(2, vm.id), "m1", NOW)  # an HA item: no target
        uow.commit()
    with store.unit_of_work() as uow:
        uow.managers.register("m2", "127.0.0.1:50052", "0.1.0", NOW + 60)
        claimed = {w.id: w for w in uow.works.claim_active("m2", NOW + 60, live_managers=["m2"])}
        assert (claimed[WorkId(1)].host_id, claimed[WorkId(1)].target_host_id) == (source, target)
        assert claimed[WorkId(2)].target_host_id is None
        assert [w.target_host_id for w in uow.works.all()] == [target, None]


def test_finished_work_of_a_window(store: Store) -> None:
    with store.unit_of_work() as uow:
        vm = uow.vms.add(_vm("vm1", None), NOW)
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        uow.works.save(_work(1, vm.id, WorkStep.DONE), "m1", NOW - 7200)
        uow.works.save(_work(2, vm.id, WorkStep.CANCELLED), "m1", NOW - 60)
        uow.works.save(_work(3, vm.id), "m1", NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        assert [w.id for w in uow.works.finished_since(NOW - 3600)] == [2]
        assert uow.works.max_id() == 3


@pytest.mark.parametrize("kind", ["sql", "memory"])
def test_listings_page_by_id(store: Store, kind: str) -> None:
    """Hosts and VMs come in pages of `limit` after an id, in id order, on every store (the admin API's pages)."""
    target: Store = store if kind == "sql" else MemoryStore(wall=lambda: NOW)
    with target.unit_of_work() as uow:
        ids = [uow.hosts.add(f"uuid-h{n}", f"h{n}", "10.0.0.1", NOW) for n in range(5)]
        for n in range(5):
            uow.vms.upsert(_vm(f"vm{n}", ids[n % 2]), NOW)
        uow.commit()
    with target.unit_of_work() as uow:
        first = uow.hosts.details(0, 2)
        rest = uow.hosts.details(first[-1].host.id, 10)
        assert [d.host.id for d in first + rest] == ids and len(first) == 2
        assert [v.name for v in uow.vms.all(None, 0, 3)] == ["vm0", "vm1", "vm2"]
        assert [v.name for v in uow.vms.all(None, 3, 3)] == ["vm3", "vm4"]  # vm ids are n + 1
        assert [v.name for v in uow.vms.all(ids[0], 1, None)] == ["vm2", "vm4"]


@pytest.mark.parametrize("kind", ["sql", "memory"])
def test_batch_writes_preload_count_and_record_in_order(store: Store, kind: str) -> None:
    """What a ramp's batches use: events recorded many at once keep their order after single ones; preloaded VMs
    (present or new) upsert as without the preload; running VMs counted per host for a listing page."""
    target: Store = store if kind == "sql" else MemoryStore(wall=lambda: NOW)
    with target.unit_of_work() as uow:
        hosts = [uow.hosts.add(f"uuid-b{n}", f"b{n}", "10.0.0.1", NOW) for n in range(3)]
        uow.vms.upsert(_vm("vm1", hosts[0]), NOW)
        uow.commit()
    with target.unit_of_work() as uow:
        uow.vms.preload([VmId(2), VmId(3), VmId(4)])  # vm1 (id 2) is stored, vm2 and vm3 are new
        for name, host in (("vm1", hosts[1]), ("vm2", hosts[1]), ("vm3", hosts[0])):
            uow.vms.upsert(_vm(name, host), NOW)
        uow.hosts.preload(hosts)
        first = uow.events.add(NOW, "info", "host:1", "one", "single")
        uow.events.add_many([(NOW, "info", f"host:{n}", "many", f"event {n}") for n in range(3)])
        uow.commit()
    with target.unit_of_work() as uow:
        assert uow.vms.running_by_host(hosts) == {hosts[0]: 1, hosts[1]: 2, hosts[2]: 0}
        assert [v.host_id for v in uow.vms.all()] == [hosts[1], hosts[1], hosts[0]]
        assert [e.message for e in uow.events.all(after_id=first - 1)] == ["single", "event 0", "event 1", "event 2"]


def test_preloaded_rows_are_saved_without_a_query_each(engine: Engine, store: Store) -> None:
    """A batch's saves after one preload query per kind: no SELECT per saved host or VM (the identity map holds
    unchanged rows weakly: without the repository keeping them, each save read its row again)."""
    with store.unit_of_work() as uow:
        hosts = [uow.hosts.add(f"uuid-p{n}", f"p{n}", "10.0.0.1", NOW) for n in range(4)]
        uow.vms.upsert(_vm("vm1", hosts[0]), NOW)
        uow.commit()
    selects: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    with store.unit_of_work() as uow:
        records = [uow.hosts.get(host_id) for host_id in hosts]
        vm = uow.vms.get(VmId(2))
        assert vm is not None
        event.listen(engine, "before_cursor_execute", seen)
        try:
            uow.hosts.preload(hosts)
            uow.vms.preload([VmId(2), VmId(3)])
            for record in records:
                assert record is not None
                uow.hosts.save(dataclasses.replace(record, name=record.name + "x"), NOW)
            uow.vms.upsert(vm, NOW)
            uow.vms.upsert(_vm("vm2", hosts[1]), NOW)  # new (id 3)
            uow.commit()
        finally:
            event.remove(engine, "before_cursor_execute", seen)
    assert len(selects) == 2, selects  # the two preloads
    with store.unit_of_work() as uow:
        assert [h.name for h in uow.hosts.all()] == ["p0x", "p1x", "p2x", "p3x"]
        assert [v.name for v in uow.vms.all()] == ["vm1", "vm2"]


def test_a_group_of_agents_is_recorded_with_three_selects_whatever_its_size(engine: Engine, store: Store) -> None:
    """A registration's group: its stored hosts by uuid (one query), their rows (one preload), and the lease epoch
    once for the group; not a row and the lease per agent (the bound of a 10,000-agent ramp or restart)."""
    with store.unit_of_work() as uow:
        uow.managers.register("m1", "127.0.0.1:50051", "0.1.0", NOW)
        hosts = [uow.hosts.add(f"uuid-g{n}", f"g{n}", "10.0.0.1", NOW) for n in range(6)]
        uow.commit()
    selects: list[str] = []

    def seen(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        with store.unit_of_work() as uow:
            found = uow.hosts.ids_of([f"uuid-g{n}" for n in range(6)])
            uow.hosts.preload(sorted(found.values()))
            for n, host_id in enumerate(sorted(found.values())):
                assert uow.hosts.record_agent(host_id, AgentInfo("0.2.0", "9.0", "8.0", f"boot-{n}"), "m1", NOW)
            uow.commit()
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert len(selects) == 3, selects
    with store.unit_of_work() as uow:
        assert [d.agent.boot_id for d in uow.hosts.details()] == [f"boot-{n}" for n in range(6)]
        assert {d.manager_id for d in uow.hosts.details()} == {"m1"}
    assert sorted(found.values()) == hosts
