"""The agents' side of the manager, without the wire: registering a connecting agent, the terms of its Welcome,
and its facts into the driver. The gRPC servicer (adapters/agent_link.py) translates Hello/Welcome/Reject and
gRPC statuses to and from these plain values; the simulator's agents connect through the very same code.

A known host's reconnect stores what only the agent knows (versions, boot id) outside the driver's queue, so that a
thousand agents reconnecting after a manager restart are not registered behind each other's pings
(bench/manager_load.py --restart-at); a new host is registered in the driver's order, so the core never hears of a
host the store does not have. Both are group commits (kvmha.manager.groupcommit): the Hellos that arrive while one
transaction runs share the next one, so a ramp of thousands of agents costs tens of transactions, not thousands
(one per Hello in the driver's order was the bound of the 10,000-agent ramp: bench/manager_load.py). One Hello
refused (a removed or unknown host) refuses only itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from kvmha.manager.core import facts
from kvmha.manager.core.actions import Severity
from kvmha.manager.core.model import (
    NO_WATCHDOG,
    UNREPORTED,
    HostCapacity,
    HostId,
    HostInventory,
    HostStatus,
    WatchdogReport,
)
from kvmha.manager.driver import Driver, ManagerStopped, StoreUnavailable
from kvmha.manager.driver import NotActive as DriverNotActive
from kvmha.manager.groupcommit import GroupCommit
from kvmha.manager.store import AgentInfo, UnitOfWork

log = logging.getLogger("kvmha.manager.hub")
T = TypeVar("T")
UNKNOWN_HOST_RETRY_S = 60.0
EVENT_BURST, EVENT_WINDOW_S = 20, 60.0
HELLOS_PER_TRANSACTION = 500


@dataclass(frozen=True, slots=True)
class AgentHello:
    host_uuid: str  # canonical spelling (the adapter checked it)
    hostname: str
    management_address: str
    capacity: HostCapacity
    agent: AgentInfo
    watchdog: WatchdogReport = NO_WATCHDOG
    lease_manager: str = ""  # libvirt's lock manager on the host ("" = no disk leases)
    inventory: HostInventory = UNREPORTED  # storage, networks, free memory, reserve (older agents: unreported)


@dataclass(frozen=True, slots=True)
class WelcomeTerms:
    host_id: HostId
    ping_interval_s: float
    ping_timeout_s: float
    manager_id: str
    isolation_after_s: float  # the agents use the manager's value
    epoch: int = 0  # the manager's lease epoch: the agent refuses commands of older epochs from now on


NOT_ACTIVE_RETRY_S = 1.0


class UnknownHost(Exception):
    """Automatic registration is off and the host is not registered: the agent is refused."""

    def __init__(self, reason: str, retry_after_s: float = UNKNOWN_HOST_RETRY_S) -> None:
        super().__init__(reason)
        self.reason, self.retry_after_s = reason, retry_after_s


class NotActive(UnknownHost):
    """This manager is a standby (another one holds the lease over the hosts): the agent tries its next manager."""


async def _once_more(transaction: Callable[[], Awaitable[T]]) -> T:
    """A registration the database aborted (a deadlock with another writer, a serialization failure) is tried once
    more at once, as the driver's batches are: it fails hundreds of Hellos at a time. Not when the store is down,
    the manager is a standby or stopping: those answer for themselves."""
    try:
        return await transaction()
    except (StoreUnavailable, DriverNotActive, ManagerStopped):
        raise
    except Exception as error:
        log.warning("event=registration_retried error=%s", str(error).splitlines()[0][:200] if str(error) else error)
        return await transaction()


class AgentHub:
    def __init__(self, driver: Driver, auto_register_hosts: bool = True) -> None:
        self._driver = driver
        self._auto_register = auto_register_hosts
        self._host_ids: dict[str, HostId] = {}  # host uuid -> id, for hosts already stored
        self._event_times: list[float] = []
        self._recording: set[asyncio.Task[None]] = set()
        self._reconnects: GroupCommit[tuple[HostId, AgentInfo], bool] = GroupCommit(
            self._record_reconnects, HELLOS_PER_TRANSACTION)
        self._registrations: GroupCommit[tuple[AgentHello, str], tuple[HostId, bool]] = GroupCommit(
            self._register_new, HELLOS_PER_TRANSACTION)
        driver.on_active(lambda _epoch: self.remember_hosts())

    def remember_hosts(self) -> None:
        """After the driver started: the hosts it loaded are known."""
        self._host_ids = {host.uuid: host.id for host in self._driver.core.hosts.values()}

    async def close(self) -> None:
        """Hellos still waiting for their transaction are refused (GroupCommitClosed)."""
        await self._reconnects.close()
        await self._registrations.close()

    @property
    def registration_transactions(self) -> int:
        """Transactions that registered Hellos so far (reconnects and new hosts)."""
        return self._reconnects.flushes + self._registrations.flushes

    async def register_agent(self, hello: AgentHello, peer: str) -> HostId:
        if not self._driver.started:
            raise NotActive("this manager is a standby: another manager holds the lease over the hosts",
                            NOT_ACTIVE_RETRY_S)
        known = self._host_ids.get(hello.host_uuid)
        current = self._driver.core.hosts.get(known) if known is not None else None
        if current is not None and current.status is HostStatus.REMOVED:
            raise UnknownHost(f"host {hello.host_uuid} was removed (its agent is refused from then on)")
        if known is not None:  # alive from this arrival on, however long its registration waits (a restart's storm)
            self.submit(facts.AgentHeard(known))
        if known is not None and await self._reconnects.submit((known, hello.agent)):
            host_id = known
        else:
            host_id, created = await self._registrations.submit((hello, peer))
            self._host_ids[hello.host_uuid] = host_id
            if created:
                log.info("event=host_registered host_id=%s uuid=%s name=%s", host_id, hello.host_uuid, hello.hostname)
        self.submit(facts.AgentConnected(host_id=host_id, uuid=hello.host_uuid, name=hello.hostname,
                                         address=hello.management_address or peer, capacity=hello.capacity,
                                         boot_id=hello.agent.boot_id, watchdog=hello.watchdog,
                                         lease_manager=hello.lease_manager, inventory=hello.inventory))
        return host_id

    async def _record_reconnects(self, items: list[tuple[HostId, AgentInfo]]) -> list[bool]:
        """Known hosts' versions and boot ids, one transaction outside the driver's order; False: no such row."""
        manager_id = self._driver.settings.manager_id

        def record(uow: UnitOfWork) -> list[bool]:
            # Rows in id order, as a batch's flush updates them: two writers never wait on each other in a cycle.
            order = sorted(range(len(items)), key=lambda index: items[index][0])
            if len(items) > 1:
                uow.hosts.preload(sorted({host_id for host_id, _ in items}))  # one query, not one per Hello
            stored = [False] * len(items)
            for index in order:
                host_id, agent = items[index]
                stored[index] = uow.hosts.record_agent(host_id, agent, manager_id, uow.now)
            uow.commit()
            return stored

        return await _once_more(lambda: self._driver.transact(record))

    async def _register_new(self, items: list[tuple[AgentHello, str]]) -> list[tuple[HostId, bool] | BaseException]:
        """New hosts (and known ones whose row was gone), one transaction in the driver's order."""

        def register(uow: UnitOfWork) -> list[tuple[HostId, bool] | BaseException]:
            # The group's stored hosts in two queries, not two per Hello.
            stored = uow.hosts.ids_of([hello.host_uuid for hello, _ in items])
            if len(stored) > 1:
                uow.hosts.preload(sorted(set(stored.values())))
            outcomes: list[tuple[HostId, bool] | BaseException] = []
            for hello, peer in items:
                try:
                    host_id, created = self._register(uow, hello, peer, stored.get(hello.host_uuid))
                    stored[hello.host_uuid] = host_id  # a second Hello of a new host in this group finds it
                    outcomes.append((host_id, created))
                except UnknownHost as refused:  # raised before this Hello wrote anything
                    outcomes.append(refused)
            uow.commit()
            return outcomes

        return await _once_more(lambda: self._driver.run(register))

    def _register(
        self, uow: UnitOfWork, hello: AgentHello, peer: str, host_id: HostId | None
    ) -> tuple[HostId, bool]:
        """`host_id`: the stored host of this uuid, if any (read for the whole group)."""
        created = host_id is None
        if host_id is None:
            if not self._auto_register:
                raise UnknownHost(f"host {hello.host_uuid} is not registered (kvmha host add NAME --uuid UUID)")
            host_id = uow.hosts.add(hello.host_uuid, hello.hostname, hello.management_address or peer, uow.now)
        else:
            stored = uow.hosts.get(host_id)
            if stored is not None and stored.status is HostStatus.REMOVED:
                raise UnknownHost(f"host {hello.host_uuid} was removed (its agent is refused from then on)")
        uow.hosts.record_agent(host_id, hello.agent, self._driver.settings.manager_id, uow.now)
        return host_id, created

    def welcome(self, host_id: HostId) -> WelcomeTerms:
        config = self._driver.config
        return WelcomeTerms(host_id, config.ping_interval_s, config.ping_timeout_s, self._driver.settings.manager_id,
                            config.isolation_after_s, self._driver.lease.epoch or 0)

    def submit(self, fact: facts.Fact, received_at: float | None = None) -> None:
        """`received_at`: when the adapter read it (the manager's monotonic clock); default now."""
        self._driver.submit(fact, received_at)

    def record_event(self, severity: Severity, kind: str, message: str) -> None:
        """An event about the wire (a refused identity, a malformed message), recorded in the driver's order
        without waiting. At most EVENT_BURST per EVENT_WINDOW_S: a flood of bad streams must not flood the event
        table (the log still has every one)."""
        now = time.monotonic()
        self._event_times = [at for at in self._event_times if now - at < EVENT_WINDOW_S]
        if len(self._event_times) >= EVENT_BURST:
            return
        self._event_times.append(now)

        def record(uow: UnitOfWork) -> None:
            uow.events.add(uow.now, severity, "manager", kind, message[:2000])
            uow.commit()

        task = asyncio.get_running_loop().create_task(self._driver.run(record))
        self._recording.add(task)
        task.add_done_callback(self._recorded)

    def _recorded(self, task: asyncio.Task[None]) -> None:
        self._recording.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("event=event_not_recorded error=%r", task.exception())
