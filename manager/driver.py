"""The driver: the one loop that feeds facts and the time to the pure core and carries out its actions, in
production and in the simulator alike (only the `Env` differs, see kvmha.manager.env).

One asyncio task owns the Core. It sleeps until something arrives in its inbox (a fact, or an operator operation)
or until the core's next deadline, then takes everything received so far and hands it to the core in order.

Invariants:
- **Persist first, act second.** The records and events of a batch are committed in one transaction before any of
  its commands, fences or BMC queries leave, so a manager that dies mid-recovery restarts from a store that knows
  everything it had started. When the store fails the driver retries (backing off up to `DB_RETRY_MAX_S`) for as
  long as it takes: facts wait in the inbox, nothing is lost, nothing is done without a record.
- **Batching.** One transaction records up to `MAX_FACTS_PER_BATCH` facts' worth of changes (a thousand agents
  reconnecting at once would otherwise queue their pings behind each other's writes until they look silent).
- **Received before judged.** The core's deadlines run (`Core.tick`) only after every fact received before that
  moment has been handled: a ping that waited in the inbox while the store was slow still counts.
- **Operator operations in order.** An operation runs in its own transaction after everything before it is
  recorded; the facts it yields go to the core at once, and the caller's future resolves only when their effects
  are recorded, so the caller reads its own writes.
- **Loud core bugs.** An exception from the core (an impossible transition) ends the driver task with that
  exception; the composition root watches the task and stops the manager, which restarts from its records.

Times: the core runs on `env.clock.monotonic()`; records cross into the store on the wall clock, converted in
adapters/clock.py on the way out (`_persist`) and in (`start`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, assert_never

from kvmha.manager.adapters.clock import to_mono_fact, to_mono_host, to_mono_vm, to_mono_work, to_wall_action
from kvmha.manager.core import actions as a
from kvmha.manager.core import facts
from kvmha.manager.core.config import CONFIG_SPECS, ConfigError, CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import HaWorkRecord, HostRecord, VmRecord
from kvmha.manager.env import Commit, Env
from kvmha.manager.store import ConfigRow, UnitOfWork

log = logging.getLogger("kvmha.manager.driver")
T = TypeVar("T")
Operation = Callable[[UnitOfWork], T]
PERSISTED = (a.SaveHost, a.SaveVm, a.SaveWork, a.DeleteVmRecord, a.RecordEvent)
DB_RETRY_FIRST_S = 0.5
DB_RETRY_MAX_S = 10.0
MAX_FACTS_PER_BATCH = 500


class ManagerStopped(RuntimeError):
    """An operator operation was still waiting when the driver stopped."""


@dataclass(frozen=True)
class DriverSettings:
    manager_id: str
    address: str = ""  # where agents reach this manager (mshost)
    version: str = ""
    config_overrides: tuple[tuple[str, str], ...] = ()  # manager.toml's [config]: wins over the stored values
    manager_stale_after_s: float = 60.0


@dataclass
class _Job(Generic[T]):
    operation: Operation[T]
    then: Callable[[T], Sequence[facts.Fact]] | None
    future: asyncio.Future[T]


class _Inbox:
    """Facts and jobs in arrival order, and the driver's wake-up. Cheaper than asyncio.Queue + wait_for: one future
    per sleep, and one loop timer that is moved only when the core's next deadline moves (most facts do not move
    it) — it matters when the simulator pushes millions of pings through here."""

    def __init__(self) -> None:
        self.items: deque[facts.Fact | _Job[Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def put(self, item: facts.Fact | _Job[Any]) -> None:
        self.items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, deadline: float | None, now: float) -> None:
        """Return when an item is there or the loop's clock reaches `deadline` (None: no deadline)."""
        if self.items or (deadline is not None and deadline <= now):
            return
        loop = asyncio.get_running_loop()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None if deadline is None else loop.call_at(deadline, self._ring)
            self._timer_at = deadline
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _ring(self) -> None:
        self._timer, self._timer_at = None, None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, None


class Driver:
    def __init__(self, env: Env, settings: DriverSettings) -> None:
        self.env, self.settings = env, settings
        self._inbox = _Inbox()
        self._core: Core | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Load the records (waiting for the store if it is down), build the Core and start the loop."""
        (config, hosts, vms, works, next_work_id), _ = await self._retrying(self._load)
        clock = self.env.clock
        prefix = f"{self.settings.manager_id}.{int(clock.wall() * 1000):x}."
        self._core = Core(
            config,
            now=clock.monotonic(),
            hosts=[to_mono_host(h, clock) for h in hosts],
            vms=[to_mono_vm(v, clock) for v in vms],
            works=[to_mono_work(w, clock) for w in works],
            next_work_id=next_work_id,
            request_prefix=prefix,
        )
        log.info("event=manager_started manager_id=%s hosts=%d vms=%d active_work=%d", self.settings.manager_id,
                 len(hosts), len(vms), sum(work.step.active for work in works))
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"driver-{self.settings.manager_id}")

    def _load(
        self, uow: UnitOfWork
    ) -> tuple[CoreConfig, list[HostRecord], list[VmRecord], list[HaWorkRecord], int]:
        """Everything a new core needs: the active work this manager takes over, and the finished work of the
        restart window (restart.max.per.window counts across manager restarts); work ids continue above the
        highest ever stored, so a finished item is never overwritten."""
        s, now = self.settings, uow.now
        uow.managers.register(s.manager_id, s.address, s.version, now)
        uow.config.sync_defaults(((spec.name, spec.default, spec.description) for spec in CONFIG_SPECS), now)
        config = effective_config(uow.config.all(), dict(s.config_overrides))
        live = uow.managers.live(now, s.manager_stale_after_s)
        works = uow.works.claim_active(s.manager_id, now, live)
        works += uow.works.finished_since(now - config.restart_window_s)
        hosts, vms = uow.hosts.all(), uow.vms.all()
        next_work_id = uow.works.max_id() + 1
        uow.commit()
        return config, hosts, vms, works, next_work_id

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._inbox.close()
        for item in self._inbox.items:  # operator operations that will never run: their callers must hear it
            if isinstance(item, _Job) and not item.future.done():
                item.future.set_exception(ManagerStopped("the manager stopped before it ran the operation"))
        self._inbox.items.clear()

    @property
    def task(self) -> asyncio.Task[None]:
        """The loop; it ends only with an exception (a core bug) or when stopped."""
        assert self._task is not None, "start() first"
        return self._task

    @property
    def core(self) -> Core:
        assert self._core is not None, "start() first"
        return self._core

    @property
    def started(self) -> bool:
        return self._core is not None

    @property
    def config(self) -> CoreConfig:
        """The configuration in effect: the core's (one owner)."""
        return self._core.config if self._core is not None else CoreConfig()

    # ------------------------------------------------------------------ inputs

    def submit(self, fact: facts.Fact) -> None:
        """A fact observed now: handled in arrival order. Call it on the driver's event loop."""
        self._inbox.put(fact)

    async def run(self, operation: Operation[T], then: Callable[[T], Sequence[facts.Fact]] | None = None) -> T:
        """Run `operation` in one transaction in the driver's order, then feed the facts `then` derives from its
        result to the core; returns once what they caused is recorded."""
        job: _Job[T] = _Job(operation, then, asyncio.get_running_loop().create_future())
        self._inbox.put(job)
        return await job.future

    async def read(self, operation: Operation[T]) -> T:
        """A transaction outside the driver's order, for listings: the store is current (persist first)."""
        return await self.env.persistence.transact(operation)

    async def transact(self, operation: Operation[T]) -> T:
        """A write outside the driver's order, only for columns the core never writes (an agent's versions)."""
        return await self.env.persistence.transact(operation)

    # ------------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        core, clock, inbox, journal = self.core, self.env.clock, self._inbox, self.env.journal
        deadline = core.next_deadline()
        while True:
            # The loop's timers run on clock.monotonic() (the Env's contract), so the deadline is a loop time.
            if not inbox.items:
                await inbox.wait(deadline, clock.monotonic())
            now = clock.monotonic()
            received, inbox.items = inbox.items, deque()
            batch: list[a.Action] = []
            handled = 0
            for item in received:
                if isinstance(item, _Job):
                    # An operator's operation reads the store: what the facts before it changed goes first.
                    if batch:
                        await self._execute(batch, now, handled)
                    batch, handled = [], 0
                    try:
                        await self._run_job(item, now)
                    except asyncio.CancelledError:
                        if not item.future.done():
                            item.future.set_exception(ManagerStopped("the manager stopped during the operation"))
                        raise
                    continue
                journal.fact_handled(item)
                batch += core.handle(item, now)
                handled += 1
                if handled >= MAX_FACTS_PER_BATCH:
                    if batch:
                        await self._execute(batch, now, handled)
                    batch, handled = [], 0
            deadline = core.next_deadline()
            ticked = deadline is not None and deadline <= now
            if ticked:
                batch += core.tick(now)
                deadline = core.next_deadline()
            if batch:
                await self._execute(batch, now, handled, ticked)

    async def _run_job(self, job: _Job[Any], now: float) -> None:
        try:
            result = await self.env.persistence.transact(job.operation)
            derived = [to_mono_fact(fact, self.env.clock) for fact in (job.then(result) if job.then else ())]
        except Exception as error:  # the caller reports it (a refusal, or the store is down); the driver goes on
            if not job.future.done():
                job.future.set_exception(error)
            return
        produced: list[a.Action] = []
        for fact in derived:
            self.env.journal.fact_handled(fact)
            produced += self.core.handle(fact, now)
        await self._execute(produced, now, len(derived))
        if not job.future.done():  # the caller may have gone away meanwhile
            job.future.set_result(result)

    # ------------------------------------------------------------------ actions

    async def _execute(self, batch: list[a.Action], now: float, handled: int, ticked: bool = False) -> None:
        if not batch:
            return
        env, config = self.env, self.config
        persisted = [to_wall_action(action, env.clock) for action in batch if isinstance(action, PERSISTED)]
        if persisted:
            attempts = await self._persist(persisted)
            env.journal.committed(_summary(persisted, batch, now, env.clock.monotonic(), handled, ticked, attempts))
        answer, sent = self.submit, []
        for action in batch:
            env.journal.action_taken(action, now)
            match action:
                case a.SendCommand():
                    env.transport.send_command(action, answer)
                    sent.append(action.request_id)
                case a.Fence():
                    env.transport.fence(action, config.fence_timeout_s, answer)
                    sent.append(action.request_id)
                case a.QueryBmc():
                    timeout_s = min(config.investigation_timeout_s, config.fence_timeout_s)
                    env.transport.query_bmc(action, timeout_s, answer)
                    sent.append(action.request_id)
                case a.DisconnectAgent():
                    env.transport.disconnect(action)
                case a.SaveHost() | a.SaveVm() | a.SaveWork() | a.DeleteVmRecord() | a.RecordEvent():
                    pass  # recorded above, before anything left
                case _:
                    assert_never(action)
        sent_at = env.clock.monotonic()
        if sent and sent_at > now:
            # They left later than the core decided (the store was slow): their deadlines count from now.
            await self._execute(self.core.handle(facts.CommandsDispatched(tuple(sent)), sent_at), sent_at, 1)

    async def _persist(self, batch: list[a.Action]) -> int:
        """Record the batch; retry until the store takes it. Returns the number of attempts."""
        _, attempts = await self._retrying(lambda uow: self._write(uow, batch))
        return attempts

    async def _retrying(self, operation: Operation[T]) -> tuple[T, int]:
        """The operation's result and the attempts it took; waits for the store however long it is down."""
        delay_s, attempts = DB_RETRY_FIRST_S, 0
        while True:
            attempts += 1
            try:
                return await self.env.persistence.transact(operation), attempts
            except Exception as error:
                # Nothing of this batch may act before it is recorded: wait for the store, however long.
                self.env.journal.write_failed(error, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, DB_RETRY_MAX_S)

    def _write(self, uow: UnitOfWork, batch: list[a.Action]) -> None:
        now, manager_id = uow.now, self.settings.manager_id
        for action in batch:
            match action:
                case a.SaveHost(host):
                    uow.hosts.save(host, now)
                case a.SaveVm(vm):
                    uow.vms.upsert(vm, now)
                case a.SaveWork(work):
                    uow.works.save(work, manager_id, now)
                case a.DeleteVmRecord(vm_id):
                    uow.vms.delete(vm_id)
                case a.RecordEvent():
                    uow.events.add(action.at, action.severity, action.subject, action.kind, action.message)
        uow.commit()


def effective_config(rows: Sequence[ConfigRow], overrides: Mapping[str, str]) -> CoreConfig:
    """The stored values with the file's overrides on top. A bad stored value must not keep the manager down: fall
    back to the file's settings, then to the defaults, and say so loudly each time."""
    values = {row.name: row.effective for row in rows} | dict(overrides)
    for source, mapping in (("database+file", values), ("file", dict(overrides))):
        try:
            return CoreConfig.from_mapping(mapping)
        except ConfigError as error:
            log.error("event=config_invalid source=%s error=%s", source, error)
    log.error("event=config_invalid action=using_defaults")
    return CoreConfig()


def _summary(persisted: list[a.Action], batch: list[a.Action], decided_at: float, committed_at: float, handled: int,
             ticked: bool, attempts: int) -> Commit:
    kinds = [type(action) for action in persisted]
    sent = sum(isinstance(action, (a.SendCommand, a.Fence, a.QueryBmc)) for action in batch)
    return Commit(decided_at=decided_at, committed_at=committed_at, facts=handled, ticked=ticked,
                  hosts=kinds.count(a.SaveHost), vms=kinds.count(a.SaveVm), works=kinds.count(a.SaveWork),
                  events=kinds.count(a.RecordEvent), deleted=kinds.count(a.DeleteVmRecord), commands=sent,
                  attempts=attempts)
