"""Writing the driver's batches: retried until the store takes them, fact by fact when the store commits but refuses
one, and the store probe. The driver (kvmha.manager.driver) decides what a batch is; this module only records it.

Invariants:
- **Nothing is lost, nothing acts unrecorded.** `persist` returns only when every group of the batch is recorded or
  was refused by a store that commits (a poison fact); the driver then sends the commands of the recorded groups
  only.
- **A poison fact is not an outage, and a conflict is neither.** A failed write is tried once more at once (the
  database may have aborted it: a deadlock with another writer), then followed by a probe: when the probe commits,
  the batch is at fault and is split (each fact's changes tried twice); when it does not, the store is down
  (StoreWatch says so once) and the whole batch waits. The probe itself calls the store down on a timeout or on
  two failures in a row, never on one aborted transaction.
- **Recorded only on a confirmed lease** (kvmha.manager.lease). Every write renews this manager's lease first, in
  its own transaction; a renewal that finds another epoch raises `LeaseLost` (nothing is written, and it is not an
  outage); a commit moves the acting window on from the moment before the transaction began. The probe renews too.
- **One error event per poison fact** (`fact.dropped`, alert), recorded in its own transaction; if even that fails
  the log has it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

from kvmha.manager.adapters.clock import to_wall_action
from kvmha.manager.core import actions as a
from kvmha.manager.env import Env, Probe
from kvmha.manager.lease import Lease, LeaseLost
from kvmha.manager.store import UnitOfWork
from kvmha.manager.storewatch import StoreWatch

log = logging.getLogger("kvmha.manager.driver")
DB_RETRY_FIRST_S = 0.5
DB_RETRY_MAX_S = 10.0


class Recorder:
    def __init__(self, env: Env, manager_id: str, probe_timeout_s: float, watch: StoreWatch, lease: Lease,
                 lease_lost: Callable[[int], None]) -> None:
        self._env, self._manager_id, self._probe_timeout_s, self._watch = env, manager_id, probe_timeout_s, watch
        self._lease, self._lease_lost = lease, lease_lost  # lease_lost(epoch): the probe found it taken over

    async def write_renewing(self, batch: list[a.Action]) -> None:
        """Record `batch` in one transaction that renews the lease (LeaseLost when it has moved on)."""
        epoch, asked_at = self._lease.epoch, self._env.clock.monotonic()
        await self._env.persistence.transact(functools.partial(self.write, batch=batch, epoch=epoch))
        if epoch is not None:
            self._lease.renewed(epoch, asked_at)

    def confirm_lease(self, uow: UnitOfWork, epoch: int | None) -> None:
        if epoch is None or not uow.managers.renew_lease(self._manager_id, epoch, self._lease.terms.lease_s):
            raise LeaseLost(f"the lease of epoch {epoch} has moved on")

    async def persist(self, groups: list[tuple[str, list[a.Action]]]) -> tuple[int, set[int]]:
        """Record the batch; retry until the store takes it. Returns the attempts and the groups dropped because
        the store, though it commits, refused them (a poison fact)."""
        pending = [index for index, (_, group) in enumerate(groups) if group]
        dropped: set[int] = set()
        delay_s, attempts = DB_RETRY_FIRST_S, 0
        while True:
            attempts += 1
            actions = [action for index in pending for action in groups[index][1]]
            try:
                await self.write_renewing(actions)
                self._watch.committed()
                return attempts, dropped
            except LeaseLost:
                raise
            except Exception as error:
                failure: Exception = error
            if attempts == 1:
                continue  # the database may have aborted it (a deadlock with another writer): once more at once
            if await self.store_commits():
                # The store commits, this batch does not: one fact's changes at a time, so that one bad fact
                # (a value the columns cannot hold) never blocks the others.
                pending = await self._one_by_one(groups, pending, dropped)
                if not pending:
                    return attempts, dropped
            # Nothing of this batch may act before it is recorded: wait for the store, however long.
            self._env.journal.write_failed(failure, delay_s)
            self._watch.failed(_text(failure))
            await self._watch.wait_up(delay_s)
            delay_s = min(delay_s * 2, DB_RETRY_MAX_S)

    async def _one_by_one(self, groups: list[tuple[str, list[a.Action]]], pending: list[int],
                          dropped: set[int]) -> list[int]:
        """Write each group alone; drop those the store refuses while it commits. Returns the groups still to
        write (the store went down meanwhile)."""
        for position, index in enumerate(pending):
            source, group = groups[index]
            failure: Exception | None = None
            for _ in range(2):  # twice: an aborted transaction (deadlock, serialization) is no poison
                try:
                    await self.write_renewing(group)
                    failure = None
                    break
                except LeaseLost:
                    raise
                except Exception as error:
                    failure = error
            if failure is None:
                continue
            if not await self.store_commits():
                return pending[position:]
            dropped.add(index)
            await self._record_drop(source, failure)
        return []

    async def _record_drop(self, source: str, error: Exception) -> None:
        message = f"{source}: the database refused its changes ({_text(error)}); dropped, HA work goes on"
        self._env.journal.fact_dropped(source, _text(error))
        event = a.RecordEvent(self._env.clock.monotonic(), "alert", "manager", "fact.dropped", message[:2000])
        wall_event = to_wall_action(event, self._env.clock)
        try:
            await self.write_renewing([wall_event])
        except Exception as failure:  # the log line above says it anyway
            log.error("event=fact_drop_unrecorded error=%s", _text(failure))

    async def store_commits(self, renew: bool = True) -> bool:
        """Probe the store: True when a transaction commits within the probe timeout. With `renew` it renews the
        lease while this manager holds one (an idle holder keeps its acting window); a renewal that finds another
        epoch is reported through `lease_lost`. Without (the driver is in the middle of its own transaction, which
        renews the lease and holds its row until it commits) it only reads: waiting for that row would measure the
        driver's transaction, not the database (at 7,000 agents a batch's transaction took tens of seconds and the
        probe called a healthy database down 15 times in 5 minutes)."""
        manager_id, epoch, lease_s = self._manager_id, self._lease.epoch, self._lease.terms.lease_s

        def probe(uow: UnitOfWork) -> bool | None:
            if not renew:
                uow.managers.live(uow.now, 60.0)  # a read of a kvmha table: blocked as writes are by a locked table
                uow.commit()
                return None
            # The lease row before the manager's row, as every renewal in the driver's transactions takes them:
            # the other order deadlocked with a registration's renewal on PostgreSQL (bench/manager_load.py).
            renewed = epoch is None or uow.managers.renew_lease(manager_id, epoch, lease_s)
            uow.managers.heartbeat(manager_id, uow.now)
            uow.commit()
            return renewed

        began_at, timeout_s = self._env.clock.monotonic(), self._probe_timeout_s
        for attempt in (1, 2):
            try:
                async with asyncio.timeout(timeout_s):
                    renewed = await self._env.persistence.transact(Probe(probe))
                break
            except TimeoutError:
                self._watch.failed(f"no commit within {timeout_s:.0f} s", since=began_at)
                return False
            except Exception as error:
                # A transaction the database chose to abort (a deadlock with another writer, a serialization
                # failure) is a conflict, not an outage: one failure on its own says nothing; twice in a row does.
                if attempt == 2:
                    self._watch.failed(_text(error))
                    return False
        self._watch.committed()
        if epoch is not None and renewed is not None:
            if renewed:
                self._lease.renewed(epoch, began_at)
            else:
                self._lease_lost(epoch)
        return True

    def write(self, uow: UnitOfWork, batch: list[a.Action], epoch: int | None = None) -> None:
        now, manager_id = uow.now, self._manager_id
        # One query for the rows of each kind the batch saves, not one per saved row (a ramp's batches save
        # hundreds of hosts and VMs each).
        host_ids = list({action.host.id for action in batch if isinstance(action, a.SaveHost)})
        vm_ids = list({action.vm.id for action in batch if isinstance(action, a.SaveVm)})
        if len(host_ids) > 1:
            uow.hosts.preload(host_ids)
        if len(vm_ids) > 1:
            uow.vms.preload(vm_ids)
        events: list[tuple[float, str, str, str, str]] = []
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
                    events.append((action.at, action.severity, action.subject, action.kind, action.message))
        uow.events.add_many(events)  # in their order, after the rows they tell about (no foreign key either way)
        # The lease last, just before the commit: the transaction holds the lease row (which the store probe and
        # the registrations renew too) only for its last statement, however long the batch took to write.
        self.confirm_lease(uow, epoch)
        uow.commit()


def _text(error: BaseException) -> str:
    text = str(error)
    return text.splitlines()[0][:300] if text else type(error).__name__
