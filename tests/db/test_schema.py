"""The schema on SQLite, PostgreSQL and MariaDB: migrations up and down, models == migrations, a round trip of
every table, and the database's own guard against two active HA items for one VM."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from kvmha.manager.adapters.db import downgrade, migrate
from kvmha.manager.adapters.db_models import (
    Base,
    Configuration,
    Event,
    HaWork,
    Host,
    ManagerInstance,
    VmInstance,
    row_dict,
)
from kvmha.manager.core.model import (
    HostRole,
    HostStatus,
    PowerState,
    ResourceState,
    VmState,
    WorkStep,
    WorkType,
)

TABLES = {"host", "vm_instance", "op_ha_work", "configuration", "event", "mshost", "alembic_version"}
NOW = 1_764_057_600.123456  # sub-second precision must survive (DOUBLE, not DATETIME)


def test_migrations_up_down_up(engine: Engine) -> None:
    migrate(engine)
    assert set(inspect(engine).get_table_names()) >= TABLES
    downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    migrate(engine)
    assert set(inspect(engine).get_table_names()) >= TABLES


def test_models_match_migrations(engine: Engine) -> None:
    migrate(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models and migrations disagree; write a migration: {diff}"


def _sample_rows() -> list[Base]:
    manager = ManagerInstance(id="m1", address="127.0.0.1:50051", version="0.1.0", started_at=NOW,
                              last_heartbeat_at=NOW + 1)
    host = Host(id=1, uuid="6f1c1a2b-0000-4000-8000-000000000001", name="h1", address="10.251.0.11",
                status=HostStatus.FENCED, resource_state=ResourceState.ERROR_IN_MAINTENANCE, role=HostRole.ROUTING,
                last_ping_at=NOW, cpus=8, memory_mib=32768, manager_id="m1", agent_version="0.1.0",
                libvirt_version="9.0.0", qemu_version="7.2.0", boot_id="b1", bmc_address="127.0.0.1", bmc_port=9001,
                bmc_user="admin", bmc_password="secret", created_at=NOW, updated_at=NOW, watchdog_timeout_s=20.5,
                watchdog_detail="kvmha-watchdog refused: ünïcode", lease_manager="lockd")
    vm = VmInstance(id=1, uuid="0b9e6a53-0000-4000-8000-000000000001", name="vm1", state=VmState.RUNNING,
                    power_state=PowerState.POWER_REPORT_MISSING, power_state_updated_at=NOW, host_id=1,
                    last_host_id=1, ha_enabled=True, restart_priority=7, anti_affinity_group="db",
                    domain_xml="<domain>" + "x" * 70_000 + "</domain>", memory_mib=64, vcpus=1, update_count=3,
                    created_at=NOW, updated_at=NOW)
    work = HaWork(id=1, instance_id=1, type=WorkType.HA, step=WorkStep.FENCING, host_id=1, target_host_id=1,
                  previous_state=VmState.RUNNING, vm_update_count=3, taken_by="m1", taken_at=NOW, tried=2,
                  time_to_try_at=NOW + 30, reason="host h1 Unknown: fencing", created_at=NOW, updated_at=NOW,
                  active_instance_id=HaWork.active_key(1, WorkType.HA, WorkStep.FENCING))
    config = Configuration(name="ping.interval", value="2", default_value="2", description="agent ping period",
                           scope="global", updated_at=NOW)
    event = Event(id=1, at=NOW, severity="alert", subject="host:1", kind="host.status",
                  message="Up -> Investigating (no ping for 6.0 s) — ünïcode ok")
    return [manager, host, vm, work, config, event]


def test_round_trip_of_every_table(engine: Engine) -> None:
    migrate(engine)
    written = _sample_rows()
    expected = {type(row): row_dict(row) for row in written}
    with Session(engine) as session:
        for row in written:  # one at a time: the rows refer to each other in this order
            session.add(row)
            session.flush()
        session.commit()
    assert {type(row).__tablename__ for row in written} | {"alembic_version"} == TABLES
    with Session(engine) as session:
        for model, values in expected.items():
            stored = session.scalars(select(model)).one()
            assert row_dict(stored) == values, model.__tablename__
        host = session.get(Host, 1)
        assert host is not None and host.bmc_password == "secret"  # stored for fencing, masked only in row_dict
        assert "secret" not in repr(host)


def _work(work_id: int, step: WorkStep, work_type: WorkType = WorkType.HA) -> HaWork:
    return HaWork(id=work_id, instance_id=1, type=work_type, step=step, previous_state=VmState.RUNNING,
                  created_at=NOW, updated_at=NOW, active_instance_id=HaWork.active_key(1, work_type, step))


def test_database_allows_one_active_ha_item_per_vm(engine: Engine) -> None:
    migrate(engine)
    with Session(engine) as session:
        for row in _sample_rows()[:3]:
            session.add(row)
            session.flush()
        session.commit()
    with Session(engine) as session:
        session.add(_work(1, WorkStep.SCHEDULED))
        session.commit()
        session.add(_work(2, WorkStep.INVESTIGATING))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        # Other work types and finished HA items do not count as active HA.
        session.add_all([_work(3, WorkStep.SCHEDULED, WorkType.STOP), _work(4, WorkStep.DONE)])
        session.commit()
        first = session.get(HaWork, 1)
        assert first is not None
        first.step, first.active_instance_id = WorkStep.DONE, None
        session.commit()
        session.add(_work(5, WorkStep.SCHEDULED))
        session.commit()


def test_database_rejects_inconsistent_active_marker(engine: Engine) -> None:
    migrate(engine)
    with Session(engine) as session:
        for row in _sample_rows()[:3]:
            session.add(row)
            session.flush()
        session.commit()
    with Session(engine) as session:
        bad = _work(1, WorkStep.DONE)
        bad.active_instance_id = 1  # a finished item claiming to be active
        session.add(bad)
        # MariaDB reports a failed CHECK as an OperationalError (4025), the others as IntegrityError.
        with pytest.raises((IntegrityError, OperationalError)):
            session.commit()
