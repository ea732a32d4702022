"""The driver: the one loop that feeds facts and the time to the pure core and carries out its actions, in
production and in the simulator alike (only the `Env` differs, see kvmha.manager.env).

One asyncio task owns the Core. It sleeps until something arrives in its inbox (a fact, or an operator operation)
or until the core's next deadline, then takes everything received so far and hands it to the core in order.

Invariants:
- **Persist first, act second.** The records and events of a batch are committed in one transaction before any of
  its commands, fences or BMC queries leave, so a manager that dies mid-recovery restarts from a store that knows
  everything it had started. When the store fails the driver retries (backing off up to `DB_RETRY_MAX_S`) for as
  long as it takes: facts wait in the inbox, nothing is lost, nothing is done without a record.
- **No decision while the store cannot commit.** A probe (`store_probe_interval_s`) and the driver's own writes
  tell whether the store commits (kvmha.manager.storewatch). While it does not, the driver handles nothing and runs
  no deadline (no host is declared behind, nothing is fenced or restarted) and refuses operator operations at once;
  the pings that arrive meanwhile wait, coalesced, in the inbox. When it commits again the core hears
  `StoreRecovered` before anything else is judged: every host gets a fresh silence window.
- **One bad fact never blocks the others.** When the store commits but refuses a batch, the batch is written fact
  by fact; a fact whose changes it still refuses is dropped (its commands never leave) with an alert event and a
  log line, and everything else goes on.
- **Silence measured on arrival.** Every fact is stamped when it arrives (kvmha.manager.inbox) and the core counts
  a host's silence from its last ping's arrival; repeated pings of one host waiting in the inbox coalesce into the
  latest. The journal hears each fact's wait (arrival → handled): the driver's lag.
- **Batching.** One transaction records up to `MAX_FACTS_PER_BATCH` facts' worth of changes (a thousand agents
  reconnecting at once would otherwise queue their pings behind each other's writes until they look silent).
- **Received before judged.** The core's deadlines run (`Core.tick(t)`) only after every fact received before `t`
  has been handled: a ping that waited in the inbox while the store was slow still counts. And `t` is `now` minus
  how late the manager reads (kvmha.manager.hearing: the event loop's own lag, and the pings' transit lag from the
  agents' build times): a ping still unread inside gRPC is not silence either.
- **One acting manager, on a confirmed lease** (kvmha.manager.lease). Several managers may share the database; the
  one holding the lease over the hosts acts, the others wait as standbys (no core, agents refused, admin reads
  served) and try to take it every `poll_s`. Every batch renews the lease in the transaction that records it
  (kvmha.manager.recorder), so a manager whose lease moved on records nothing; its commands, fences and BMC queries
  leave only inside the acting window of the last confirmed renewal (renewed by the store probe while idle). Taking
  the lease takes every host and all active HA work; losing it to another epoch drops the core and tells the agents
  to move; a renewal that only fails to come (the database is down) keeps the streams and acts on nothing.
- **Health.** `health()` names why the manager should say NOT_SERVING: the store has not committed, or the driver
  has not finished a batch, for longer than `not_serving_after_s`.
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
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, assert_never

from kvmha.manager.adapters.clock import to_mono_fact, to_mono_host, to_mono_vm, to_mono_work, to_wall_action
from kvmha.manager.core import actions as a
from kvmha.manager.core import facts
from kvmha.manager.core.config import CONFIG_SPECS, ConfigError, CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import HaWorkRecord, HostRecord, VmRecord
from kvmha.manager.env import Commit, Env
from kvmha.manager.hearing import Hearing
from kvmha.manager.inbox import Inbox
from kvmha.manager.lease import ExpiredLease, Lease, LeaseLost, LeaseTerms, may_take
from kvmha.manager.recorder import DB_RETRY_FIRST_S, DB_RETRY_MAX_S, Recorder
from kvmha.manager.store import ConfigRow, UnitOfWork
from kvmha.manager.storewatch import StoreWatch

log = logging.getLogger("kvmha.manager.driver")
T = TypeVar("T")
_Loaded = tuple[int, CoreConfig, list[HostRecord], list[VmRecord], list[HaWorkRecord], int]
Operation = Callable[[UnitOfWork], T]
PERSISTED = (a.SaveHost, a.SaveVm, a.SaveWork, a.DeleteVmRecord, a.RecordEvent)
_OUTGOING = (a.SendCommand, a.Fence, a.QueryBmc)  # what acts on hosts: leaves only inside the lease's window
_NOT_ACTIVE = ("this manager does not hold the lease over the hosts (a standby); "
               "the active one is named by `kvmha manager list`")
MAX_FACTS_PER_BATCH = 500


class ManagerStopped(RuntimeError):
    """An operator operation was still waiting when the driver stopped."""


class StoreUnavailable(RuntimeError):
    """An operator operation refused because the store cannot commit (nothing is decided meanwhile)."""


class NotActive(RuntimeError):
    """An operator operation refused because this manager does not hold the lease over the hosts (a standby)."""


@dataclass(frozen=True, slots=True)
class LeaseGuarded(Generic[T]):
    """An operator's operation that runs only after `confirm` renewed the lease in its transaction (`operation`
    stays visible: the simulator's environment recognises its driver-holding operation through it)."""

    operation: Operation[T]
    confirm: Callable[[UnitOfWork], None]

    def __call__(self, uow: UnitOfWork) -> T:
        self.confirm(uow)
        return self.operation(uow)


@dataclass(frozen=True, slots=True)
class _StepDown:
    """The store probe found the lease of `epoch` gone: the loop steps down (if it still holds that epoch)."""

    epoch: int


@dataclass(frozen=True)
class DriverSettings:
    manager_id: str
    address: str = ""  # where agents reach this manager (mshost)
    version: str = ""
    config_overrides: tuple[tuple[str, str], ...] = ()  # manager.toml's [config]: wins over the stored values
    manager_stale_after_s: float = 60.0
    store_probe_interval_s: float = 1.0  # how often the driver checks that the store commits (0: never)
    store_probe_timeout_s: float = 5.0  # a probe without an answer this long: the store is down
    not_serving_after_s: float = 10.0  # health NOT_SERVING once the store or the driver is stuck this long
    lease: LeaseTerms = field(default_factory=LeaseTerms)
    hearing_period_s: float = 0.2  # how often the event loop's lag is sampled (0: never; the simulator's loop has none)


@dataclass
class _Job(Generic[T]):
    operation: Operation[T]
    then: Callable[[T], Sequence[facts.Fact]] | None
    future: asyncio.Future[T]


class Batch:
    """The actions of one transaction with the fact (or "timers") each came from, so that a batch the store
    refuses can be written again fact by fact."""

    def __init__(self) -> None:
        self.actions: list[a.Action] = []
        self.sources: list[tuple[str, int, int]] = []  # (what caused them, first index, end index)
        self.facts = 0
        self.ticked = False

    def add(self, source: str, actions: list[a.Action]) -> None:
        if actions:
            self.sources.append((source, len(self.actions), len(self.actions) + len(actions)))
            self.actions += actions


def _source(fact: facts.Fact) -> str:
    host_id = getattr(fact, "host_id", None)
    return type(fact).__name__ + (f" of host {host_id}" if host_id is not None else "")


class Driver:
    def __init__(self, env: Env, settings: DriverSettings) -> None:
        self.env, self.settings = env, settings
        self._inbox: Inbox[_Job[Any] | _StepDown] = Inbox()
        self._core: Core | None = None
        self._task: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self.store = StoreWatch(env.clock, env.journal, lambda down_s: self.submit(facts.StoreRecovered(down_s)))
        self.hearing = Hearing(env.clock, settings.hearing_period_s)  # the loop's lag: slack for silence
        self.lease = Lease(settings.lease)
        self._recorder = Recorder(env, settings.manager_id, settings.store_probe_timeout_s, self.store, self.lease,
                                  lambda epoch: self._inbox.put(_StepDown(epoch), env.clock.monotonic()))
        self.busy_since: float | None = None  # when the batch being handled began; None while waiting
        self._stopping = False
        self._on_active: list[Callable[[int], None]] = []  # told the epoch each time this manager takes the lease
        self._expired_seen: ExpiredLease | None = None  # another's lease found expired at the last look

    # ------------------------------------------------------------------ life cycle

    def on_active(self, listener: Callable[[int], None]) -> None:
        self._on_active.append(listener)

    async def start(self) -> None:
        """Register, then take the lease and build the Core from the records (waiting for the store if it is
        down), or, when another manager holds the lease, wait as a standby; either way the loop task runs."""
        s = self.settings

        def register(uow: UnitOfWork) -> None:
            uow.managers.register(s.manager_id, s.address, s.version, uow.now)
            uow.commit()

        await self._retrying(register)
        asked_at = self.env.clock.monotonic()
        loaded, _ = await self._retrying(self._acquire_and_load)
        if loaded is not None:
            self._activate(loaded, asked_at)
        else:
            log.info("event=manager_standby manager_id=%s reason=another_manager_holds_the_lease", s.manager_id)
        loop = asyncio.get_running_loop()
        self.hearing.start()
        self._task = loop.create_task(self._run(), name=f"driver-{s.manager_id}")
        if s.store_probe_interval_s > 0:
            self._probe = loop.create_task(self._probe_store(), name=f"store-probe-{s.manager_id}")
            # A loop that ended (a core bug) must not leave the probe renewing the lease: the standbys take over.
            self._task.add_done_callback(lambda _: self._probe.cancel() if self._probe is not None else None)

    def _activate(self, loaded: _Loaded, asked_at: float) -> None:
        epoch, config, hosts, vms, works, next_work_id = loaded
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
        self.lease.acquired(epoch, asked_at)
        log.info("event=manager_started manager_id=%s epoch=%d hosts=%d vms=%d active_work=%d",
                 self.settings.manager_id, epoch, len(hosts), len(vms), sum(work.step.active for work in works))
        for listener in list(self._on_active):
            listener(epoch)

    def _acquire_and_load(self, uow: UnitOfWork) -> _Loaded | None:
        """Take the lease and, with it, everything a new core needs: every host, all active HA work (nobody else
        may act on it now; its taker, if alive, is deposed), and the finished work of the restart window
        (restart.max.per.window counts across managers); work ids continue above the highest ever stored, so a
        finished item is never overwritten. None (nothing loaded) while another manager holds the lease."""
        s, now = self.settings, uow.now
        may, self._expired_seen = may_take(uow.managers.lease(), s.manager_id, self._expired_seen)
        if not may:
            uow.commit()
            return None
        epoch = uow.managers.acquire_lease(s.manager_id, s.lease.lease_s)
        if epoch is None:
            uow.commit()
            return None
        uow.config.sync_defaults(((spec.name, spec.default, spec.description) for spec in CONFIG_SPECS), now)
        config = effective_config(uow.config.all(), dict(s.config_overrides))
        works = uow.works.claim_active(s.manager_id, now, ())
        works += uow.works.finished_since(now - config.restart_window_s)
        hosts, vms = uow.hosts.all(), uow.vms.all()
        next_work_id = uow.works.max_id() + 1
        uow.commit()
        return epoch, config, hosts, vms, works, next_work_id

    async def stop(self) -> None:
        self._stopping = True
        for task in (self._probe, self._task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._inbox.close()
        self.hearing.stop()
        self._fail_jobs(ManagerStopped("the manager stopped before it ran the operation"))
        self._inbox.items.clear()

    def _fail_jobs(self, error: Exception) -> None:
        """Operator operations waiting in the inbox that will not run now: their callers must hear it."""
        for key, (item, _) in list(self._inbox.items.items()):
            if isinstance(item, _Job):
                del self._inbox.items[key]
                if not item.future.done():
                    item.future.set_exception(error)

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

    @property
    def backlog(self) -> int:
        """Facts and operations waiting for the driver (at most one ping per host)."""
        return len(self._inbox)

    @property
    def coalesced(self) -> int:
        """Pings replaced by a newer ping of the same host while they waited."""
        return self._inbox.coalesced

    def health(self) -> str | None:
        """Why the manager should answer NOT_SERVING now, or None while it serves."""
        limit_s = self.settings.not_serving_after_s
        if self.store.down_for_s() > limit_s:
            return f"the database has not committed for {self.store.down_for_s():.0f} s"
        busy_since = self.busy_since
        if busy_since is not None and self.env.clock.monotonic() - busy_since > limit_s:
            return f"the driver has not finished a batch for {self.env.clock.monotonic() - busy_since:.0f} s"
        return None

    # ------------------------------------------------------------------ inputs

    def submit(self, fact: facts.Fact, received_at: float | None = None) -> None:
        """A fact, received at `received_at` (default: now, on the monotonic clock); handled in arrival order. Call
        it on the driver's event loop."""
        self._inbox.put(fact, self.env.clock.monotonic() if received_at is None else received_at)

    async def run(self, operation: Operation[T], then: Callable[[T], Sequence[facts.Fact]] | None = None) -> T:
        """Run `operation` in one transaction in the driver's order, then feed the facts `then` derives from its
        result to the core; returns once what they caused is recorded. Refused at once (StoreUnavailable) while
        the store cannot commit."""
        if self.store.down:
            raise StoreUnavailable(f"the database has not committed for {self.store.down_for_s():.0f} s")
        if self._core is None:
            raise NotActive(_NOT_ACTIVE)
        job: _Job[T] = _Job(operation, then, asyncio.get_running_loop().create_future())
        self._inbox.put(job, self.env.clock.monotonic())
        return await job.future

    async def read(self, operation: Operation[T]) -> T:
        """A transaction outside the driver's order, for listings: the store is current (persist first)."""
        return await self.env.persistence.transact(operation)

    async def transact(self, operation: Operation[T]) -> T:
        """A write outside the driver's order, only for columns the core never writes (an agent's versions)."""
        return await self.env.persistence.transact(operation)

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        """Act while the lease is this manager's; when it is lost, step down and wait for it again."""
        while True:
            if self._core is None:
                await self._wait_for_lease()
            try:
                await self._loop()
            except LeaseLost as lost:
                self._step_down(str(lost))

    async def _wait_for_lease(self) -> None:
        """A standby: try to take the lease every poll_s (a failure of the store is just another wait)."""
        while True:
            await asyncio.sleep(self.settings.lease.poll_s)
            asked_at = self.env.clock.monotonic()
            try:
                loaded = await self.env.persistence.transact(self._acquire_and_load)
            except Exception as error:
                self.env.journal.write_failed(error, self.settings.lease.poll_s)
                continue
            if loaded is not None:
                self._inbox.items.clear()  # nothing a standby was told is meant for the new core
                self._activate(loaded, asked_at)
                return

    def _step_down(self, reason: str) -> None:
        """Another manager holds the hosts now: drop the core (its view is stale), fail waiting operations, and
        tell the agents to move: their hosts are taken over, so moving them costs no silence."""
        core, self._core = self._core, None
        if self.lease.epoch is not None:
            self.lease.lost(self.env.clock.monotonic())
        self.busy_since = None
        log.warning("event=lease_lost manager_id=%s reason=%s action=standby_agents_told_to_move",
                    self.settings.manager_id, reason)
        self._fail_jobs(NotActive(_NOT_ACTIVE))
        self._inbox.items.clear()
        for host_id in (core.hosts if core is not None else ()):
            self.env.transport.disconnect(a.DisconnectAgent(host_id, "another manager took this host over"))

    async def _loop(self) -> None:
        core, clock, inbox, journal = self.core, self.env.clock, self._inbox, self.env.journal
        deadline = core.next_deadline()
        while True:
            # The loop's timers run on clock.monotonic() (the Env's contract), so the deadline is a loop time.
            if not inbox.items:
                wake_at = None if deadline is None else deadline + self.hearing.lag_s(clock.monotonic())
                await inbox.wait(wake_at, clock.monotonic())
            if self.store.down:
                await self._hold_while_down()
                continue  # StoreRecovered now waits in the inbox: it is handled before anything is judged
            now = clock.monotonic()
            self.busy_since = now
            batch = Batch()
            for item, received_at in inbox.take():
                if isinstance(item, _StepDown):
                    if item.epoch == self.lease.epoch:
                        raise LeaseLost("the store probe found the lease taken over")
                    continue
                if isinstance(item, _Job):
                    # An operator's operation reads the store: what the facts before it changed goes first.
                    await self._execute(batch, now)
                    batch = Batch()
                    try:
                        await self._run_job(item, now)
                    except asyncio.CancelledError:
                        if not item.future.done():
                            item.future.set_exception(ManagerStopped("the manager stopped during the operation"))
                        raise
                    continue
                journal.fact_handled(item, now - received_at)
                batch.add(_source(item), core.handle(item, now, received_at))
                batch.facts += 1
                if batch.facts >= MAX_FACTS_PER_BATCH:
                    await self._execute(batch, now)
                    batch = Batch()
            # Silence is judged at what the loop has surely read by now: its own lag is no host's silence.
            judged_at = now - self.hearing.lag_s(clock.monotonic())
            deadline = core.next_deadline()
            if deadline is not None and deadline <= judged_at and not self.store.down:
                batch.add("timers", core.tick(judged_at))
                batch.ticked = True
                deadline = core.next_deadline()
            await self._execute(batch, now)
            self.busy_since = None

    async def _hold_while_down(self) -> None:
        """The store cannot commit: decide nothing, refuse operations, wait (pings coalesce meanwhile)."""
        while self.store.down:
            self._fail_jobs(StoreUnavailable("the database cannot commit; try again when it is back"))
            await self.store.wait_up(1.0)

    async def _run_job(self, job: _Job[Any], now: float) -> None:
        # An operator's change is recorded only on a confirmed lease too.
        confirm = functools.partial(self._recorder.confirm_lease, epoch=self.lease.epoch)
        try:
            result = await self.env.persistence.transact(LeaseGuarded(job.operation, confirm))
            derived = [to_mono_fact(fact, self.env.clock) for fact in (job.then(result) if job.then else ())]
        except LeaseLost:
            if not job.future.done():
                job.future.set_exception(NotActive(_NOT_ACTIVE))
            raise
        except Exception as error:  # the caller reports it (a refusal, or the store is down); the driver goes on
            if not job.future.done():
                job.future.set_exception(error)
            return
        batch = Batch()
        for fact in derived:
            self.env.journal.fact_handled(fact, 0.0)
            batch.add(_source(fact), self.core.handle(fact, now))
            batch.facts += 1
        await self._execute(batch, now)
        if not job.future.done():  # the caller may have gone away meanwhile
            job.future.set_result(result)

    # ------------------------------------------------------------------ actions

    async def _execute(self, batch: Batch, now: float) -> None:
        if not batch.actions:
            return
        env, config = self.env, self.config
        clock = env.clock
        groups = [(source, [to_wall_action(action, clock) for action in batch.actions[first:end]
                            if isinstance(action, PERSISTED)]) for source, first, end in batch.sources]
        dropped: set[int] = set()
        outgoing = any(isinstance(action, _OUTGOING) for action in batch.actions)
        if any(persisted for _, persisted in groups) or (outgoing and not self.lease.may_act(clock.monotonic())):
            # (A batch that only sends, after a quiet spell longer than the acting window: its empty transaction
            # renews the lease before anything leaves.)
            attempts, dropped = await self._recorder.persist(groups)
            persisted = [action for index, (_, group) in enumerate(groups) if index not in dropped for action in group]
            if persisted:
                env.journal.committed(_summary(persisted, batch, now, clock.monotonic(), attempts))
        while outgoing and not self.lease.may_act(clock.monotonic()):
            # The commit took longer than the acting window (a stalled database): nothing may leave on that
            # renewal, so confirm the lease again; the same epoch means nobody acted meanwhile.
            await self._recorder.persist([("lease renewal", [])])
        answer, sent = self.submit, []
        for index, (_, first, end) in enumerate(batch.sources):
            if index in dropped:
                continue  # never recorded: nothing of it may act
            for action in batch.actions[first:end]:
                if isinstance(action, _OUTGOING) and not self.lease.may_act(clock.monotonic()):
                    # The window closed in between (this event loop was starved): it stays unsent; its owner times
                    # it out as a failure, and whatever follows is decided on a renewed lease.
                    log.warning("event=action_withheld reason=lease_window_closed action=%s host_id=%s",
                                type(action).__name__, getattr(action, "host_id", "-"))
                    continue
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
        sent_at = clock.monotonic()
        if sent and sent_at > now:
            # They left later than the core decided (the store was slow): their deadlines count from now.
            late = Batch()
            late.add("late commands", self.core.handle(facts.CommandsDispatched(tuple(sent)), sent_at))
            late.facts = 1
            await self._execute(late, sent_at)

    async def _probe_store(self) -> None:
        while not self._stopping:  # (a cancel that meets a finished transaction can be swallowed: say it twice)
            await asyncio.sleep(self.settings.store_probe_interval_s)
            await self._recorder.store_commits(renew=self.busy_since is None)

    async def _retrying(self, operation: Operation[T]) -> tuple[T, int]:
        """The operation's result and the attempts it took; waits for the store however long it is down."""
        delay_s, attempts = DB_RETRY_FIRST_S, 0
        while True:
            attempts += 1
            try:
                return await self.env.persistence.transact(operation), attempts
            except Exception as error:
                self.env.journal.write_failed(error, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, DB_RETRY_MAX_S)



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


def _summary(persisted: list[a.Action], batch: Batch, decided_at: float, committed_at: float, attempts: int) -> Commit:
    kinds = [type(action) for action in persisted]
    sent = sum(isinstance(action, (a.SendCommand, a.Fence, a.QueryBmc)) for action in batch.actions)
    return Commit(decided_at=decided_at, committed_at=committed_at, facts=batch.facts, ticked=batch.ticked,
                  hosts=kinds.count(a.SaveHost), vms=kinds.count(a.SaveVm), works=kinds.count(a.SaveWork),
                  events=kinds.count(a.RecordEvent), deleted=kinds.count(a.DeleteVmRecord), commands=sent,
                  attempts=attempts)
