"""The manager in production: the shared driver (kvmha.manager.driver) in its production environment.

- Clock: the system's monotonic clock for the core, wall-clock time for the store (adapters/clock.py).
- Persistence: the SQLAlchemy store; every transaction runs in a worker thread, so the event loop only routes.
- Transport: commands go out on the agents' gRPC streams (LinkRegistry translates them); fences and BMC queries run
  through the IPMI fencers in a thread pool (pyghmi blocks). Every answer is a fact submitted to the driver.
- Journal: structured logs, Prometheus metrics, and a wake-up for the admin API's event followers.

`ManagerService` is what the gRPC servicers talk to: the agents' `LinkHub` (through kvmha.manager.hub) and the
admin API's `OperatorPort`. It knows no protobuf and no gRPC status: the adapters translate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kvmha.manager.adapters.agent_link import LinkRegistry
from kvmha.manager.adapters.clock import SystemClock
from kvmha.manager.core import actions, facts
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import HostId, HostStatus
from kvmha.manager.driver import Driver, DriverSettings
from kvmha.manager.env import Clock, Commit, Env, Probe, Submit
from kvmha.manager.fencing import FencerFactory, fence_host, query_bmc
from kvmha.manager.hub import AgentHello, AgentHub, WelcomeTerms
from kvmha.manager.metrics import Metrics
from kvmha.manager.operations import FailurePlan, LiveHosts, Operation, Refusal, refuse
from kvmha.manager.store import Store, UnitOfWork

log = logging.getLogger("kvmha.manager.service")
T = TypeVar("T")
FENCE_THREADS = 8


@dataclass(frozen=True)
class ServiceSettings:
    manager_id: str
    address: str  # where agents reach this manager (for mshost)
    version: str
    auto_register_hosts: bool = True
    config_overrides: tuple[tuple[str, str], ...] = ()  # from manager.toml: win over the database's values
    manager_stale_after_s: float = 60.0


class ThreadedPersistence:
    """Transactions in worker threads; the store probe on a thread of its own, so that it measures the database and
    not the queue in front of the workers (env.Probe)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._probe_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-probe")

    async def transact(self, operation: Callable[[UnitOfWork], T]) -> T:
        if isinstance(operation, Probe):
            return await asyncio.get_running_loop().run_in_executor(self._probe_thread, self._in_uow, operation)
        return await asyncio.to_thread(self._in_uow, operation)

    def _in_uow(self, operation: Callable[[UnitOfWork], T]) -> T:
        with self._store.unit_of_work() as uow:
            return operation(uow)


class AgentTransport:
    """Commands on the agents' streams; fences and BMC queries through the fencers, off the event loop."""

    def __init__(self, links: LinkRegistry, fencer_factory: FencerFactory, persistence: ThreadedPersistence) -> None:
        self._links, self._factory, self._persistence = links, fencer_factory, persistence
        self._pool = ThreadPoolExecutor(max_workers=FENCE_THREADS, thread_name_prefix="fence")
        self._tasks: set[asyncio.Future[Any]] = set()

    def send_command(self, action: actions.SendCommand, answer: Submit) -> None:
        if not self._links.send_command(action):
            error = f"{facts.NOT_DELIVERED}: host {action.host_id} has no open agent stream"
            answer(facts.CommandCompleted(request_id=action.request_id, ok=False, error=error))

    def fence(self, action: actions.Fence, timeout_s: float, answer: Submit) -> None:
        self._spawn(self._out_of_band(action.host_id, lambda c: fence_host(self._factory, c, action, timeout_s),
                                      answer))

    def query_bmc(self, action: actions.QueryBmc, timeout_s: float, answer: Submit) -> None:
        self._spawn(self._out_of_band(action.host_id, lambda c: query_bmc(self._factory, c, action, timeout_s),
                                      answer))

    def disconnect(self, action: actions.DisconnectAgent) -> None:
        self._links.disconnect(action.host_id, action.reason)

    async def _out_of_band(self, host_id: HostId, call: Callable[[Any], facts.Fact], answer: Submit) -> None:
        try:
            credentials = await self._persistence.transact(lambda uow: uow.hosts.bmc(host_id))
        except Exception as error:  # no answer: the core times the fence or query out and tries again later
            log.error("event=bmc_credentials_unavailable host_id=%s error=%s", host_id, type(error).__name__)
            return
        fact = await asyncio.get_running_loop().run_in_executor(self._pool, call, credentials)
        answer(fact)

    def _spawn(self, awaitable: Awaitable[None]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


class ProductionJournal:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.event_listeners: list[Callable[[], None]] = []

    def fact_handled(self, fact: facts.Fact, waited_s: float) -> None:
        self.metrics.observe_fact(fact, waited_s)

    def action_taken(self, action: actions.Action, now: float) -> None:
        self.metrics.observe_action(action, now)

    def committed(self, commit: Commit) -> None:
        if commit.events:
            for listener in list(self.event_listeners):
                listener()

    def write_failed(self, error: BaseException, retry_in_s: float) -> None:
        text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        log.debug("event=db_write_failed error=%s retry_in_s=%.1f", text, retry_in_s)
        self.metrics.db_errors.inc()

    def store_unavailable(self, error: str) -> None:
        log.error("event=db_unavailable error=%s action=no_decisions_until_it_commits", error)
        self.metrics.store_available.set(0)

    def store_available(self, down_s: float) -> None:
        log.warning("event=db_available down_s=%.1f action=fresh_silence_window_for_every_host", down_s)
        self.metrics.store_available.set(1)

    def fact_dropped(self, source: str, error: str) -> None:
        log.error("event=fact_dropped source=%s error=%s", source, error)
        self.metrics.facts_dropped.inc()


class ManagerService:
    """The production composition of driver, hub and environment; the servicers' one entry point."""

    def __init__(self, store: Store, settings: ServiceSettings, fencer_factory: FencerFactory,
                 metrics: Metrics | None = None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.links = LinkRegistry(quiet_after_s=lambda: 2 * self.config.ping_interval_s)
        persistence = ThreadedPersistence(store)
        self._transport = AgentTransport(self.links, fencer_factory, persistence)
        self._journal = ProductionJournal(self.metrics)
        self.clock = clock or SystemClock()
        env = Env(self.clock, persistence, self._transport, self._journal)
        self.driver = Driver(env, DriverSettings(settings.manager_id, settings.address, settings.version,
                                                 settings.config_overrides, settings.manager_stale_after_s))
        self.hub = AgentHub(self.driver, settings.auto_register_hosts)
        self.driver.on_active(self.links.set_epoch)  # every command carries the lease epoch (fencing token)

    async def start(self) -> None:
        await self.driver.start()  # the hub remembers the hosts each time the driver takes the lease

    async def stop(self) -> None:
        self.links.close_all("manager shutting down")
        await self.hub.close()
        await self.driver.stop()
        self._transport.close()

    @property
    def core(self) -> Core | None:
        return self.driver.core if self.driver.started else None

    @property
    def config(self) -> CoreConfig:
        return self.driver.config

    # ------------------------------------------------------------------ LinkHub

    async def register_agent(self, hello: AgentHello, peer: str) -> HostId:
        return await self.hub.register_agent(hello, peer)

    def welcome(self, host_id: HostId) -> WelcomeTerms:
        return self.hub.welcome(host_id)

    def submit(self, fact: facts.Fact, received_at: float | None = None) -> None:
        self.driver.submit(fact, received_at)

    def record_event(self, severity: actions.Severity, kind: str, message: str) -> None:
        self.hub.record_event(severity, kind, message)

    def ping_read(self, stream: int, sent_mono_s: float, arrival_s: float) -> None:
        self.driver.hearing.ping_read(stream, sent_mono_s, arrival_s)

    def stream_ended(self, stream: int) -> None:
        self.driver.hearing.forget(stream)

    # ------------------------------------------------------------------ OperatorPort

    async def run(self, operation: Operation[T], then: Callable[[T], Sequence[facts.Fact]] | None = None) -> T:
        return await self.driver.run(operation, then)

    async def read(self, operation: Operation[T]) -> T:
        return await self.driver.read(operation)

    def live_hosts(self) -> LiveHosts:
        core = self.core
        pings = {} if core is None else {
            host.id: self.clock.to_wall(host.last_ping_at) for host in core.hosts.values()
            if host.last_ping_at is not None
        }
        return LiveHosts(frozenset(self.links.hosts()), pings)

    def plan_failure(self, fail: Sequence[str]) -> FailurePlan:
        core = self.core
        if core is None:
            refuse(Refusal.FAILED_PRECONDITION, "the manager is still starting: no plan yet")
        up = {host.id for host in core.hosts.values() if host.status is HostStatus.UP}
        failed: list[HostId] = []
        for ref in fail:
            host = next((h for h in core.hosts.values() if ref in (h.name, h.uuid, str(h.id))), None)
            if host is None:
                refuse(Refusal.NOT_FOUND, f"no host {ref!r} (give its id, uuid or name)")
            if host.id not in up:
                refuse(Refusal.FAILED_PRECONDITION, f"host {host.name} is {host.status.value}, not Up: plan a failure "
                       "of Up hosts")
            if host.id not in failed:
                failed.append(host.id)
        if failed:
            plan = core.plan_failure(failed)
        else:
            worst, plan = core.worst_failure()
            failed = list(worst)
        return FailurePlan(tuple(core.hosts[h].name for h in failed), tuple(plan), tuple(core.headroom()),
                           core.config.admission_host_failures)

    def admission(self, vm_ref: str, *, ha_on: bool = False) -> str:
        core = self.core
        if core is None:
            return ""
        vm = next((v for v in core.vms if vm_ref in (v.name, v.uuid, str(v.id))), None)
        return "" if vm is None else core.admission(vm.id, ha_on=ha_on).message

    @property
    def manager_id(self) -> str:
        return self.settings.manager_id

    @property
    def config_overrides(self) -> Mapping[str, str]:
        return dict(self.settings.config_overrides)

    def on_events_recorded(self, listener: Callable[[], None]) -> None:
        self._journal.event_listeners.append(listener)
