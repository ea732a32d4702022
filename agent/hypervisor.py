"""The hypervisor port: what the agent needs from libvirt, and a fake of it for tests.

The agent's link, commands and isolation response talk to a `Hypervisor`; `libvirt_adapter.LibvirtHypervisor` is
the real one (the only module that imports libvirt) and `FakeHypervisor` an in-memory one that the unit tests drive.
Both must pass the same contract suite (tests/agent/test_hypervisor_contract.py).

Power states travel as `DomainPower` records whose `power` and `cause` are already decoded, so nothing above this
port needs libvirt's numbers; the raw numbers ride along for the audit log. Methods are synchronous and may block
(libvirt calls do): callers run them off the ping path, in threads.
"""

from __future__ import annotations

import enum
import threading
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol


class Power(enum.Enum):
    """Mirrors kvmha.v1.PowerState (same member names without the prefix)."""

    ON = "POWER_ON"
    OFF = "POWER_OFF"
    PAUSED = "POWER_PAUSED"
    CRASHED = "POWER_CRASHED"
    UNKNOWN = "POWER_UNKNOWN"


class Cause(enum.Enum):
    """Mirrors kvmha.v1.StateCause: why a domain is in its state."""

    BOOTED = "CAUSE_BOOTED"
    GUEST_SHUTDOWN = "CAUSE_GUEST_SHUTDOWN"
    DESTROYED = "CAUSE_DESTROYED"
    CRASHED = "CAUSE_CRASHED"
    FAILED = "CAUSE_FAILED"
    MIGRATED = "CAUSE_MIGRATED"
    SAVED = "CAUSE_SAVED"
    PAUSED = "CAUSE_PAUSED"
    UNDEFINED = "CAUSE_UNDEFINED"
    OTHER = "CAUSE_OTHER"


@dataclass(frozen=True)
class DomainPower:
    """One domain's power state. For deltas from lifecycle events, `libvirt_event`/`libvirt_detail` are set."""

    uuid: str
    name: str
    power: Power
    cause: Cause
    libvirt_state: int = -1
    libvirt_reason: int = -1
    libvirt_event: int = -1
    libvirt_detail: int = -1
    detail_text: str = ""


@dataclass(frozen=True)
class HostCapacity:
    cpus: int
    memory_mib: int
    free_memory_mib: int


@dataclass(frozen=True)
class Versions:
    libvirt: str
    qemu: str


class ErrorKind(enum.Enum):
    """Mirrors the failure codes of kvmha.v1.ErrorCode that a hypervisor call can produce."""

    INVALID_ARGUMENT = "ERROR_INVALID_ARGUMENT"
    LIBVIRT = "ERROR_LIBVIRT"
    TIMEOUT = "ERROR_TIMEOUT"
    UNAVAILABLE = "ERROR_HYPERVISOR_UNAVAILABLE"
    NOT_FOUND = "ERROR_NOT_FOUND"


class HypervisorError(Exception):
    """A failed hypervisor call; `message` carries libvirt's own text where there is one."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class MigrationStats:
    """libvirt's job statistics of a migration in progress (virDomainGetJobStats)."""

    elapsed_s: float
    data_total_bytes: int
    data_processed_bytes: int
    data_remaining_bytes: int
    memory_iteration: int


ProgressSink = Callable[[MigrationStats], None]


@dataclass(frozen=True)
class MigrationOptions:
    """How the agent migrates ([migration] in its configuration)."""

    tls: bool = True  # QEMU encrypts the migration stream (VIR_MIGRATE_TLS)
    # VIR_MIGRATE_UNSAFE: migrate although libvirt cannot tell that the disks are on shared storage (the lab's
    # "shared storage" is one local folder that every host namespace sees; libvirt 9.0 knows only network file
    # systems as shared). Never on real hosts with local disks.
    unsafe: bool = False


@dataclass(frozen=True)
class StartOutcome:
    uuid: str
    already_running: bool


class HypervisorListener(Protocol):
    """Called from the hypervisor's event thread: must return quickly and never call back into the hypervisor."""

    def domain_changed(self, domain: DomainPower) -> None: ...

    def connection_changed(self, connected: bool) -> None: ...


class Hypervisor(Protocol):
    def open(self) -> None:
        """Start connecting (and keep reconnecting in the background); returns at once."""

    def close(self) -> None: ...

    def is_connected(self) -> bool:
        """Cheap, never blocks: the last known state of the connection."""

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until connected or timeout_s has passed; True when connected."""

    def subscribe(self, listener: HypervisorListener) -> None: ...

    def list_domains(self) -> list[DomainPower]:
        """Every domain on this host (running or defined). Raises HypervisorError(UNAVAILABLE) while disconnected."""

    def start_vm(self, domain_xml: str) -> StartOutcome: ...

    def stop_vm(self, vm_uuid: str, timeout_s: float) -> None:
        """Graceful shutdown, waiting up to timeout_s for the domain to go off, then destroy."""

    def destroy_vm(self, vm_uuid: str) -> None: ...

    def capacity(self) -> HostCapacity: ...

    def migrate_vm(self, vm_uuid: str, dest_uri: str, timeout_s: float, options: MigrationOptions,
                   progress: ProgressSink) -> None:
        """Live-migrate the domain to `dest_uri` (peer to peer); returns when libvirt completed it. After
        `timeout_s` the job is aborted (the VM keeps running here) and HypervisorError(TIMEOUT) raised."""

    def cancel_migration(self, vm_uuid: str) -> bool:
        """Abort the domain's migration job; False when none was running."""

    def versions(self) -> Versions: ...


def domain_uuid_from_xml(domain_xml: str) -> tuple[ET.Element, str | None]:
    """Parse a domain XML; return its root and its <uuid> (normalised), raising INVALID_ARGUMENT on garbage."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise HypervisorError(ErrorKind.INVALID_ARGUMENT, f"malformed domain XML: {exc}") from exc
    if root.tag != "domain":
        raise HypervisorError(ErrorKind.INVALID_ARGUMENT, f"root element is <{root.tag}>, expected <domain>")
    text = root.findtext("uuid")
    if text is None:
        return root, None
    try:
        return root, str(uuid_mod.UUID(text.strip()))
    except ValueError as exc:
        raise HypervisorError(ErrorKind.INVALID_ARGUMENT, f"bad <uuid> in domain XML: {text!r}") from exc


@dataclass
class _FakeDomain:
    uuid: str
    name: str
    running: bool
    cause: Cause
    pid: int


class FakeHypervisor:
    """An in-memory hypervisor for unit tests: domains are records, events fire synchronously to listeners.

    Knobs for tests: `connected` (simulate libvirtd loss), `delay_s` (slow calls), `ignore_shutdown` (a guest that
    ignores ACPI, so StopVm must fall back to destroy), `fail_next` (the next call raises a libvirt-like error).
    """

    def __init__(self, cpus: int = 8, memory_mib: int = 16384) -> None:
        self._lock = threading.RLock()
        self._domains: dict[str, _FakeDomain] = {}
        self._listeners: list[HypervisorListener] = []
        self._cpus = cpus
        self._memory_mib = memory_mib
        self._next_pid = 1000
        self.connected = False
        self.delay_s = 0.0
        self.ignore_shutdown = False
        self.fail_next: str | None = None
        self.calls: list[str] = []
        self.peers: dict[str, FakeHypervisor] = {}  # migration URI -> the hypervisor it reaches
        self.migration_steps = 3  # progress reports of a migration, `migration_step_s` apart
        self.migration_step_s = 0.01
        self._cancelled: set[str] = set()

    # -- port -------------------------------------------------------------------------------------------------
    def open(self) -> None:
        self.set_connected(True)

    def close(self) -> None:
        self.connected = False

    def is_connected(self) -> bool:
        return self.connected

    def wait_connected(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.connected

    def subscribe(self, listener: HypervisorListener) -> None:
        self._listeners.append(listener)

    def list_domains(self) -> list[DomainPower]:
        self._enter("list_domains")
        with self._lock:
            return [self._power(d) for d in self._domains.values()]

    def start_vm(self, domain_xml: str) -> StartOutcome:
        self._enter("start_vm")
        root, vm_uuid = domain_uuid_from_xml(domain_xml)
        name = root.findtext("name")
        if not name:
            raise HypervisorError(ErrorKind.LIBVIRT, "XML error: missing domain name information")
        vm_uuid = vm_uuid or str(uuid_mod.uuid4())
        with self._lock:
            existing = self._domains.get(vm_uuid)
            if existing is not None and existing.running:
                return StartOutcome(vm_uuid, already_running=True)
            self._next_pid += 1
            dom = _FakeDomain(vm_uuid, name, running=True, cause=Cause.BOOTED, pid=self._next_pid)
            self._domains[vm_uuid] = dom
        self._emit(replace(self._power(dom), libvirt_event=2, libvirt_detail=0))
        return StartOutcome(vm_uuid, already_running=False)

    def stop_vm(self, vm_uuid: str, timeout_s: float) -> None:
        self._enter("stop_vm")
        dom = self._find(vm_uuid)
        if not dom.running:
            return
        if self.ignore_shutdown:
            time.sleep(timeout_s)  # a guest that ignores ACPI is destroyed once the timeout has passed
            self._stop(dom, Cause.DESTROYED)
        else:
            self._stop(dom, Cause.GUEST_SHUTDOWN)

    def destroy_vm(self, vm_uuid: str) -> None:
        self._enter("destroy_vm")
        dom = self._find(vm_uuid)
        if dom.running:
            self._stop(dom, Cause.DESTROYED)

    def capacity(self) -> HostCapacity:
        self._enter("capacity")
        with self._lock:
            used_mib = 512 * sum(1 for d in self._domains.values() if d.running)
        return HostCapacity(self._cpus, self._memory_mib, max(0, self._memory_mib - used_mib))

    def versions(self) -> Versions:
        self._enter("versions")
        return Versions("9.0.0", "7.2.0")

    def migrate_vm(self, vm_uuid: str, dest_uri: str, timeout_s: float, options: MigrationOptions,
                   progress: ProgressSink) -> None:
        self._enter("migrate_vm")
        dom = self._find(vm_uuid)
        peer = self.peers.get(dest_uri)
        if not dom.running:
            raise HypervisorError(ErrorKind.LIBVIRT, "Requested operation is not valid: domain is not running")
        if peer is None:
            raise HypervisorError(ErrorKind.LIBVIRT, f"unable to connect to server at '{dest_uri}'")
        started, total = time.monotonic(), 1 << 30
        for step in range(1, self.migration_steps + 1):
            time.sleep(self.migration_step_s)
            with self._lock:
                cancelled = vm_uuid in self._cancelled
                self._cancelled.discard(vm_uuid)
            if cancelled:
                raise HypervisorError(ErrorKind.LIBVIRT, "operation aborted: migration out job: canceled by client")
            if time.monotonic() - started > timeout_s:
                raise HypervisorError(ErrorKind.TIMEOUT, f"migration did not complete in {timeout_s:.0f} s: aborted")
            done = total * step // (self.migration_steps + 1)
            progress(MigrationStats(time.monotonic() - started, total, done, total - done, step))
        peer.accept_migrated(vm_uuid, dom.name)
        self._stop(dom, Cause.MIGRATED)

    def cancel_migration(self, vm_uuid: str) -> bool:
        self._enter("cancel_migration")
        with self._lock:
            self._cancelled.add(vm_uuid)
        return True

    def accept_migrated(self, vm_uuid: str, name: str) -> None:
        """The incoming side of a fake migration: the domain appears here (STARTED_MIGRATED, then RESUMED)."""
        with self._lock:
            self._next_pid += 1
            dom = _FakeDomain(vm_uuid, name, running=True, cause=Cause.BOOTED, pid=self._next_pid)
            self._domains[vm_uuid] = dom
        self._emit(replace(self._power(dom), libvirt_event=2, libvirt_detail=1))
        self._emit(replace(self._power(dom), libvirt_event=4, libvirt_detail=1))

    # -- test controls ----------------------------------------------------------------------------------------
    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        for listener in list(self._listeners):
            listener.connection_changed(connected)

    def crash(self, vm_uuid: str, cause: Cause = Cause.FAILED) -> None:
        """What a `kill -9` of QEMU looks like (STOPPED_FAILED), or another stop cause."""
        self._stop(self._find(vm_uuid), cause)

    def running_uuids(self) -> set[str]:
        with self._lock:
            return {d.uuid for d in self._domains.values() if d.running}

    # -- internals --------------------------------------------------------------------------------------------
    def _enter(self, call: str) -> None:
        self.calls.append(call)
        if self.delay_s:
            time.sleep(self.delay_s)
        if not self.connected:
            raise HypervisorError(ErrorKind.UNAVAILABLE, "not connected to the hypervisor")
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise HypervisorError(ErrorKind.LIBVIRT, message)

    def _find(self, vm_uuid: str) -> _FakeDomain:
        with self._lock:
            dom = self._domains.get(vm_uuid)
        if dom is None:
            raise HypervisorError(ErrorKind.NOT_FOUND, f"Domain not found: no domain with matching uuid '{vm_uuid}'")
        return dom

    def _stop(self, dom: _FakeDomain, cause: Cause) -> None:
        with self._lock:
            dom.running = False
            dom.cause = cause
        detail = {Cause.GUEST_SHUTDOWN: 0, Cause.DESTROYED: 1, Cause.CRASHED: 2, Cause.MIGRATED: 3,
                  Cause.FAILED: 5}.get(cause, 0)
        self._emit(replace(self._power(dom), libvirt_event=5, libvirt_detail=detail))

    def _power(self, dom: _FakeDomain) -> DomainPower:
        power = Power.ON if dom.running else Power.OFF
        return DomainPower(dom.uuid, dom.name, power, dom.cause, detail_text=f"{power.name}_{dom.cause.name}")

    def _emit(self, domain: DomainPower) -> None:
        for listener in list(self._listeners):
            listener.domain_changed(domain)

