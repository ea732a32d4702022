"""The agent's end of the AgentLink stream (grpc.aio): hello, pings, power states, commands, reconnects.

Message order on every connection: Hello -> (Welcome | Reject) -> full PowerStateReport -> then, interleaved, Pings
every ping interval, delta PowerStateReports as libvirt reports changes, CommandResults, and a full report at least
every resync interval. SIGTERM adds a Goodbye before the agent closes its side.

Why it is built this way:
- Pings must never wait for libvirt: everything that may block (libvirt calls, commands, neighbour checks) runs in
  thread pools, and the ping task only reads cached facts (connection flag, heartbeat status, domain count).
- Deltas that arrive while a full snapshot is being listed are held back and sent after it, so that an older
  listing can never overwrite a newer event on the manager's side (a VM killed during a resync stays "off").
- While libvirt is down the agent sends `hypervisor_connected=false` (power states unknown), never an empty full
  report that the manager could read as "every VM is gone". The reconnect to libvirt triggers a full report.
- The stream reconnects forever: exponential backoff with jitter, rotating through the manager addresses after a
  failed attempt; a Reject waits at least its retry_after_s. Nothing here ends the process but `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from kvmha.agent.commands import CommandRunner
from kvmha.agent.heartbeat import HeartbeatWriter
from kvmha.agent.hypervisor import DomainPower, HostCapacity, Hypervisor, HypervisorError, Power, Versions
from kvmha.agent.inventory import changed as inventory_changed
from kvmha.proto.v1 import agent_pb2 as pb
from kvmha.proto.v1 import agent_pb2_grpc as pb_grpc

log = logging.getLogger("kvmha.agent.link")

_GRPC_OPTIONS = [
    # HTTP/2 keepalive finds a black-holed or stopped manager within ~10 s (the stream otherwise looks fine for
    # minutes); safe with a default server because the agent sends data (pings) far more often than it sends these.
    # grpc.http2.ping_timeout_ms is what ends the transport when the ping goes unanswered: with keepalive_timeout_ms
    # alone (grpcio 1.85) an agent stayed for minutes on a manager that was SIGSTOPped or cut off (lab, issue 15).
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.http2.ping_timeout_ms", 5000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


# A session that lasted this long resets the backoff; shorter ones count as failed attempts.
STABLE_SESSION_S = 10.0


@dataclass(frozen=True)
class LinkSettings:
    managers: tuple[str, ...]
    host_uuid: str
    hostname: str
    management_address: str
    storage_paths: tuple[str, ...]
    agent_version: str
    boot_id: str
    ping_interval_s: float = 2.0
    resync_interval_s: float = 30.0
    reconnect_base_s: float = 0.5
    reconnect_max_s: float = 8.0
    hello_timeout_s: float = 10.0
    tls_ca: str = ""  # with tls_cert and tls_key: mutual TLS; "" = plaintext (only when explicitly allowed)
    tls_cert: str = ""
    tls_key: str = ""
    # Storage, networks, memory for placement (agent/inventory.py); blocking, run in a worker thread. None: not sent.
    inventory: Callable[[], pb.Inventory] | None = None
    inventory_interval_s: float = 10.0  # how often it is read again; sent only when it changed

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to `address`; the certificate files are read now, so a renewed one is used at the next
        connection."""
        if not self.tls_ca:
            return grpc.aio.insecure_channel(address, options=_GRPC_OPTIONS)
        with open(self.tls_ca, "rb") as ca, open(self.tls_cert, "rb") as cert, open(self.tls_key, "rb") as key:
            credentials = grpc.ssl_channel_credentials(ca.read(), key.read(), cert.read())
        return grpc.aio.secure_channel(address, credentials, options=_GRPC_OPTIONS)


@dataclass(frozen=True)
class LinkHooks:
    """Additions to the link's messages made elsewhere (issue 11: the watchdog status in Hello and every Ping, the
    disk lease configuration in Hello, the manager's isolation delay from Welcome), so this module stays about the
    stream. Each is called on the asyncio loop and must not block."""

    hello: Callable[[pb.Hello], None] | None = None
    ping: Callable[[pb.Ping], None] | None = None
    welcome: Callable[[pb.Welcome], None] | None = None


def to_proto(d: DomainPower) -> pb.DomainPower:
    return pb.DomainPower(
        uuid=d.uuid, name=d.name, state=pb.PowerState.Value(d.power.value), cause=pb.StateCause.Value(d.cause.value),
        libvirt_state=d.libvirt_state, libvirt_reason=d.libvirt_reason, libvirt_event=d.libvirt_event,
        libvirt_detail=d.libvirt_detail, detail_text=d.detail_text)


def backoff_s(attempt: int, base_s: float, max_s: float, rand: Callable[[], float] = random.random) -> float:
    """Exponential backoff with jitter in [50 %, 100 %] of the step, so a fleet does not reconnect in lockstep."""
    step_s = min(max_s, base_s * (2.0 ** min(attempt, 30)))
    return float(step_s * (0.5 + 0.5 * rand()))


class _Session:
    """One connected stream: its outgoing queue and whether the first full snapshot went out."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[pb.AgentMessage | None] = asyncio.Queue()
        self.snapshots_running = 0
        self.pending: list[DomainPower] = []
        self.closed = False
        self.first_report = asyncio.Event()

    def send(self, msg: pb.AgentMessage) -> None:
        if not self.closed:
            self.queue.put_nowait(msg)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)


class AgentLink:
    """Implements HypervisorListener: libvirt's thread calls in, and the calls hop onto the asyncio loop."""

    def __init__(self, settings: LinkSettings, hypervisor: Hypervisor, runner: CommandRunner,
                 heartbeat: HeartbeatWriter | None, hooks: LinkHooks | None = None) -> None:
        self.settings = settings
        self._hooks = hooks or LinkHooks()
        self._hv = hypervisor
        self._runner = runner
        self._heartbeat = heartbeat
        self._standby_refused = False  # the last session ended in a standby manager's REJECT_NOT_ACTIVE
        self._work = ThreadPoolExecutor(max_workers=16, thread_name_prefix="agent-cmd")
        self._snap = ThreadPoolExecutor(max_workers=2, thread_name_prefix="agent-snap")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: _Session | None = None
        self._running: dict[str, bool] = {}
        self._ping_sequence = 0
        self._inventory_sent: pb.Inventory | None = None
        self._report_sequence = 0
        self.manager_seen_at = time.monotonic()
        self.sessions_started = 0
        self._tasks: set[asyncio.Future[None]] = set()

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        # The loop keeps only weak references to tasks: hold them until done so none is collected mid-flight.
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- HypervisorListener (called from libvirt's thread) --------------------------------------------------
    def domain_changed(self, domain: DomainPower) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_delta, domain)

    def connection_changed(self, connected: bool) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_hypervisor, connected)

    def _on_delta(self, domain: DomainPower) -> None:
        self._running[domain.uuid] = domain.power in (Power.ON, Power.PAUSED)
        log.info("event=domain_changed vm=%s name=%s state=%s cause=%s detail=%s", domain.uuid, domain.name,
                 domain.power.value, domain.cause.value, domain.detail_text)
        session = self._session
        if session is None:
            return  # the full snapshot after the next Welcome covers it
        if session.snapshots_running:
            session.pending.append(domain)
        else:
            session.send(self._report([domain], full=False, connected=True))

    def _on_hypervisor(self, connected: bool) -> None:
        session = self._session
        if session is None:
            return
        if connected:
            self._spawn(self._send_full(session))
        else:
            session.send(self._report([], full=False, connected=False))

    # -- messages -------------------------------------------------------------------------------------------
    def _report(self, domains: list[DomainPower], full: bool, connected: bool) -> pb.AgentMessage:
        self._report_sequence += 1
        return pb.AgentMessage(power=pb.PowerStateReport(
            full=full, domains=[to_proto(d) for d in domains], hypervisor_connected=connected,
            sequence=self._report_sequence))

    def _ping(self) -> pb.AgentMessage:
        self._ping_sequence += 1
        storage = [] if self._heartbeat is None else [
            pb.StorageHeartbeatStatus(path=s.path, ok=s.ok, last_ok_age_s=s.last_ok_age_s, error=s.error)
            for s in self._heartbeat.status()]
        msg = pb.AgentMessage(ping=pb.Ping(
            sequence=self._ping_sequence, hypervisor_connected=self._hv.is_connected(), storage=storage,
            domains_running=sum(self._running.values()), sent_mono_s=time.monotonic()))
        if self._hooks.ping is not None:
            self._hooks.ping(msg.ping)
        return msg

    def _host_facts(self) -> tuple[HostCapacity, Versions]:
        try:
            return self._hv.capacity(), self._hv.versions()
        except HypervisorError:
            return HostCapacity(0, 0, 0), Versions("", "")  # libvirt down: Hello goes out anyway

    async def _hello(self) -> pb.AgentMessage:
        loop = asyncio.get_running_loop()
        try:
            cap, ver = await asyncio.wait_for(loop.run_in_executor(self._snap, self._host_facts), 5.0)
        except TimeoutError:
            cap, ver = HostCapacity(0, 0, 0), Versions("", "")
        s = self.settings
        inventory = await self._read_inventory()
        msg = pb.AgentMessage(hello=pb.Hello(
            host_uuid=s.host_uuid, hostname=s.hostname, management_address=s.management_address,
            capacity=pb.Capacity(cpus=cap.cpus, memory_mib=cap.memory_mib, free_memory_mib=cap.free_memory_mib),
            libvirt_version=ver.libvirt, qemu_version=ver.qemu, agent_version=s.agent_version,
            protocol_version=pb.PROTOCOL_VERSION_CURRENT, boot_id=s.boot_id, storage_paths=list(s.storage_paths)))
        if inventory is not None:
            msg.hello.inventory.CopyFrom(inventory)
        self._inventory_sent = inventory
        if self._hooks.hello is not None:
            self._hooks.hello(msg.hello)
        return msg

    async def _read_inventory(self) -> pb.Inventory | None:
        source = self.settings.inventory
        if source is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._snap, source), 5.0)
        except Exception as exc:  # an inventory that cannot be read must not hold the link back
            log.warning("event=inventory_failed error=%r", exc)
            return None

    async def _inventory_sender(self, session: _Session) -> None:
        """Read the inventory every inventory_interval_s; send it when it changed (issue 16). Never returns: a helper
        that ends ends the session (_serve waits for the first task to finish)."""
        while True:
            await asyncio.sleep(self.settings.inventory_interval_s)
            inventory = await self._read_inventory()
            if inventory is not None and inventory_changed(self._inventory_sent, inventory):
                session.send(pb.AgentMessage(inventory=inventory))
                self._inventory_sent = inventory

    async def _send_full(self, session: _Session) -> None:
        """List every domain off the loop and send a full report; deltas meanwhile wait and follow it."""
        loop = asyncio.get_running_loop()
        session.snapshots_running += 1
        try:
            domains = await loop.run_in_executor(self._snap, self._hv.list_domains)
        except HypervisorError as exc:
            log.warning("event=snapshot_failed error=%r", exc.message)
            # Held-back deltas are dropped, not sent later: after the outage they could be older than the next
            # full report and undo it on the manager's side. That next full report is the truth.
            session.pending.clear()
            session.send(self._report([], full=False, connected=False))
            session.first_report.set()
            return
        finally:
            session.snapshots_running -= 1
        self._running = {d.uuid: d.power in (Power.ON, Power.PAUSED) for d in domains}
        session.send(self._report(domains, full=True, connected=True))
        session.first_report.set()
        if not session.snapshots_running:
            pending, session.pending = session.pending, []
            for domain in pending:
                self._running[domain.uuid] = domain.power in (Power.ON, Power.PAUSED)
                session.send(self._report([domain], full=False, connected=True))

    # -- the connection loop --------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Connect, serve, reconnect, until `stop` is set; then say Goodbye on the live stream, if any."""
        self._loop = asyncio.get_running_loop()
        index, attempt = 0, 0
        managers = self.settings.managers
        while not stop.is_set():
            address = managers[index % len(managers)]
            began = time.monotonic()
            try:
                welcomed, retry_after_s = await self._run_session(address, stop)
            except Exception:  # a bug in one session must not end the agent: back off and retry
                log.exception("event=link_session_error manager=%s", address)
                welcomed, retry_after_s = False, 0.0
            if stop.is_set():
                break
            if welcomed and time.monotonic() - began >= STABLE_SESSION_S:
                attempt = 0  # a session that worked for a while: try the same manager again, soon
            elif self._standby_refused:
                index, attempt, self._standby_refused = index + 1, 0, False  # (see _refused)
            else:
                # Failed, or welcomed and dropped at once (a manager in a crash loop): back off, next address.
                index, attempt = index + 1, attempt + 1
            delay_s = max(retry_after_s, backoff_s(attempt, self.settings.reconnect_base_s,
                                                   self.settings.reconnect_max_s))
            log.info("event=reconnect_wait delay_s=%.2f next_manager=%s", delay_s, managers[index % len(managers)])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay_s)
        self._work.shutdown(wait=False, cancel_futures=True)
        self._snap.shutdown(wait=False, cancel_futures=True)

    async def _run_session(self, address: str, stop: asyncio.Event) -> tuple[bool, float]:
        """One connection. Returns (reached Welcome, seconds a Reject asked us to wait)."""
        log.info("event=manager_connecting manager=%s", address)
        session = _Session()
        session.queue.put_nowait(await self._hello())
        async with self.settings.channel(address) as channel:
            call = pb_grpc.AgentLinkStub(channel).Connect(self._requests(session))
            responses = call.__aiter__()
            try:
                first: pb.ManagerMessage | None = await asyncio.wait_for(anext(responses),
                                                                         self.settings.hello_timeout_s)
            except StopAsyncIteration:
                first = None
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                log.warning("event=manager_connect_failed manager=%s error=%r", address, _grpc_text(exc))
                call.cancel()
                return False, 0.0
            if first is None or first.WhichOneof("msg") != "welcome":
                call.cancel()
                return False, self._refused(address, first)
            return True, await self._serve(address, call, responses, session, first.welcome, stop)

    def _refused(self, address: str, first: pb.ManagerMessage | None) -> float:
        self._standby_refused = False
        if first is not None and first.WhichOneof("msg") == "reject":
            r = first.reject
            # A standby manager is alive and answering: the next manager in the list (or this one, once it has
            # taken the lease over) is worth trying soon, so its refusal does not grow the back-off.
            self._standby_refused = r.code == pb.REJECT_NOT_ACTIVE
            log.error("event=manager_rejected manager=%s code=%s reason=%r retry_after_s=%.1f", address,
                      pb.RejectCode.Name(r.code), r.reason, r.retry_after_s)
            return _retry_after_s(r.retry_after_s)
        log.warning("event=manager_no_welcome manager=%s first=%r", address, str(first)[:200])
        return 0.0

    async def _serve(self, address: str, call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ManagerMessage],
                     responses: AsyncIterator[pb.ManagerMessage], session: _Session, welcome: pb.Welcome,
                     stop: asyncio.Event) -> float:
        ping_interval_s = welcome.ping_interval_s if welcome.ping_interval_s > 0 else self.settings.ping_interval_s
        resync_s = welcome.resync_interval_s if welcome.resync_interval_s > 0 else self.settings.resync_interval_s
        log.info("event=manager_welcome manager=%s manager_id=%s host_id=%d ping_interval_s=%.2f resync_s=%.1f",
                 address, welcome.manager_id, welcome.host_id, ping_interval_s, resync_s)
        self._runner.saw_epoch(welcome.epoch)
        if self._hooks.welcome is not None:
            self._hooks.welcome(welcome)
        self._session = session
        self.sessions_started += 1
        self.manager_seen_at = time.monotonic()
        retry_after_s = 0.0
        reader = asyncio.ensure_future(self._reader(responses, session))
        helpers = [asyncio.ensure_future(c) for c in (
            self._pinger(session, ping_interval_s), self._resyncer(session, resync_s))]
        if self.settings.inventory is not None:  # an agent without an inventory source (tests, older setups) sends none
            helpers.append(asyncio.ensure_future(self._inventory_sender(session)))
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait([reader, *helpers, stopper], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is stopper or task.cancelled():
                    continue
                if task.exception() is not None:
                    log.error("event=link_task_failed error=%r", task.exception())
                elif task is reader:
                    retry_after_s = reader.result()
            if stop.is_set():
                await self._goodbye(call, session)
        finally:
            session.close()
            self._session = None
            self.manager_seen_at = time.monotonic()
            for task in [reader, *helpers, stopper]:
                task.cancel()
            await asyncio.gather(reader, *helpers, stopper, return_exceptions=True)
            call.cancel()
        log.warning("event=manager_stream_ended manager=%s", address)
        return retry_after_s

    async def _goodbye(self, call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ManagerMessage],
                       session: _Session) -> None:
        session.send(pb.AgentMessage(goodbye=pb.Goodbye(reason="agent stopping (SIGTERM): planned shutdown")))
        session.close()  # the request stream drains what is queued (the Goodbye last), then half-closes
        # Give the manager a moment to read the Goodbye and end the call before the channel closes.
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, asyncio.CancelledError):
            await asyncio.wait_for(call.code(), 3.0)
        log.info("event=goodbye_sent")

    async def _requests(self, session: _Session) -> AsyncIterator[pb.AgentMessage]:
        """The outgoing half of the stream: everything queued for this session, in order, until it closes."""
        while (msg := await session.queue.get()) is not None:
            if msg.WhichOneof("msg") == "ping":
                self.manager_seen_at = time.monotonic()
            yield msg

    async def _pinger(self, session: _Session, interval_s: float) -> None:
        # The contract puts the full report first; a hung libvirt delays the first ping by one interval at most.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(session.first_report.wait(), interval_s)
        # Scheduled on absolute times, so a slow iteration does not push every later ping back.
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            session.send(self._ping())
            next_at += interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))

    async def _resyncer(self, session: _Session, interval_s: float) -> None:
        while True:
            await self._send_full(session)
            await asyncio.sleep(interval_s)

    async def _reader(self, responses: AsyncIterator[pb.ManagerMessage], session: _Session) -> float:
        try:
            async for msg in responses:
                kind = msg.WhichOneof("msg")
                if kind == "command":
                    self._spawn(self._command(msg.command, session))
                elif kind == "reject":
                    log.error("event=manager_rejected code=%s reason=%r retry_after_s=%.1f",
                              pb.RejectCode.Name(msg.reject.code), msg.reject.reason, msg.reject.retry_after_s)
                    return _retry_after_s(msg.reject.retry_after_s)
                else:
                    log.info("event=manager_message_ignored kind=%s", kind)
        except grpc.aio.AioRpcError as exc:
            log.warning("event=manager_read_failed error=%r", _grpc_text(exc))
        return 0.0
    async def _command(self, command: pb.Command, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        log.info("event=command_received request_id=%s kind=%s", command.request_id, command.WhichOneof("kind"))
        def progress(message: pb.MigrationProgress) -> None:  # from the worker thread
            loop.call_soon_threadsafe(session.send, pb.AgentMessage(progress=message))

        result = await loop.run_in_executor(self._work, self._runner.run, command, progress)
        if session.closed:
            log.warning("event=command_result_dropped request_id=%s why='stream closed; a replay gets it'",
                        command.request_id)
        session.send(pb.AgentMessage(result=result))


def _retry_after_s(value: float) -> float:
    """A manager's retry_after_s, sanitised: never negative, NaN or more than an hour."""
    return min(3600.0, value) if math.isfinite(value) and value > 0 else 0.0


def _grpc_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return repr(exc)
