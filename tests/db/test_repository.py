"""Repositories and the unit of work on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import Engine

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

NOW = 1_764_057_600.5


@pytest.fixture
def store(engine: Engine) -> SqlStore:
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


def test_host_and_vm_records_round_trip(store: SqlStore) -> None:
    with store.unit_of_work() as uow:
        host_id = uow.hosts.add("uuid-h1", "h1", "10.251.0.11", NOW)
        vm = uow.vms.add(_vm("vm1", host_id), NOW)
        uow.commit()
    with store.unit_of_work() as uow:
        [record] = uow.hosts.all()
        record.status, record.capacity, record.last_ping_at = HostStatus.UP, HostCapacity(4, 8192), NOW + 1
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


def test_uncommitted_unit_of_work_leaves_nothing(store: SqlStore) -> None:
    with store.unit_of_work() as uow:
        uow.hosts.add("uuid-h1", "h1", "", NOW)
    with store.unit_of_work() as uow:
        assert uow.hosts.all() == []


def test_work_save_keeps_one_active_item_per_vm_and_ends_it(store: SqlStore) -> None:
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


def test_events_and_config(store: SqlStore) -> None:
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


def test_two_managers_claim_disjoint_work(store: SqlStore) -> None:
    with store.unit_of_work() as uow:
        vms = [uow.vms.add(_vm(f"vm{i}", None), NOW) for i in range(4)]
        for manager in ("m1", "m2"):
            uow.managers.register(manager, "127.0.0.1", "0.1.0", NOW)
        for i, vm in enumerate(vms):
            uow.works.save(_work(i + 1, vm.id), "m1", NOW)
        uow.commit()
    # m1 died (its heartbeat is stale). m2 claims and still holds its row locks when m3, which also thinks the
    # items are free (it has not seen m2's heartbeat), claims: SKIP LOCKED hands m3 nothing instead of a copy.
    if store.engine.dialect.name == "sqlite":
        pytest.skip("SQLite has one writer at a time: a concurrent claim waits instead of skipping")
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
