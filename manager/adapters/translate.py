"""Wire messages <-> core facts and commands. Pure functions; every malformed message becomes a WireError.

The agent speaks libvirt's vocabulary decoded into proto enums (PowerState, StateCause); the core speaks
CloudStack's (PowerOn/PowerOff, StopCause). This module is the one place that maps between them, and between the
Hello/Welcome messages and the hub's plain AgentHello/WelcomeTerms.
"""

from __future__ import annotations

import math
import re
import uuid as uuid_module
from typing import Literal, assert_never

from kvmha.manager.core import actions, facts
from kvmha.manager.core.model import (
    UNREPORTED,
    HostCapacity,
    HostId,
    HostInventory,
    PowerState,
    RequestId,
    StopCause,
    StorageReach,
    VmUuid,
    WatchdogReport,
)
from kvmha.manager.hub import AgentHello, WelcomeTerms
from kvmha.manager.store import AgentInfo
from kvmha.proto.v1 import agent_pb2 as pb

MAX_NAME_CHARS = 255
MAX_DOMAINS_PER_REPORT = 10_000
PROTOCOL_VERSION = pb.PROTOCOL_VERSION_CURRENT
_HOSTNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
MAX_WATCHDOG_TIMEOUT_S = 3600.0  # a longer bound is a misconfiguration, not a guarantee the manager waits out
MAX_DETAIL_CHARS = 200


class WireError(ValueError):
    """A message the manager cannot accept; the text says what is wrong (sent back to the agent)."""


_POWER = {
    pb.POWER_ON: PowerState.POWER_ON,
    pb.POWER_PAUSED: PowerState.POWER_ON,  # a paused domain still holds its disks: it is not safe to start elsewhere
    pb.POWER_OFF: PowerState.POWER_OFF,
    pb.POWER_CRASHED: PowerState.POWER_OFF,
    pb.POWER_UNKNOWN: PowerState.POWER_UNKNOWN,
}

VIR_DOMAIN_PAUSED = 3  # virDomainState
VIR_DOMAIN_PAUSED_MIGRATION = 2  # virDomainPausedReason: the incoming copy of a migration, or its source at switchover
VIR_DOMAIN_EVENT_STARTED, VIR_DOMAIN_EVENT_STARTED_MIGRATED = 2, 1  # the incoming copy was created (paused)
VIR_DOMAIN_EVENT_SUSPENDED, VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED = 3, 1  # the source paused at switchover


def paused_for_migration(entry: pb.DomainPower) -> bool:
    """libvirt's own word that this copy is part of a migration and runs no guest code: its state and reason in a
    full report, or the lifecycle event of a delta (an event's reason is not known, its detail is)."""
    if entry.libvirt_state == VIR_DOMAIN_PAUSED and entry.libvirt_reason == VIR_DOMAIN_PAUSED_MIGRATION:
        return True
    event = (entry.libvirt_event, entry.libvirt_detail)
    return event in ((VIR_DOMAIN_EVENT_STARTED, VIR_DOMAIN_EVENT_STARTED_MIGRATED),
                     (VIR_DOMAIN_EVENT_SUSPENDED, VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED))


_CAUSE = {
    pb.STATE_CAUSE_UNSPECIFIED: StopCause.NONE,
    pb.CAUSE_BOOTED: StopCause.NONE,
    pb.CAUSE_GUEST_SHUTDOWN: StopCause.GUEST_SHUTDOWN,
    pb.CAUSE_DESTROYED: StopCause.DESTROYED,
    pb.CAUSE_CRASHED: StopCause.CRASHED,
    pb.CAUSE_FAILED: StopCause.FAILED,
    pb.CAUSE_MIGRATED: StopCause.MIGRATED,
    pb.CAUSE_SAVED: StopCause.SAVED,
    pb.CAUSE_PAUSED: StopCause.PAUSED,
    pb.CAUSE_UNDEFINED: StopCause.UNDEFINED,
    pb.CAUSE_OTHER: StopCause.OTHER,
}


def check_uuid(value: str, what: str) -> str:
    try:
        return str(uuid_module.UUID(value))
    except (ValueError, AttributeError):
        raise WireError(f"{what} {value[:64]!r} is not a UUID") from None


def validate_hello(hello: pb.Hello) -> None:
    """Raise WireError unless `hello` is something the manager can register."""
    check_uuid(hello.host_uuid, "host_uuid")
    if hello.protocol_version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {hello.protocol_version} is not supported (manager speaks "
                        f"{PROTOCOL_VERSION})")
    if not _HOSTNAME.match(hello.hostname):
        raise WireError(f"hostname {hello.hostname[:64]!r} is empty or not a host name")
    if len(hello.management_address) > MAX_NAME_CHARS:
        raise WireError("management_address is too long")


def capacity(message: pb.Capacity) -> HostCapacity:
    return HostCapacity(cpus=int(message.cpus), memory_mib=int(message.memory_mib))


def hello(message: pb.Hello) -> AgentHello:
    """A validated Hello (see validate_hello; host_uuid already in its canonical spelling) as the hub takes it."""
    agent = AgentInfo(agent_version=message.agent_version[:64], libvirt_version=message.libvirt_version[:64],
                      qemu_version=message.qemu_version[:64], boot_id=message.boot_id[:64])
    leases = message.disk_leases
    lease_manager = "" if leases.error or not leases.auto_disk_leases else leases.lock_manager[:32]
    return AgentHello(host_uuid=message.host_uuid, hostname=message.hostname,
                      management_address=message.management_address, capacity=capacity(message.capacity), agent=agent,
                      watchdog=watchdog(message.watchdog) if message.HasField("watchdog") else _UNREPORTED,
                      lease_manager=lease_manager,
                      inventory=inventory(message.inventory) if message.HasField("inventory") else UNREPORTED)


def inventory(message: pb.Inventory) -> HostInventory:
    """What the host offers VMs (issue 16), as placement reads it."""
    storage = tuple(StorageReach(m.identity, m.mount, m.healthy, m.detail[:MAX_DETAIL_CHARS]) for m in message.mounts)
    return HostInventory(
        reported=True, storage=storage, networks=frozenset(message.networks),
        free_memory_mib=int(message.free_memory_mib) if message.HasField("free_memory_mib") else None,
        memory_reserve_mib=int(message.memory_reserve_mib) if message.HasField("memory_reserve_mib") else None,
    )


_UNREPORTED = WatchdogReport(armed=False, detail="the agent reports no watchdog (an agent older than kvmha-watchdog)")


def watchdog(status: pb.WatchdogStatus) -> WatchdogReport:
    """The self-fence guarantee as the core counts on it: armed only with a usable, finite bound."""
    detail = status.detail[:MAX_DETAIL_CHARS]
    if not status.armed:
        return WatchdogReport(armed=False, detail=detail or "not armed")
    timeout_s = status.timeout_s
    if not math.isfinite(timeout_s) or not 0 < timeout_s <= MAX_WATCHDOG_TIMEOUT_S:
        return WatchdogReport(armed=False, detail=f"armed with an unusable timeout ({timeout_s!r} s)")
    return WatchdogReport(armed=True, timeout_s=timeout_s)


def welcome(terms: WelcomeTerms) -> pb.Welcome:
    return pb.Welcome(host_id=terms.host_id, ping_interval_s=terms.ping_interval_s, ping_timeout_s=terms.ping_timeout_s,
                      protocol_version=pb.PROTOCOL_VERSION_CURRENT, manager_id=terms.manager_id,
                      isolation_after_s=terms.isolation_after_s, epoch=terms.epoch)


def heartbeat(host_id: HostId, ping: pb.Ping) -> facts.HeartbeatReceived:
    storage_ok = all(status.ok for status in ping.storage)  # no configured paths: nothing is failing
    report = watchdog(ping.watchdog) if ping.HasField("watchdog") else _UNREPORTED
    return facts.HeartbeatReceived(host_id=host_id, sequence=int(ping.sequence),
                                   hypervisor_connected=ping.hypervisor_connected, storage_ok=storage_ok,
                                   watchdog=report)


def power_report(host_id: HostId, report: pb.PowerStateReport) -> facts.PowerStateReported:
    if len(report.domains) > MAX_DOMAINS_PER_REPORT:
        raise WireError(f"a report of {len(report.domains)} domains is more than {MAX_DOMAINS_PER_REPORT}")
    if not report.hypervisor_connected:
        return facts.PowerStateReported(host_id=host_id, full=report.full, hypervisor_connected=False)
    domains = tuple(_domain(entry) for entry in report.domains)
    return facts.PowerStateReported(host_id=host_id, full=report.full, hypervisor_connected=True, domains=domains)


def _domain(entry: pb.DomainPower) -> facts.DomainReport:
    uuid = check_uuid(entry.uuid, "domain uuid")
    power = _POWER.get(entry.state)
    if power is None:
        raise WireError(f"domain {uuid}: power state {entry.state} is not known")
    cause = _CAUSE.get(entry.cause, StopCause.OTHER)
    if entry.state == pb.POWER_CRASHED and cause is StopCause.NONE:
        cause = StopCause.CRASHED
    return facts.DomainReport(uuid=VmUuid(uuid), name=entry.name[:MAX_NAME_CHARS], power=power, cause=cause,
                              migrating=paused_for_migration(entry), paused=entry.state == pb.POWER_PAUSED)


def migration_progress(host_id: HostId, message: pb.MigrationProgress) -> facts.MigrationProgressed:
    return facts.MigrationProgressed(
        host_id=host_id, request_id=RequestId(message.request_id[:256]),
        vm_uuid=VmUuid(check_uuid(message.vm_uuid, "vm uuid")), elapsed_s=max(0.0, message.elapsed_s),
        data_total_bytes=message.data_total_bytes, data_processed_bytes=message.data_processed_bytes,
        data_remaining_bytes=message.data_remaining_bytes, memory_iteration=message.memory_iteration)


def command_result(result: pb.CommandResult) -> facts.CommandCompleted:
    payload: facts.NeighborCheck | facts.VmStartConfirmed | facts.LeaseCheck | None = None
    kind = result.WhichOneof("payload")
    if kind == "neighbor":
        payload = _neighbor(result.neighbor)
    elif kind == "lease":
        payload = lease(result.lease)
    elif kind == "vm_started":
        payload = facts.VmStartConfirmed(vm_uuid=VmUuid(result.vm_started.uuid),
                                         already_running=result.vm_started.already_running)
    error = "" if result.ok else f"{pb.ErrorCode.Name(result.code)}: {result.message}"[:2000]
    return facts.CommandCompleted(request_id=RequestId(result.request_id), ok=result.ok, error=error,
                                  payload=payload)


_LEASE: dict[int, Literal["held", "free", "unknown"]] = {pb.LEASE_HELD: "held", pb.LEASE_FREE: "free"}


def lease(report: pb.LeaseReport) -> facts.LeaseCheck:
    """A neighbour's lease probe; anything but HELD or FREE (unset, unknown, a future value) reads unknown."""
    state = _LEASE.get(report.state, "unknown")
    holders = sorted({d.holder_pid for d in report.disks if d.state == pb.LEASE_HELD and d.holder_pid > 0})
    held_by = f"held by pid {', '.join(map(str, holders))}" if holders else ""
    detail = "; ".join(part for part in (held_by, report.detail[:MAX_DETAIL_CHARS]) if part)
    return facts.LeaseCheck(vm_uuid=VmUuid(report.vm_uuid[:64]), state=state, detail=detail)


def _neighbor(report: pb.NeighborReport) -> facts.NeighborCheck:
    # The target's id is filled in by the caller that knows which request this answers (see AgentSession).
    return facts.NeighborCheck(
        target_host_id=HostId(0),
        tcp_reachable=report.tcp_reachable,
        icmp_reachable=report.icmp_reachable if report.icmp_checked else None,
        heartbeat_age_s=report.heartbeat_age_s if report.heartbeat_found else None,
    )


def command_message(request_id: RequestId, command: actions.AgentCommand, timeout_s: float,
                    epoch: int = 0) -> pb.ManagerMessage:
    """`epoch`: the sender's lease epoch, the fencing token the agent checks (0: a manager without leases)."""
    message = pb.Command(request_id=request_id, timeout_s=timeout_s, epoch=epoch)
    if isinstance(command, actions.StartVm):
        message.start_vm.CopyFrom(pb.StartVm(vm_uuid=command.vm_uuid, domain_xml=command.domain_xml))
    elif isinstance(command, actions.StopVm):
        message.stop_vm.CopyFrom(pb.StopVm(vm_uuid=command.vm_uuid, timeout_s=command.timeout_s))
    elif isinstance(command, actions.DestroyVm):
        message.destroy_vm.CopyFrom(pb.DestroyVm(vm_uuid=command.vm_uuid))
    elif isinstance(command, actions.CheckNeighbor):
        message.check_neighbor.CopyFrom(pb.CheckNeighbor(host_uuid=command.target_uuid, address=command.address,
                                                         timeout_s=command.timeout_s))
    elif isinstance(command, actions.CheckLease):
        message.check_lease.CopyFrom(pb.CheckLease(vm_uuid=command.vm_uuid, domain_xml=command.domain_xml,
                                                   timeout_s=command.timeout_s))
    elif isinstance(command, actions.MigrateVm):
        message.migrate_vm.CopyFrom(pb.MigrateVm(vm_uuid=command.vm_uuid, target_host_uuid=command.target_uuid,
                                                 target_address=command.target_address, timeout_s=command.timeout_s))
    elif isinstance(command, actions.CancelMigration):
        message.cancel_migration.CopyFrom(pb.CancelMigration(vm_uuid=command.vm_uuid))
    elif isinstance(command, actions.GetCapacity):
        message.get_capacity.CopyFrom(pb.GetCapacity())
    else:
        assert_never(command)
    return pb.ManagerMessage(command=message)
