"""Database tables of the manager (SQLAlchemy 2.0 typed models), after CloudStack's.

The tables hold what must survive a manager restart: hosts, VMs (desired state and the XML to restart them
elsewhere), HA work, the audit events, configuration and the manager instances. Status columns store the *values*
of the enums in kvmha.manager.core.model (the names operators see: "Up", "PowerReportMissing", ...).

Times are epoch seconds in DOUBLE columns (not DATETIME): the core reasons in seconds and MariaDB's DATETIME drops
sub-second precision unless asked. Schema changes go through Alembic (manager/migrations); a test fails when these
models and the migrations disagree.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kvmha.manager.core.model import (
    HostRole,
    HostStatus,
    PowerState,
    ResourceState,
    VmState,
    WorkStep,
    WorkType,
)

# Constraint names are fixed so that migrations can drop them by name on every database.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ACTIVE_STEPS = tuple(step.value for step in WorkStep if step.active)

# VM ids reach past 2**31: the core numbers the unmanaged domains it discovers from 2**40 up. SQLite keeps INTEGER
# (its 64-bit rowid alias).
BigId = BigInteger().with_variant(Integer(), "sqlite")

# Domain XML can exceed MariaDB's TEXT (64 KiB); MEDIUMTEXT holds 16 MiB. Other databases' TEXT is unbounded.
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def enum_column(enum_type: type[enum.Enum]) -> Enum:
    """Store an enum by its value as a plain string (portable; no native ENUM types to migrate)."""
    return Enum(
        enum_type,
        native_enum=False,
        length=32,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ManagerInstance(Base):
    """A running (or once running) manager; several may share one database later."""

    __tablename__ = "mshost"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    version: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[float] = mapped_column(Double)
    last_heartbeat_at: Mapped[float] = mapped_column(Double)


class HaLease(Base):
    """The lease over the hosts (kvmha.manager.lease): one row per scope ("hosts": all of them, today). Taken and
    renewed by conditional updates of this one row, judged on the database's clock; `epoch` only grows."""

    __tablename__ = "ha_lease"

    scope: Mapped[str] = mapped_column(String(32), primary_key=True)
    manager_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[float] = mapped_column(Double, default=0.0)  # database clock, seconds
    acquired_at: Mapped[float] = mapped_column(Double, default=0.0)


class IdHighWater(Base):
    """The highest id ever given out, per kind ("vm", "vm.unmanaged", "work"), written when rows are deleted: a new
    VM or work item never takes the id of a deleted one, whose events and history still name it."""

    __tablename__ = "id_high_water"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    high: Mapped[int] = mapped_column(BigInteger, default=0)


class Host(Base):
    __tablename__ = "host"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uuid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    address: Mapped[str] = mapped_column(String(255), default="")
    status: Mapped[HostStatus] = mapped_column(enum_column(HostStatus), default=HostStatus.CONNECTING)
    resource_state: Mapped[ResourceState] = mapped_column(
        enum_column(ResourceState), default=ResourceState.ENABLED
    )
    role: Mapped[HostRole] = mapped_column(enum_column(HostRole), default=HostRole.ROUTING)
    last_ping_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    # The self-fence guarantee at the agent's last contact (kvmha-watchdog's bound; NULL: not armed, and why).
    watchdog_timeout_s: Mapped[float | None] = mapped_column(Double, nullable=True)
    watchdog_detail: Mapped[str] = mapped_column(String(255), default="")
    lease_manager: Mapped[str] = mapped_column(String(32), default="")  # libvirt's lock manager; "" = no leases
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    manager_id: Mapped[str | None] = mapped_column(
        ForeignKey("mshost.id", ondelete="SET NULL"), nullable=True
    )
    owner_epoch: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the owner's lease epoch
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    libvirt_version: Mapped[str] = mapped_column(String(64), default="")
    qemu_version: Mapped[str] = mapped_column(String(64), default="")
    boot_id: Mapped[str] = mapped_column(String(64), default="")
    # Out-of-band management for fencing. The password is a secret: never logged, never returned by the admin API.
    bmc_address: Mapped[str | None] = mapped_column(String(255), nullable=True)
    bmc_port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bmc_user: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Sealed with the manager's key (security/secrets.py): "fernet:" + a token, longer than the password.
    bmc_password: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)

    def __repr__(self) -> str:  # no secrets in logs or tracebacks
        return f"Host(id={self.id!r}, name={self.name!r}, status={self.status!r})"


class VmInstance(Base):
    __tablename__ = "vm_instance"

    # Ids are given by the manager (below 2**40 for registered VMs, above for discovered ones), never generated.
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    uuid: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    state: Mapped[VmState] = mapped_column(enum_column(VmState), default=VmState.STOPPED)
    power_state: Mapped[PowerState] = mapped_column(enum_column(PowerState), default=PowerState.POWER_UNKNOWN)
    power_state_updated_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("host.id", ondelete="SET NULL"), nullable=True)
    last_host_id: Mapped[int | None] = mapped_column(ForeignKey("host.id", ondelete="SET NULL"), nullable=True)
    ha_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    restart_priority: Mapped[int] = mapped_column(Integer, default=0)
    anti_affinity_group: Mapped[str | None] = mapped_column(String(255), nullable=True)
    domain_xml: Mapped[str] = mapped_column(LongText, default="")
    memory_mib: Mapped[int] = mapped_column(Integer, default=0)
    vcpus: Mapped[int] = mapped_column(Integer, default=0)
    # Bumped on every state change; HA work remembers it and aborts when the VM moved on (CloudStack's `updated`).
    update_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)

    __table_args__ = (Index("ix_vm_instance_host_id", "host_id"),)


class HaWork(Base):
    """op_ha_work: one unit of HA work (restart, stop, ...) for one VM."""

    __tablename__ = "op_ha_work"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # numbered by the core
    instance_id: Mapped[int] = mapped_column(BigId, ForeignKey("vm_instance.id", ondelete="CASCADE"))
    type: Mapped[WorkType] = mapped_column(enum_column(WorkType))
    step: Mapped[WorkStep] = mapped_column(enum_column(WorkStep), default=WorkStep.SCHEDULED)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("host.id", ondelete="SET NULL"), nullable=True)
    previous_state: Mapped[VmState] = mapped_column(enum_column(VmState))
    # A Migration item's target host (NULL for other types; SET NULL if that host is removed).
    target_host_id: Mapped[int | None] = mapped_column(ForeignKey("host.id", ondelete="SET NULL"), nullable=True)
    vm_update_count: Mapped[int] = mapped_column(Integer, default=0)
    taken_by: Mapped[str | None] = mapped_column(ForeignKey("mshost.id", ondelete="SET NULL"), nullable=True)
    taken_at: Mapped[float | None] = mapped_column(Double, nullable=True)
    tried: Mapped[int] = mapped_column(Integer, default=0)
    time_to_try_at: Mapped[float] = mapped_column(Double, default=0.0)
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Double)
    updated_at: Mapped[float] = mapped_column(Double)
    # The database's own guard against duplicate HA jobs (cloudstack#10367): equals instance_id while an HA item
    # is active, NULL otherwise; a UNIQUE column allows many NULLs on SQLite, PostgreSQL and MariaDB alike, so this
    # works where MariaDB has no partial indexes. The CHECK keeps it honest.
    active_instance_id: Mapped[int | None] = mapped_column(BigId, nullable=True, unique=True)

    __table_args__ = (
        CheckConstraint(
            "(active_instance_id IS NULL) OR (active_instance_id = instance_id AND type = 'HA' AND step IN ("
            + ", ".join(f"'{step}'" for step in ACTIVE_STEPS)
            + "))",
            name="active_instance",
        ),
        Index("ix_op_ha_work_step_time_to_try_at", "step", "time_to_try_at"),
    )

    @staticmethod
    def active_key(instance_id: int, work_type: WorkType, step: WorkStep) -> int | None:
        """The value active_instance_id must have for a row with this type and step."""
        return instance_id if work_type is WorkType.HA and step.active else None


class Configuration(Base):
    __tablename__ = "configuration"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str | None] = mapped_column(String(1024), nullable=True)  # NULL: use the default
    default_value: Mapped[str] = mapped_column(String(1024), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    scope: Mapped[str] = mapped_column(String(32), default="global")
    updated_at: Mapped[float] = mapped_column(Double, default=0.0)


class Event(Base):
    """Audit record: every state change and every skipped action, with its reason."""

    __tablename__ = "event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Double)
    severity: Mapped[str] = mapped_column(String(16), default="info")
    subject: Mapped[str] = mapped_column(String(64), default="")
    kind: Mapped[str] = mapped_column(String(64), default="")
    message: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_event_subject_id", "subject", "id"),)


def row_dict(row: Base) -> dict[str, Any]:
    """The row's columns as a dict (for tests and debugging); the BMC password is masked."""
    values = {column.key: getattr(row, column.key) for column in row.__mapper__.columns}
    if values.get("bmc_password"):
        values["bmc_password"] = "***"
    return values


__all__ = [
    "Base",
    "Configuration",
    "Event",
    "HaWork",
    "Host",
    "ManagerInstance",
    "VmInstance",
    "row_dict",
]
