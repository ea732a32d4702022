"""Several managers on one store: the lease's table walked, its acting window, and the production driver run as two
or three managers on the simulator's store and virtual clock — a standby takes over a dead holder's hosts and active
work only after its lease expired; a holder paused past its lease resumes deposed and nothing it decided acts; a
database stall that hits the only manager moves nobody; managers started at the same instant elect one."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from kvmha.manager.core import actions, facts
from kvmha.manager.core.model import HaWorkRecord, HostCapacity, HostId, HostStatus, VmId, WorkId, WorkStep, WorkType
from kvmha.manager.driver import Driver, DriverSettings, NotActive
from kvmha.manager.env import Env, Submit
from kvmha.manager.hub import AgentHello, AgentHub
from kvmha.manager.hub import NotActive as AgentRefused
from kvmha.manager.lease import TRANSITIONS, Lease, LeaseError, LeaseEvent, LeaseTerms, Standing
from kvmha.manager.sim.env import SimClock, SimJournal, SimPersistence
from kvmha.manager.sim.loop import VirtualLoop
from kvmha.manager.sim.memstore import MemoryStore
from kvmha.manager.store import AgentInfo, UnitOfWork
from tests.unit.test_service_driver import FAST, _vm_record

T = TypeVar("T")
TERMS = LeaseTerms()  # the product's terms: 6 s lease, 2 s margin, standbys poll every 1 s

# ---------------------------------------------------------------------- the pure rules


def test_every_pair_of_standing_and_event_is_in_the_table_or_impossible() -> None:
    now = 100.0
    for standing in Standing:
        for event in LeaseEvent:
            lease = _lease_in(standing, now)
            assert lease.standing(now) is standing
            expected = TRANSITIONS.get((standing, event))
            if event is LeaseEvent.WINDOW_CLOSED:
                if expected is not None:  # time closes the window: no message
                    assert lease.standing(lease.acting_until) is expected
                continue
            if expected is None:
                with pytest.raises(AssertionError):
                    _apply(lease, event, now)
                continue
            _apply(lease, event, now)
            assert lease.standing(now) is expected, f"{standing} + {event}"


def _lease_in(standing: Standing, now: float) -> Lease:
    lease = Lease(TERMS)
    if standing is not Standing.STANDBY:
        lease.acquired(7, now if standing is Standing.ACTIVE else now - TERMS.window_s - 1)
    return lease


def _apply(lease: Lease, event: LeaseEvent, now: float) -> None:
    match event:
        case LeaseEvent.ACQUIRED:
            lease.acquired(8, now)
        case LeaseEvent.RENEWED:
            lease.renewed(lease.epoch if lease.epoch is not None else 7, now)
            if lease.epoch is None:
                raise AssertionError("a standby has nothing to renew")
        case LeaseEvent.LOST:
            lease.lost(now)
        case LeaseEvent.WINDOW_CLOSED:
            pass


def test_the_window_closes_a_margin_before_the_database_could_hand_the_lease_on() -> None:
    lease = Lease(LeaseTerms(lease_s=6.0, margin_s=2.0))
    lease.acquired(3, asked_at=10.0)
    assert lease.may_act(13.99) and not lease.may_act(14.0)
    lease.renewed(3, asked_at=12.0)
    lease.renewed(3, asked_at=11.0)  # finished later, asked earlier: the window never shrinks
    assert lease.acting_until == 16.0
    lease.renewed(2, asked_at=15.0)  # an epoch given up: changes nothing
    assert lease.acting_until == 16.0
    lease.lost(16.5)
    assert lease.standing(16.5) is Standing.STANDBY and lease.acting_until == -math.inf


@pytest.mark.parametrize("terms", [dict(lease_s=2.0, margin_s=2.0), dict(lease_s=3.0, margin_s=1.0, renew_every_s=2.0),
                                   dict(lease_s=math.nan), dict(poll_s=0.0)])
def test_terms_that_cannot_keep_the_promise_are_refused(terms: dict[str, float]) -> None:
    with pytest.raises(LeaseError):
        LeaseTerms(**terms)


# ---------------------------------------------------------------------- the driver as several managers


class PausablePersistence(SimPersistence):
    """SIGSTOP, as far as the store sees it: every transaction of this manager waits until `paused_until`."""

    def __init__(self, store: MemoryStore, clock: SimClock) -> None:
        super().__init__(store, clock)
        self._clock_ = clock
        self.paused_until = 0.0

    async def transact(self, operation: Callable[[UnitOfWork], T]) -> T:
        wait_s = self.paused_until - self._clock_.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        return await super().transact(operation)


class Transport:
    def __init__(self) -> None:
        self.sent: list[actions.SendCommand] = []
        self.out_of_band: list[actions.Fence | actions.QueryBmc] = []
        self.disconnected: list[HostId] = []

    def send_command(self, action: actions.SendCommand, answer: Submit) -> None:
        self.sent.append(action)

    def fence(self, action: actions.Fence, timeout_s: float, answer: Submit) -> None:
        self.out_of_band.append(action)

    def query_bmc(self, action: actions.QueryBmc, timeout_s: float, answer: Submit) -> None:
        self.out_of_band.append(action)

    def disconnect(self, action: actions.DisconnectAgent) -> None:
        self.disconnected.append(action.host_id)

    def starts(self) -> list[str]:
        return [c.command.vm_uuid for c in self.sent if isinstance(c.command, actions.StartVm)]


class Manager:
    def __init__(self, loop: VirtualLoop, store: MemoryStore, name: str, transport: Transport | None = None) -> None:
        clock = SimClock(loop)
        self.persistence = PausablePersistence(store, clock)
        self.transport = transport or Transport()
        env = Env(clock, self.persistence, self.transport, SimJournal(lambda kind, at, text: None, clock))
        self.driver = Driver(env, DriverSettings(name, config_overrides=FAST))
        self.hub = AgentHub(self.driver)


HELLO = AgentHello(host_uuid=str(uuid.UUID(int=1)), hostname="h1", management_address="10.0.0.1",
                   capacity=HostCapacity(cpus=8, memory_mib=8192), agent=AgentInfo())


async def _connect(manager: Manager) -> HostId:
    host_id = await manager.hub.register_agent(HELLO, "test")
    manager.driver.submit(facts.PowerStateReported(host_id=host_id, full=True, hypervisor_connected=True))
    return host_id


class Agent:
    """h1's agent: pings the manager it is connected to every 0.5 s (FAST's ping interval); reconnects on demand."""

    def __init__(self) -> None:
        self.manager: Manager | None = None
        self.host_id = HostId(0)
        self._sequence = 0

    async def connect(self, manager: Manager) -> HostId:
        self.manager = manager
        self.host_id = await _connect(manager)
        return self.host_id

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.manager is not None and self.manager.driver.started:
                self._sequence += 1
                self.manager.driver.submit(facts.HeartbeatReceived(self.host_id, self._sequence, True, True))


async def _until(loop: VirtualLoop, predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)  # virtual time


def _run(body: Callable[[VirtualLoop, MemoryStore], Coroutine[Any, Any, None]]) -> None:
    loop = VirtualLoop()
    try:
        loop.run_until_complete(body(loop, MemoryStore(wall=loop.time)))
    finally:
        loop.close()


def _read(store: MemoryStore, operation: Callable[[UnitOfWork], T]) -> T:
    with store.unit_of_work() as uow:
        return operation(uow)


def test_a_standby_takes_a_dead_holders_hosts_and_work_only_after_its_lease_expired() -> None:
    async def body(loop: VirtualLoop, store: MemoryStore) -> None:
        m1, m2, agent = Manager(loop, store, "m1"), Manager(loop, store, "m2"), Agent()
        pinging = asyncio.ensure_future(agent.run())
        await m1.driver.start()
        host_id = await agent.connect(m1)
        await _until(loop, lambda: m1.driver.core.host_status(host_id) is HostStatus.UP)
        vm = await m1.driver.run(lambda uow: uow.vms.add(_vm_record(1), uow.now),
                                 lambda record: [facts.VmRegistered(vm=record)])
        await m2.driver.start()
        assert not m2.driver.started, "a second manager acted beside a live holder"
        with pytest.raises(AgentRefused):
            await m2.hub.register_agent(HELLO, "test")
        with pytest.raises(NotActive):
            await m2.driver.run(lambda uow: None)
        # m1 is killed mid-recovery: an HA restart of vm1 it had taken stays in the store.
        work = HaWorkRecord(id=WorkId(50), vm_id=VmId(vm.id), type=WorkType.HA, step=WorkStep.SCHEDULED,
                            host_id=host_id, previous_state=vm.state, vm_update_count=0, reason="test")

        def taken_by_m1(uow: UnitOfWork) -> None:
            uow.works.save(work, "m1", uow.now)
            uow.commit()

        _read(store, taken_by_m1)
        await m1.driver.stop()  # no goodbye to the lease: it runs out as a killed manager's would
        lease = _read(store, lambda uow: uow.managers.lease())
        assert lease is not None and lease.manager_id == "m1"
        await _until(loop, lambda: m2.driver.started)
        assert loop.time() >= lease.expires_at, "the lease was taken before it expired"
        assert m2.driver.lease.epoch == 2
        assert {d.manager_id for d in _read(store, lambda uow: uow.hosts.details())} == {"m2"}
        assert WorkId(50) in m2.driver.core.works, "the dead manager's active work was not taken over"
        assert {w.taken_by for w in _read(store, lambda uow: uow.works.all()) if w.step.active} == {"m2"}
        # Its agent, refused by the standby until now, reconnects within a second (its Reject's retry_after_s):
        # the host's silence since m1 died is no failure.
        await asyncio.sleep(1.0)
        await agent.connect(m2)
        await asyncio.sleep(10.0)
        assert m2.driver.core.host_status(host_id) is HostStatus.UP
        assert m2.transport.out_of_band == [], "a host whose manager died was investigated"
        pinging.cancel()
        await m2.driver.stop()

    _run(body)


def test_a_holder_paused_past_its_lease_resumes_deposed_and_nothing_it_decided_acts() -> None:
    async def body(loop: VirtualLoop, store: MemoryStore) -> None:
        m1, m2 = Manager(loop, store, "m1"), Manager(loop, store, "m2")
        await m1.driver.start()
        host_id = await _connect(m1)
        await _until(loop, lambda: m1.driver.core.host_status(host_id) is HostStatus.UP)
        vm = await m1.driver.run(lambda uow: uow.vms.add(_vm_record(1), uow.now),
                                 lambda record: [facts.VmRegistered(vm=record)])
        await m2.driver.start()
        m1.persistence.paused_until = loop.time() + 20.0  # SIGSTOP for 20 s: longer than the 6 s lease
        m1.driver.submit(facts.VmStartRequested(vm_id=vm.id))  # decided before the pause, recorded after it
        await _until(loop, lambda: m2.driver.started)
        await _until(loop, lambda: not m1.driver.started)  # SIGCONT: its first transaction finds epoch 2
        assert m1.transport.starts() == [], "a deposed manager's start left"
        assert m1.transport.disconnected == [host_id], "its agents were not told to move"
        assert _read(store, lambda uow: uow.managers.lease()).manager_id == "m2"  # type: ignore[union-attr]
        assert m1.driver.lease.epoch is None and m2.driver.lease.epoch == 2
        await m1.driver.stop()
        await m2.driver.stop()

    _run(body)


def test_a_database_stall_longer_than_the_lease_moves_nobody() -> None:
    async def body(loop: VirtualLoop, store: MemoryStore) -> None:
        m1 = Manager(loop, store, "m1")
        await m1.driver.start()
        host_id = await _connect(m1)
        await _until(loop, lambda: m1.driver.core.host_status(host_id) is HostStatus.UP)
        vm = await m1.driver.run(lambda uow: uow.vms.add(_vm_record(1), uow.now),
                                 lambda record: [facts.VmRegistered(vm=record)])
        store.stalled_until = loop.time() + 12.0
        m1.driver.submit(facts.VmStartRequested(vm_id=vm.id))
        await asyncio.sleep(6.0)
        assert m1.transport.starts() == [], "a start left while the lease could not be confirmed"
        await _until(loop, lambda: bool(m1.transport.starts()))
        assert m1.driver.started and m1.driver.lease.epoch == 1, "the only manager lost its hosts to nobody"
        assert m1.transport.disconnected == []
        await m1.driver.stop()

    _run(body)


def test_managers_started_at_the_same_instant_elect_one() -> None:
    async def body(loop: VirtualLoop, store: MemoryStore) -> None:
        managers = [Manager(loop, store, f"m{i}") for i in (1, 2, 3)]
        await asyncio.gather(*(m.driver.start() for m in managers))
        await asyncio.sleep(10.0)
        assert sum(m.driver.started for m in managers) == 1
        for m in managers:
            await m.driver.stop()

    _run(body)
