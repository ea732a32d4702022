"""The manager's driver: facts in from the adapters, through the pure core, actions out to the adapters.

One asyncio task (`_drive`) owns the Core: it takes the next fact (or operator operation) from a queue, or wakes at
the core's next deadline, hands it to the core and executes the returned actions. Safety rule for every batch:
**persist first, act second** — the records and events of a batch are committed in one transaction before any of
its commands or fences leave, so a manager that dies mid-recovery restarts from a database that knows everything
it had started. When the database is down the driver waits and retries (facts queue up, nothing is lost, nothing
is done without a record).

Blocking work (SQLAlchemy, pyghmi) runs in threads; the event loop only routes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from kvmha.manager.adapters.agent_link import LinkRegistry, RejectError
from kvmha.manager.adapters.repository import BmcCredentials, Store, UnitOfWork
from kvmha.manager.adapters.translate import capacity, command_message
from kvmha.manager.core import actions, facts
from kvmha.manager.core.config import CONFIG_SPECS, ConfigError, CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import HostId
from kvmha.manager.fencing import FencerFactory, fence_host, query_bmc
from kvmha.manager.metrics import Metrics
from kvmha.proto.v1 import agent_pb2 as pb

log = logging.getLogger("kvmha.manager.service")
T = TypeVar("T")
PERSISTED = (actions.SaveHost, actions.SaveVm, actions.SaveWork, actions.DeleteVmRecord, actions.RecordEvent)
DB_RETRY_MAX_S = 10.0
MAX_FACTS_PER_BATCH = 500


@dataclass(frozen=True)
class ServiceSettings:
    manager_id: str
    address: str  # where agents reach this manager (for mshost)
    version: str
    auto_register_hosts: bool = True
    config_overrides: tuple[tuple[str, str], ...] = ()  # from manager.toml: win over the database's values
    manager_stale_after_s: float = 60.0


Operation = Callable[[UnitOfWork], T]


class ManagerService:
    """Implements LinkHub for the AgentLink servicer and runs operator operations in order with the facts."""

    def __init__(self, store: Store, settings: ServiceSettings, fencer_factory: FencerFactory,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time) -> None:
        self.store, self.settings, self.clock = store, settings, clock
        self.metrics = metrics or Metrics()
        self.links = LinkRegistry(quiet_after_s=lambda: 2 * self.config.ping_interval_s)
        self._fencer_factory = fencer_factory
        self._queue: asyncio.Queue[facts.Fact | _Job[Any]] = asyncio.Queue()
        self._fence_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fence")
        self._driver: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self.config = CoreConfig()
        self.core: Core | None = None
        self._host_ids: dict[str, HostId] = {}  # host uuid -> id, for hosts already in the database
        self.event_listeners: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        now = self.clock()
        loaded = await self._db(lambda uow: self._load(uow, now))
        self.config, hosts, vms, works = loaded
        prefix = f"{self.settings.manager_id}.{int(now * 1000):x}."
        self.core = Core(self.config, now=now, hosts=hosts, vms=vms, works=works, request_prefix=prefix)
        self._host_ids = {host.uuid: host.id for host in hosts}
        log.info("event=manager_started manager_id=%s hosts=%d vms=%d active_work=%d", self.settings.manager_id,
                 len(hosts), len(vms), len(works))
        self._driver = asyncio.create_task(self._drive(), name="kvmha-driver")

    def _load(self, uow: UnitOfWork, now: float) -> tuple[CoreConfig, list[Any], list[Any], list[Any]]:
        uow.managers.register(self.settings.manager_id, self.settings.address, self.settings.version, now)
        uow.config.sync_defaults(((s.name, s.default, s.description) for s in CONFIG_SPECS), now)
        config = self._effective_config(uow)
        live = uow.managers.live(now, self.settings.manager_stale_after_s)
        works = uow.works.claim_active(self.settings.manager_id, now, live)
        hosts, vms = uow.hosts.all(), uow.vms.all()
        uow.commit()
        return config, hosts, vms, works

    def _effective_config(self, uow: UnitOfWork) -> CoreConfig:
        values = {row.name: row.effective for row in uow.config.all()}
        values.update(dict(self.settings.config_overrides))
        # A bad stored value must not keep the manager down: fall back to the file's settings, then to the
        # defaults, and say so loudly each time.
        for source, mapping in (("database+file", values), ("file", dict(self.settings.config_overrides))):
            try:
                return CoreConfig.from_mapping(mapping)
            except ConfigError as error:
                log.error("event=config_invalid source=%s error=%s", source, error)
        log.error("event=config_invalid action=using_defaults")
        return CoreConfig()

    async def stop(self) -> None:
        self.links.close_all("manager shutting down")
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        self._fence_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ LinkHub

    async def register_agent(self, hello: pb.Hello, peer: str) -> HostId:
        now = self.clock()

        def register(uow: UnitOfWork) -> tuple[HostId, bool]:
            row = uow.hosts.by_uuid(hello.host_uuid)
            created = row is None
            if row is None:
                if not self.settings.auto_register_hosts:
                    raise RejectError(pb.REJECT_UNKNOWN_HOST, f"host {hello.host_uuid} is not registered",
                                      grpc.StatusCode.PERMISSION_DENIED, retry_after_s=60.0)
                row = uow.hosts.add(hello.host_uuid, hello.hostname, hello.management_address, now)
            row.name, row.address = hello.hostname, hello.management_address or peer
            row.agent_version, row.libvirt_version = hello.agent_version[:64], hello.libvirt_version[:64]
            row.qemu_version, row.boot_id = hello.qemu_version[:64], hello.boot_id[:64]
            row.manager_id, row.updated_at = self.settings.manager_id, now
            uow.commit()
            return HostId(row.id), created

        known = self._host_ids.get(hello.host_uuid)
        if known is not None and await self._db(lambda uow: self._store_agent_facts(uow, known, hello, now)):
            host_id = known
        else:
            host_id, created = await self.run(register)
            self._host_ids[hello.host_uuid] = host_id
            if created:
                log.info("event=host_registered host_id=%s uuid=%s name=%s", host_id, hello.host_uuid,
                         hello.hostname)
        self.submit(facts.AgentConnected(host_id=host_id, uuid=hello.host_uuid, name=hello.hostname,
                                         address=hello.management_address or peer,
                                         capacity=capacity(hello.capacity), boot_id=hello.boot_id))
        return host_id

    def _store_agent_facts(self, uow: UnitOfWork, host_id: HostId, hello: pb.Hello, now: float) -> bool:
        """A known host's reconnect: store only the columns nobody else writes (the core saves name, address and
        capacity from AgentConnected). Outside the driver's queue, so that a thousand agents reconnecting after a
        manager restart are not registered one transaction at a time (bench/manager_load.py --restart-at)."""
        row = uow.hosts.get_row(host_id)
        if row is None:
            return False
        row.agent_version, row.libvirt_version = hello.agent_version[:64], hello.libvirt_version[:64]
        row.qemu_version, row.boot_id = hello.qemu_version[:64], hello.boot_id[:64]
        row.manager_id = self.settings.manager_id
        uow.commit()
        return True

    def welcome(self, host_id: HostId) -> pb.Welcome:
        return pb.Welcome(host_id=host_id, ping_interval_s=self.config.ping_interval_s,
                          ping_timeout_s=self.config.ping_timeout_s, protocol_version=pb.PROTOCOL_VERSION_CURRENT,
                          manager_id=self.settings.manager_id,
                          isolation_after_s=self.config.isolation_after_s)  # the agents use the manager's value

    def submit(self, fact: facts.Fact) -> None:
        self._queue.put_nowait(fact)

    # ------------------------------------------------------------------ operator operations

    async def run(self, operation: Operation[T], then: Callable[[T], Sequence[facts.Fact]] | None = None) -> T:
        """Run `operation` in a database transaction in the driver's order, then feed the facts `then` derives
        from its result to the core. Admin RPCs use this so that they never race the core's own writes."""
        job: _Job[T] = _Job(operation, then, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def _db(self, operation: Operation[T]) -> T:
        return await asyncio.to_thread(self._in_uow, operation)

    def _in_uow(self, operation: Operation[T]) -> T:
        with self.store.unit_of_work() as uow:
            return operation(uow)

    # ------------------------------------------------------------------ the driver

    async def _drive(self) -> None:
        assert self.core is not None
        core = self.core
        while True:
            deadline = core.next_deadline()
            timeout_s = None if deadline is None else max(0.0, deadline - self.clock())
            try:
                first: facts.Fact | _Job[Any] = await asyncio.wait_for(self._queue.get(), timeout_s)
                pending = [first]
            except TimeoutError:
                pending = []
            # Take what else is waiting, so that one transaction records many facts' worth of changes: with one
            # transaction per fact, a thousand agents reconnecting at once queue their pings behind each other's
            # writes until they look silent (bench/manager_load.py --restart-at).
            while len(pending) < MAX_FACTS_PER_BATCH and not self._queue.empty():
                pending.append(self._queue.get_nowait())
            now = self.clock()
            batch: list[actions.Action] = []
            for item in pending:
                if isinstance(item, _Job):
                    # An operator's operation reads the database: what the facts before it changed goes first.
                    await self._execute(batch)
                    batch = await self._run_job(item, now)
                    await self._execute(batch)
                    batch = []
                    # The RPC answers only once what it caused is recorded, so it reads its own writes.
                    if not item.future.done():
                        item.future.set_result(item.result)
                else:
                    self.metrics.observe_fact(item)
                    batch += core.handle(item, now)
            if deadline is not None and now >= deadline:
                batch += core.tick(now)
            await self._execute(batch)

    async def _run_job(self, job: _Job[Any], now: float) -> list[actions.Action]:
        assert self.core is not None
        try:
            job.result = await self._db(job.operation)
        except Exception as error:  # the RPC reports it; the driver goes on
            if not job.future.done():
                job.future.set_exception(error)
            return []
        produced: list[actions.Action] = []
        for fact in job.then(job.result) if job.then is not None else ():
            self.metrics.observe_fact(fact)
            produced += self.core.handle(fact, now)
        return produced

    async def read(self, operation: Operation[T]) -> T:
        """A read-only transaction outside the driver's order (listings for the CLI)."""
        return await self._db(operation)

    async def _execute(self, batch: list[actions.Action]) -> None:
        if not batch:
            return
        persisted = [a for a in batch if isinstance(a, PERSISTED)]
        if persisted:
            await self._persist(persisted)
        for action in batch:
            self.metrics.observe_action(action, self.clock())
            if isinstance(action, actions.SendCommand):
                self._send(action)
            elif isinstance(action, actions.Fence):
                self._spawn(self._fence(action))
            elif isinstance(action, actions.QueryBmc):
                self._spawn(self._query_bmc(action))
            elif isinstance(action, actions.DisconnectAgent):
                session = self.links.get(action.host_id)
                if session is not None:
                    session.close(action.reason)
        if any(isinstance(a, actions.RecordEvent) for a in persisted):
            for listener in list(self.event_listeners):
                listener()

    async def _persist(self, batch: Sequence[actions.Action]) -> None:
        delay_s = 0.5
        while True:
            try:
                await self._db(lambda uow: self._write(uow, batch))
                return
            except Exception as error:
                # Nothing of this batch may act before it is recorded: wait for the database, however long.
                log.error("event=db_write_failed actions=%d error=%s retry_in_s=%.1f", len(batch),
                          str(error).splitlines()[0][:300], delay_s)
                self.metrics.db_errors.inc()
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, DB_RETRY_MAX_S)

    def _write(self, uow: UnitOfWork, batch: Sequence[actions.Action]) -> None:
        now = self.clock()
        for action in batch:
            if isinstance(action, actions.SaveHost):
                uow.hosts.save(action.host, now)
            elif isinstance(action, actions.SaveVm):
                uow.vms.upsert(action.vm, now)
            elif isinstance(action, actions.SaveWork):
                uow.works.save(action.work, self.settings.manager_id, now)
            elif isinstance(action, actions.DeleteVmRecord):
                uow.vms.delete(action.vm_id)
            elif isinstance(action, actions.RecordEvent):
                uow.events.add(action.at, action.severity, action.subject, action.kind, action.message)
        uow.commit()

    def _send(self, action: actions.SendCommand) -> None:
        session = self.links.get(action.host_id)
        message = command_message(action.request_id, action.command, action.timeout_s)
        if session is not None:
            session.awaiting.add(action.request_id)
            if isinstance(action.command, actions.CheckNeighbor):
                session.neighbor_targets[action.request_id] = action.command.target_host_id
        if session is None or not session.send(message):
            self.submit(facts.CommandCompleted(request_id=action.request_id, ok=False,
                                               error=f"host {action.host_id} has no open agent stream"))

    def _spawn(self, awaitable: Awaitable[None]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bmc(self, host_id: HostId) -> BmcCredentials | None:
        return await self._db(lambda uow: uow.hosts.bmc(host_id))

    async def _fence(self, action: actions.Fence) -> None:
        credentials = await self._bmc(action.host_id)
        loop = asyncio.get_running_loop()
        fact = await loop.run_in_executor(self._fence_pool, fence_host, self._fencer_factory, credentials,
                                          action, self.config.fence_timeout_s)
        self.submit(fact)

    async def _query_bmc(self, action: actions.QueryBmc) -> None:
        credentials = await self._bmc(action.host_id)
        loop = asyncio.get_running_loop()
        timeout_s = min(self.config.investigation_timeout_s, self.config.fence_timeout_s)
        fact = await loop.run_in_executor(self._fence_pool, query_bmc, self._fencer_factory, credentials, action,
                                          timeout_s)
        self.submit(fact)


@dataclass
class _Job(Generic[T]):
    operation: Operation[T]
    then: Callable[[T], Sequence[facts.Fact]] | None
    future: asyncio.Future[T]
    result: Any = None
