"""Commands from the manager: validate, run against the hypervisor port, answer with a CommandResult.

Every command is idempotent by request id: the first result is kept in a bounded LRU and a replay (also one that
arrives while the first run is still going) gets that same result without doing anything twice. The manager relies
on this to retry a command after a reconnect without risking a second start of a VM.

Nothing here raises into the agent: garbage arguments, unknown commands, libvirt errors and bugs all become an
error result. `CommandRunner.run` blocks (libvirt calls do) and is meant to run in a worker thread.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

from kvmha.agent import lease
from kvmha.agent.hypervisor import (
    Hypervisor,
    HypervisorError,
    MigrationOptions,
    MigrationStats,
    domain_uuid_from_xml,
)
from kvmha.agent.neighbor import check_neighbor
from kvmha.proto.v1 import agent_pb2 as pb

log = logging.getLogger("kvmha.agent.commands")

DEFAULT_STOP_TIMEOUT_S = 30.0
MAX_STOP_TIMEOUT_S = 3600.0
DEFAULT_NEIGHBOR_TIMEOUT_S = 5.0
MAX_NEIGHBOR_TIMEOUT_S = 60.0
MAX_REQUEST_ID_LEN = 256
MAX_LEASE_DISKS = 256
DEFAULT_MIGRATION_TIMEOUT_S = 300.0
MAX_MIGRATION_TIMEOUT_S = 6 * 3600.0
DEFAULT_MIGRATION_URI = "qemu+tls://{address}/system"
DEFAULT_MIGRATION = MigrationOptions()
ProgressSend = Callable[[pb.MigrationProgress], None]
_LEASE_STATES = {lease.LeaseState.HELD: pb.LEASE_HELD, lease.LeaseState.FREE: pb.LEASE_FREE,
                 lease.LeaseState.UNKNOWN: pb.LEASE_UNKNOWN}


class InvalidArgument(Exception):
    pass


def _uuid(value: str, field: str) -> str:
    try:
        return str(uuid_mod.UUID(value))
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"{field} is not a UUID: {value[:80]!r}") from exc


def _duration_s(value: float, field: str, default_s: float, max_s: float) -> float:
    """0 means the default; negative, NaN or infinite values are refused, large ones capped."""
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{field} must be a finite number >= 0, got {value!r}")
    return default_s if value == 0 else min(value, max_s)


def _error(request_id: str, code: int, message: str) -> pb.CommandResult:
    return pb.CommandResult(request_id=request_id, ok=False, code=code, message=message)  # type: ignore[arg-type]


class CommandRunner:
    def __init__(self, hypervisor: Hypervisor, storage_paths: tuple[str, ...], neighbor_port: int,
                 cache_size: int = 1024, lock_config: lease.LockConfig | None = None,
                 migration_uri: str = DEFAULT_MIGRATION_URI,
                 migration: MigrationOptions = DEFAULT_MIGRATION) -> None:
        self._hypervisor = hypervisor
        self._migration_uri = migration_uri
        self._migration = migration
        self._lock_config = lock_config or lease.LockConfig()
        self._storage_paths = storage_paths
        self._neighbor_port = neighbor_port
        self._cache_size = cache_size
        self._results: OrderedDict[str, Future[pb.CommandResult]] = OrderedDict()
        self._lock = threading.Lock()
        self._vm_locks: dict[str, threading.Lock] = {}
        self.newest_epoch = 0  # the newest manager lease epoch seen (Welcome or command): the fencing token

    def saw_epoch(self, epoch: int) -> None:
        """A manager of `epoch` welcomed this agent: commands of older epochs are refused from now on."""
        with self._lock:
            self.newest_epoch = max(self.newest_epoch, epoch)

    def run(self, command: pb.Command, progress: ProgressSend | None = None) -> pb.CommandResult:
        """Run `command` once per request id; a replay waits for and returns the first result. `progress` gets the
        progress reports of a long command (a migration), from the worker thread."""
        request_id = command.request_id
        if not request_id or len(request_id) > MAX_REQUEST_ID_LEN:
            return _error(request_id[:MAX_REQUEST_ID_LEN], pb.ERROR_INVALID_ARGUMENT,
                          "request_id must be 1..256 characters (it makes the command idempotent)")
        with self._lock:
            # Fencing token: a manager that took this host over has a newer epoch; a command of an older one comes
            # from a deposed manager (paused, cut off) and must not act, however late it arrives. 0: no leases.
            stale = 0 < command.epoch < self.newest_epoch
            if not stale:
                self.newest_epoch = max(self.newest_epoch, command.epoch)
        if stale:
            log.warning("event=command_refused reason=stale_epoch request_id=%s epoch=%d newest_epoch=%d",
                        request_id, command.epoch, self.newest_epoch)
            return _error(request_id, pb.ERROR_STALE_EPOCH,
                          f"epoch {command.epoch} is older than {self.newest_epoch}: its manager was deposed")
        with self._lock:
            future = self._results.get(request_id)
            first = future is None
            if future is None:
                future = Future()
                self._results[request_id] = future
                while len(self._results) > self._cache_size:
                    self._results.popitem(last=False)
            else:
                self._results.move_to_end(request_id)
        if not first:
            log.info("event=command_replay request_id=%s", request_id)
            result = pb.CommandResult()
            result.CopyFrom(future.result())
            return result
        result = self._execute(command, progress)
        future.set_result(result)
        return result

    def _execute(self, command: pb.Command, progress: ProgressSend | None = None) -> pb.CommandResult:
        kind = command.WhichOneof("kind")
        request_id = command.request_id
        try:
            if kind == "start_vm":
                result = self._start_vm(command.start_vm)
            elif kind == "stop_vm":
                result = self._stop_vm(command.stop_vm)
            elif kind == "destroy_vm":
                result = self._destroy_vm(command.destroy_vm)
            elif kind == "get_capacity":
                cap = self._hypervisor.capacity()
                result = pb.CommandResult(ok=True, capacity=pb.Capacity(
                    cpus=cap.cpus, memory_mib=cap.memory_mib, free_memory_mib=cap.free_memory_mib))
            elif kind == "check_neighbor":
                result = self._check_neighbor(command.check_neighbor)
            elif kind == "check_lease":
                result = self._check_lease(command.check_lease)
            elif kind == "migrate_vm":
                result = self._migrate_vm(request_id, command.migrate_vm, progress)
            elif kind == "cancel_migration":
                cancelled = self._hypervisor.cancel_migration(_uuid(command.cancel_migration.vm_uuid, "vm_uuid"))
                result = pb.CommandResult(ok=True, message="migration aborted" if cancelled else "no migration")
            else:
                result = _error(request_id, pb.ERROR_UNKNOWN_COMMAND,
                                "unknown or empty command (this agent speaks kvmha.v1: start_vm, stop_vm, "
                                "destroy_vm, check_neighbor, check_lease, get_capacity, migrate_vm, "
                                "cancel_migration)")
        except InvalidArgument as exc:
            result = _error(request_id, pb.ERROR_INVALID_ARGUMENT, str(exc))
        except HypervisorError as exc:
            result = _error(request_id, getattr(pb, exc.kind.value), exc.message)
        except Exception as exc:
            log.exception("event=command_internal_error request_id=%s kind=%s", request_id, kind)
            result = _error(request_id, pb.ERROR_INTERNAL, f"internal error: {exc!r}")
        result.request_id = request_id
        log.info("event=command_done request_id=%s kind=%s ok=%s code=%s message=%r", request_id, kind,
                 result.ok, pb.ErrorCode.Name(result.code), result.message)
        return result

    def _vm_lock(self, vm_uuid: str) -> threading.Lock:
        # Commands for one VM run one at a time (a StartVm racing a StopVm would make "already running" a lie).
        with self._lock:
            return self._vm_locks.setdefault(vm_uuid, threading.Lock())

    def _start_vm(self, cmd: pb.StartVm) -> pb.CommandResult:
        vm_uuid = _uuid(cmd.vm_uuid, "vm_uuid")
        if not cmd.domain_xml.strip():
            raise InvalidArgument("domain_xml is empty")
        try:
            root, xml_uuid = domain_uuid_from_xml(cmd.domain_xml)
        except HypervisorError as exc:
            raise InvalidArgument(exc.message) from exc
        domain_xml = cmd.domain_xml
        if xml_uuid is None:
            # The manager's uuid is the VM's identity; without it libvirt would invent one and idempotence breaks.
            ET.SubElement(root, "uuid").text = vm_uuid
            domain_xml = ET.tostring(root, encoding="unicode")
        elif xml_uuid != vm_uuid:
            raise InvalidArgument(f"vm_uuid {vm_uuid} does not match the domain XML's uuid {xml_uuid}")
        with self._vm_lock(vm_uuid):
            outcome = self._hypervisor.start_vm(domain_xml)
        message = "already running here: nothing started" if outcome.already_running else "started"
        return pb.CommandResult(ok=True, message=message,
                                vm_started=pb.VmStarted(uuid=outcome.uuid, already_running=outcome.already_running))

    def _stop_vm(self, cmd: pb.StopVm) -> pb.CommandResult:
        vm_uuid = _uuid(cmd.vm_uuid, "vm_uuid")
        timeout_s = _duration_s(cmd.timeout_s, "timeout_s", DEFAULT_STOP_TIMEOUT_S, MAX_STOP_TIMEOUT_S)
        with self._vm_lock(vm_uuid):
            self._hypervisor.stop_vm(vm_uuid, timeout_s)
        return pb.CommandResult(ok=True, message="stopped")

    def _destroy_vm(self, cmd: pb.DestroyVm) -> pb.CommandResult:
        vm_uuid = _uuid(cmd.vm_uuid, "vm_uuid")
        with self._vm_lock(vm_uuid):
            self._hypervisor.destroy_vm(vm_uuid)
        return pb.CommandResult(ok=True, message="destroyed")

    def _migrate_vm(self, request_id: str, cmd: pb.MigrateVm, progress: ProgressSend | None) -> pb.CommandResult:
        vm_uuid = _uuid(cmd.vm_uuid, "vm_uuid")
        _uuid(cmd.target_host_uuid, "target_host_uuid")
        address = cmd.target_address.strip()
        if not address or len(address) > 253 or any(c.isspace() or c in "/\\@?#" for c in address) \
                or address.startswith("-"):
            raise InvalidArgument(f"target_address is not a host name or IP address: {cmd.target_address[:80]!r}")
        timeout_s = _duration_s(cmd.timeout_s, "timeout_s", DEFAULT_MIGRATION_TIMEOUT_S, MAX_MIGRATION_TIMEOUT_S)
        dest_uri = self._migration_uri.format(address=address)

        def report(stats: MigrationStats) -> None:
            if progress is not None:
                progress(pb.MigrationProgress(
                    request_id=request_id, vm_uuid=vm_uuid, elapsed_s=stats.elapsed_s,
                    data_total_bytes=stats.data_total_bytes, data_processed_bytes=stats.data_processed_bytes,
                    data_remaining_bytes=stats.data_remaining_bytes, memory_iteration=stats.memory_iteration))

        log.info("event=migration_start vm=%s dest=%s timeout_s=%.0f", vm_uuid, dest_uri, timeout_s)
        with self._vm_lock(vm_uuid):
            self._hypervisor.migrate_vm(vm_uuid, dest_uri, timeout_s, self._migration, report)
        return pb.CommandResult(ok=True, message=f"migrated to {address}")

    def _check_neighbor(self, cmd: pb.CheckNeighbor) -> pb.CommandResult:
        host_uuid = _uuid(cmd.host_uuid, "host_uuid")  # also keeps the heartbeat path inside the storage dir
        address = cmd.address.strip()
        if not address or len(address) > 253 or any(c.isspace() or c in "/\\" for c in address) \
                or address.startswith("-"):
            raise InvalidArgument(f"address is not a host name or IP address: {cmd.address[:80]!r}")
        if cmd.port > 65535:
            raise InvalidArgument(f"port {cmd.port} is not a TCP port")
        port = cmd.port or self._neighbor_port
        timeout_s = _duration_s(cmd.timeout_s, "timeout_s", DEFAULT_NEIGHBOR_TIMEOUT_S, MAX_NEIGHBOR_TIMEOUT_S)
        outcome = check_neighbor(host_uuid, address, port, timeout_s, self._storage_paths)
        report = pb.NeighborReport(
            host_uuid=host_uuid, tcp_reachable=outcome.tcp_reachable, icmp_checked=outcome.icmp_checked,
            icmp_reachable=outcome.icmp_reachable, heartbeat_found=outcome.heartbeat.found,
            heartbeat_age_s=outcome.heartbeat.age_s if outcome.heartbeat.found else -1.0, detail=outcome.detail)
        return pb.CommandResult(ok=True, message=outcome.detail, neighbor=report)

    def _check_lease(self, cmd: pb.CheckLease) -> pb.CommandResult:
        """The VM's disk leases as this host sees them (never takes them); see kvmha.agent.lease."""
        vm_uuid = _uuid(cmd.vm_uuid, "vm_uuid") if cmd.vm_uuid else ""
        timeout_s = _duration_s(cmd.timeout_s, "timeout_s", lease.DEFAULT_TIMEOUT_S, lease.MAX_TIMEOUT_S)
        if cmd.domain_xml.strip():
            try:
                disks, notes = lease.leased_disks(cmd.domain_xml)
            except ValueError as exc:
                raise InvalidArgument(str(exc)) from exc
        else:
            if len(cmd.disk_paths) > MAX_LEASE_DISKS:
                raise InvalidArgument(f"more than {MAX_LEASE_DISKS} disk paths")
            if not all(os.path.isabs(p) and "\0" not in p for p in cmd.disk_paths):
                raise InvalidArgument("disk_paths must be absolute paths")
            disks, notes = [lease.LeasedDisk(p, shared=False) for p in cmd.disk_paths], []
        lockspace = cmd.lockspace_dir or None
        if lockspace is not None and not os.path.isabs(lockspace):
            raise InvalidArgument(f"lockspace_dir {lockspace[:80]!r} must be an absolute path")
        outcome = lease.check_lease(disks, self._lock_config, lockspace, timeout_s, notes)
        report = pb.LeaseReport(
            vm_uuid=vm_uuid, state=_LEASE_STATES[outcome.state], lockspace_dir=outcome.lockspace_dir,
            detail=outcome.detail[:4000], disks=[
                pb.DiskLease(disk_path=d.disk_path, lease_path=d.lease_path, state=_LEASE_STATES[d.state],
                             shared=d.shared, holder_pid=d.holder_pid, detail=d.detail) for d in outcome.disks])
        return pb.CommandResult(ok=True, message=f"lease {outcome.state.value}: {outcome.detail}"[:4000],
                                lease=report)
