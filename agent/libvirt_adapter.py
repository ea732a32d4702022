"""The real hypervisor port over libvirt: the only module of the agent that imports libvirt.

Theory of operation:
- One process-wide libvirt event loop: `virEventRegisterDefaultImpl()` before the first connection, and a daemon
  thread running `virEventRunDefaultImpl()` forever. Lifecycle callbacks, the close callback and keepalive all run
  on it, so callbacks only decode and hand over: they never block and never make a remote call.
- One connection at a time, owned by a "libvirt-connect" thread that (re)opens it: after a close callback (libvirtd
  died: EOF; or hung: keepalive), after a call that finds the connection dead, and at start. While it is down,
  `is_connected()` is False and calls raise UNAVAILABLE, so the agent says "hypervisor unreachable" instead of
  "every VM is gone".
- Power states are decoded here into Power + Cause (tables below), for the full snapshot from `virDomainGetState`
  and for deltas from lifecycle events. The telling cases for HA: STOPPED_SHUTDOWN (the guest powered off: do not
  restart), STOPPED_DESTROYED (someone destroyed it), STOPPED_FAILED (QEMU died, e.g. SIGKILL: restart),
  STOPPED_CRASHED / CRASHED (guest panic with on_crash=destroy / preserve).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import libvirt

from kvmha.agent.hypervisor import (
    Cause,
    DomainPower,
    ErrorKind,
    HostCapacity,
    HypervisorError,
    HypervisorListener,
    MigrationOptions,
    MigrationStats,
    Power,
    ProgressSink,
    StartOutcome,
    Versions,
    domain_uuid_from_xml,
)

log = logging.getLogger("kvmha.agent.libvirt")

# virDomainState -> (power, name)
STATES: dict[int, tuple[Power, str]] = {
    0: (Power.UNKNOWN, "NOSTATE"), 1: (Power.ON, "RUNNING"), 2: (Power.ON, "BLOCKED"), 3: (Power.PAUSED, "PAUSED"),
    4: (Power.ON, "SHUTDOWN"), 5: (Power.OFF, "SHUTOFF"), 6: (Power.CRASHED, "CRASHED"),
    7: (Power.PAUSED, "PMSUSPENDED"),
}
_RUNNING_BOOTED_REASONS = {1: "BOOTED", 2: "MIGRATED", 3: "RESTORED", 4: "FROM_SNAPSHOT", 8: "WAKEUP"}
# virDomainShutoffReason -> cause: the reason libvirt records when a domain stops.
SHUTOFF_REASONS: dict[int, tuple[Cause, str]] = {
    0: (Cause.OTHER, "UNKNOWN"), 1: (Cause.GUEST_SHUTDOWN, "SHUTDOWN"), 2: (Cause.DESTROYED, "DESTROYED"),
    3: (Cause.CRASHED, "CRASHED"), 4: (Cause.MIGRATED, "MIGRATED"), 5: (Cause.SAVED, "SAVED"),
    6: (Cause.FAILED, "FAILED"), 7: (Cause.OTHER, "FROM_SNAPSHOT"), 8: (Cause.OTHER, "DAEMON"),
}

EVENT_NAMES = ("DEFINED", "UNDEFINED", "STARTED", "SUSPENDED", "RESUMED", "STOPPED", "SHUTDOWN", "PMSUSPENDED",
               "CRASHED")
_STARTED_DETAILS = ("BOOTED", "MIGRATED", "RESTORED", "FROM_SNAPSHOT", "WAKEUP")
_STOPPED_DETAILS = ("SHUTDOWN", "DESTROYED", "CRASHED", "MIGRATED", "SAVED", "FAILED", "FROM_SNAPSHOT")
_SHUTDOWN_DETAILS = ("FINISHED", "GUEST", "HOST")
EVENT_DEFINED, EVENT_UNDEFINED = 0, 1


def decode_state(state: int, reason: int) -> tuple[Power, Cause, str]:
    """virDomainGetState's (state, reason) -> (power, cause, text such as 'SHUTOFF_FAILED')."""
    power, state_name = STATES.get(state, (Power.UNKNOWN, f"STATE{state}"))
    if state == 5:
        cause, reason_name = SHUTOFF_REASONS.get(reason, (Cause.OTHER, str(reason)))
    elif state == 1 and reason in _RUNNING_BOOTED_REASONS:
        cause, reason_name = Cause.BOOTED, _RUNNING_BOOTED_REASONS[reason]
    elif power is Power.PAUSED:
        cause, reason_name = Cause.PAUSED, str(reason)
    elif power is Power.CRASHED:
        cause, reason_name = Cause.CRASHED, str(reason)
    else:
        cause, reason_name = Cause.OTHER, str(reason)
    return power, cause, f"{state_name}_{reason_name}"


def decode_event(event: int, detail: int) -> tuple[Power, Cause, int, int, str] | None:
    """A lifecycle event -> (power, cause, implied state, reason (-1: not known from an event), text).

    None for DEFINED/UNDEFINED: they change the definition, not the power state (undefining a running domain
    leaves it running), so they make no delta."""
    if event in (EVENT_DEFINED, EVENT_UNDEFINED):
        return None
    name = EVENT_NAMES[event] if 0 <= event < len(EVENT_NAMES) else f"EVENT{event}"

    def text(details: tuple[str, ...]) -> str:
        return f"{name}_{details[detail] if 0 <= detail < len(details) else detail}"

    if event == 2:  # STARTED
        return Power.ON, Cause.BOOTED, 1, -1, text(_STARTED_DETAILS)
    if event == 5:  # STOPPED: detail d names the same cause as shutoff reason d + 1
        # The reason stays -1: libvirt does not always record the event's cause as the state reason (9.0 sends
        # STOPPED_FAILED for a SIGKILLed QEMU but records SHUTOFF_CRASHED), and a delta must not invent numbers.
        cause = SHUTOFF_REASONS.get(detail + 1, (Cause.OTHER, ""))[0]
        return Power.OFF, cause, 5, -1, text(_STOPPED_DETAILS)
    if event == 3:  # SUSPENDED
        return Power.PAUSED, Cause.PAUSED, 3, -1, f"{name}_{detail}"
    if event == 4:  # RESUMED
        return Power.ON, Cause.OTHER, 1, -1, f"{name}_{detail}"
    if event == 6:  # SHUTDOWN: the guest (or host) asked for a shutdown; QEMU is still there for a moment
        return Power.ON, Cause.OTHER, 4, -1, text(_SHUTDOWN_DETAILS)
    if event == 7:
        return Power.PAUSED, Cause.PAUSED, 7, -1, f"{name}_{detail}"
    if event == 8:  # CRASHED: guest panic with on_crash=preserve
        return Power.CRASHED, Cause.CRASHED, 6, -1, f"{name}_{detail}"
    return Power.UNKNOWN, Cause.OTHER, -1, -1, f"{name}_{detail}"


_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop() -> None:
    """Register libvirt's default event loop once per process, before any connection is opened."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors surface as exceptions, not stderr
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def _run_event_loop() -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:
            log.exception("event=libvirt_event_loop_error")
            time.sleep(0.1)


_CONNECTION_ERRORS = {"VIR_ERR_NO_CONNECT", "VIR_ERR_INVALID_CONN", "VIR_ERR_RPC", "VIR_ERR_SYSTEM_ERROR"}


class LibvirtHypervisor:
    def __init__(self, uri: str, keepalive_interval_s: int = 3, keepalive_count: int = 3,
                 reconnect_max_s: float = 5.0) -> None:
        self.uri = uri
        self._keepalive = (keepalive_interval_s, keepalive_count)
        self._reconnect_max_s = reconnect_max_s
        self._lock = threading.Lock()
        self._conn: Any = None
        self._stale: list[Any] = []
        self._listeners: list[HypervisorListener] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- connection ---------------------------------------------------------------------------------------
    def open(self) -> None:
        _ensure_event_loop()
        self._thread = threading.Thread(target=self._connect_loop, name="libvirt-connect", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.is_connected():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            self._release(conn)

    def is_connected(self) -> bool:
        return self._conn is not None

    def subscribe(self, listener: HypervisorListener) -> None:
        self._listeners.append(listener)

    def _connect_loop(self) -> None:
        backoff_s = 0.2
        last_error = ""
        while not self._stop.is_set():
            self._release_stale()
            if self._conn is None:
                try:
                    self._connect()
                    backoff_s, last_error = 0.2, ""
                except libvirt.libvirtError as exc:
                    message = str(exc.get_error_message())
                    if message != last_error:  # once per distinct error, not once per retry
                        log.warning("event=libvirt_connect_failed uri=%s error=%r", self.uri, message)
                        last_error = message
                    backoff_s = min(self._reconnect_max_s, backoff_s * 2)
            self._wake.wait(1.0 if self._conn is not None else backoff_s)
            self._wake.clear()

    def _connect(self) -> None:
        conn = libvirt.open(self.uri)
        # Local drivers (test:///) have no keepalive: nothing can hang between us and them.
        with contextlib.suppress(libvirt.libvirtError):
            conn.setKeepAlive(*self._keepalive)
        conn.registerCloseCallback(self._on_close, None)
        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        with self._lock:
            self._conn = conn
        log.info("event=libvirt_connected uri=%s", self.uri)
        self._notify_connection(True)

    def _on_close(self, conn: Any, reason: int, _opaque: object) -> None:
        # Runs on the event loop: mark down and wake the connect thread; the dead object is released there.
        names = {0: "error", 1: "eof", 2: "keepalive", 3: "client"}
        self._mark_down(conn, f"closed ({names.get(reason, reason)})")

    def _mark_down(self, conn: Any, why: str) -> None:
        with self._lock:
            if conn is not self._conn or conn is None:
                return
            self._conn = None
            self._stale.append(conn)
        log.warning("event=libvirt_disconnected uri=%s why=%r", self.uri, why)
        self._notify_connection(False)
        self._wake.set()

    def _release_stale(self) -> None:
        with self._lock:
            stale, self._stale = self._stale, []
        for conn in stale:
            self._release(conn)

    @staticmethod
    def _release(conn: Any) -> None:
        for step in (conn.unregisterCloseCallback, conn.close):
            # A dead connection refuses its own cleanup; the object is freed anyway.
            with contextlib.suppress(libvirt.libvirtError):
                step()

    def _notify_connection(self, connected: bool) -> None:
        for listener in list(self._listeners):
            listener.connection_changed(connected)

    def _use(self) -> Any:
        conn = self._conn
        if conn is None:
            raise HypervisorError(ErrorKind.UNAVAILABLE, f"no connection to libvirt at {self.uri}")
        return conn

    def _error(self, conn: Any, exc: libvirt.libvirtError) -> HypervisorError:
        """Translate a libvirt error; a connection-level one also marks the connection down for reconnecting."""
        code = exc.get_error_code()
        message = str(exc.get_error_message() or exc)
        if code == libvirt.VIR_ERR_NO_DOMAIN:
            return HypervisorError(ErrorKind.NOT_FOUND, message)
        if any(code == getattr(libvirt, name, None) for name in _CONNECTION_ERRORS):
            alive = 0
            with contextlib.suppress(libvirt.libvirtError):
                alive = conn.isAlive()
            if not alive:
                self._mark_down(conn, message)
                return HypervisorError(ErrorKind.UNAVAILABLE, message)
        return HypervisorError(ErrorKind.LIBVIRT, message)

    # -- events -------------------------------------------------------------------------------------------
    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, _opaque: object) -> None:
        try:
            decoded = decode_event(event, detail)
            if decoded is None:
                # Defined/undefined say nothing safe about power on their own (undefining a running domain leaves
                # it running; a lookup would race with later events). The periodic full report covers them.
                return
            power, cause, state, reason, text = decoded
            uuid, name = dom.UUIDString(), dom.name()  # both cached client-side: no remote call here
            self._emit(DomainPower(uuid, name, power, cause, state, reason, event, detail, text))
        except Exception:
            log.exception("event=libvirt_event_decode_failed event=%s detail=%s", event, detail)

    def _emit(self, domain: DomainPower) -> None:
        for listener in list(self._listeners):
            listener.domain_changed(domain)

    # -- calls --------------------------------------------------------------------------------------------
    def list_domains(self) -> list[DomainPower]:
        conn = self._use()
        try:
            domains = conn.listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc) from exc
        out = []
        for dom in domains:
            try:
                state, reason = dom.state()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue  # vanished between the listing and the look: not here any more
                raise self._error(conn, exc) from exc
            power, cause, text = decode_state(state, reason)
            out.append(DomainPower(dom.UUIDString(), dom.name(), power, cause, state, reason, -1, -1, text))
        return out

    def _lookup(self, conn: Any, vm_uuid: str) -> Any:
        try:
            return conn.lookupByUUIDString(vm_uuid)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc) from exc

    def start_vm(self, domain_xml: str) -> StartOutcome:
        conn = self._use()
        _, vm_uuid = domain_uuid_from_xml(domain_xml)
        try:
            if vm_uuid is not None:
                try:
                    if conn.lookupByUUIDString(vm_uuid).isActive():
                        return StartOutcome(vm_uuid, already_running=True)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            dom = conn.defineXML(domain_xml)
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                # Lost a race with another start of the same domain: it runs once, which is what was asked.
                if exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and dom.isActive():
                    return StartOutcome(dom.UUIDString(), already_running=True)
                raise
            return StartOutcome(dom.UUIDString(), already_running=False)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc) from exc

    def stop_vm(self, vm_uuid: str, timeout_s: float) -> None:
        conn = self._use()
        dom = self._lookup(conn, vm_uuid)
        deadline = time.monotonic() + timeout_s
        try:
            if not dom.isActive():
                return
            try:
                dom.shutdown()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise
            while time.monotonic() < deadline:
                if not dom.isActive():
                    return
                time.sleep(0.2)
            log.info("event=stop_timeout_destroying vm=%s timeout_s=%.1f", vm_uuid, timeout_s)
            self._destroy(dom)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc) from exc

    def destroy_vm(self, vm_uuid: str) -> None:
        conn = self._use()
        dom = self._lookup(conn, vm_uuid)
        try:
            self._destroy(dom)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc) from exc

    @staticmethod
    def _destroy(dom: Any) -> None:
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            # "domain is not running": already off is what destroy wants.
            if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID or dom.isActive():
                raise

    # -- live migration -------------------------------------------------------------------------------------
    # Policy (docs/operations.md): peer-to-peer live migration (the source's libvirtd talks to the target's over
    # `dest_uri`), AUTO_CONVERGE so that a guest dirtying memory faster than it is copied is throttled step by step
    # until the copy converges, ABORT_ON_ERROR (an I/O error aborts rather than pauses); a persistent domain is
    # defined on the target and undefined here (PERSIST_DEST | UNDEFINE_SOURCE) so it has one home; `tls` asks QEMU
    # to encrypt the migration stream (VIR_MIGRATE_TLS, QEMU's own x509 setup). No post-copy: a failure half-way
    # would lose the guest. A migration still running at `timeout_s` is aborted: the VM stays here, running.

    def migrate_vm(self, vm_uuid: str, dest_uri: str, timeout_s: float, options: MigrationOptions,
                   progress: ProgressSink) -> None:
        conn = self._use()
        dom = self._lookup(conn, vm_uuid)
        flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_AUTO_CONVERGE
                 | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
        try:
            if dom.isPersistent():
                flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc) from exc
        if options.tls:
            flags |= libvirt.VIR_MIGRATE_TLS
        if options.unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        failure: list[libvirt.libvirtError] = []

        def run() -> None:
            try:
                dom.migrateToURI3(dest_uri, {}, flags)
            except libvirt.libvirtError as exc:
                failure.append(exc)

        worker = threading.Thread(target=run, name=f"migrate-{vm_uuid[:8]}", daemon=True)
        started = time.monotonic()
        worker.start()
        aborted = False
        while worker.is_alive():
            worker.join(1.0)
            if not worker.is_alive():
                break
            stats = self._job_stats(dom, started)
            if stats is not None:
                progress(stats)
            if not aborted and time.monotonic() - started > timeout_s:
                log.warning("event=migration_timeout vm=%s timeout_s=%.0f: aborting the job", vm_uuid, timeout_s)
                aborted = self.cancel_job(dom)
        if aborted:
            raise HypervisorError(ErrorKind.TIMEOUT, f"migration did not complete in {timeout_s:.0f} s: aborted, "
                                                     "the VM keeps running on this host")
        if failure:
            raise self._error(conn, failure[0])

    @staticmethod
    def _job_stats(dom: Any, started: float) -> MigrationStats | None:
        try:
            stats = dom.jobStats()
        except libvirt.libvirtError:
            return None  # the job just ended (or has not begun): nothing to tell
        return MigrationStats(
            elapsed_s=time.monotonic() - started,
            data_total_bytes=int(stats.get("data_total", 0)),
            data_processed_bytes=int(stats.get("data_processed", 0)),
            data_remaining_bytes=int(stats.get("data_remaining", 0)),
            memory_iteration=int(stats.get("memory_iteration", 0)),
        )

    @staticmethod
    def cancel_job(dom: Any) -> bool:
        try:
            dom.abortJob()
            return True
        except libvirt.libvirtError as exc:
            log.info("event=migration_abort_failed error=%r", str(exc))
            return False

    def cancel_migration(self, vm_uuid: str) -> bool:
        conn = self._use()
        return self.cancel_job(self._lookup(conn, vm_uuid))

    def capacity(self) -> HostCapacity:
        conn = self._use()
        try:
            info = conn.getInfo()  # [model, memory MiB, cpus, mhz, nodes, sockets, cores, threads]
            try:
                free_mib = int(conn.getFreeMemory()) // (1024 * 1024)
            except libvirt.libvirtError:
                free_mib = 0  # not every driver can tell; 0 reads as "unknown, do not place here"
            return HostCapacity(cpus=int(info[2]), memory_mib=int(info[1]), free_memory_mib=free_mib)
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc) from exc

    def active_networks(self) -> list[str]:
        """Active libvirt networks as placement names them ("network:NAME"); [] when libvirt cannot say."""
        conn = self._use()
        try:
            return [f"network:{name}" for name in conn.listNetworks()]
        except libvirt.libvirtError:
            return []

    def versions(self) -> Versions:
        conn = self._use()
        try:
            return Versions(_version_text(conn.getLibVersion()), _version_text(conn.getVersion()))
        except libvirt.libvirtError as exc:
            raise self._error(conn, exc) from exc


def _version_text(number: int) -> str:
    return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"
