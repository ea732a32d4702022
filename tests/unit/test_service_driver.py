"""The driver's promises, proven on both of its environments: production (ManagerService: SQLite in threads, the
agents' stream sessions, a real event loop) and simulation (the in-memory store on a virtual-time loop).

Persist first, act second; a dead store loses nothing and lets nothing act; operator operations answer after their
effects are recorded and a failing one leaves the driver going; facts that waited for the store are handled before
any deadline; questions that left late get their whole timeout; a core bug ends the driver loudly.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from sqlalchemy.exc import OperationalError

from kvmha.manager.adapters.agent_link import AgentSession
from kvmha.manager.adapters.db import make_engine, migrate
from kvmha.manager.adapters.fencer import FencerChain
from kvmha.manager.adapters.repository import SqlStore, SqlUnitOfWork
from kvmha.manager.core import actions, facts
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostCapacity,
    HostId,
    HostStatus,
    VmId,
    VmRecord,
    VmState,
    VmUuid,
    WorkId,
    WorkStep,
    WorkType,
)
from kvmha.manager.driver import Driver, DriverSettings
from kvmha.manager.env import Env, Submit
from kvmha.manager.hub import AgentHello, AgentHub
from kvmha.manager.service import ManagerService, ServiceSettings
from kvmha.manager.sim.env import SimClock, SimJournal, SimPersistence
from kvmha.manager.sim.loop import VirtualLoop
from kvmha.manager.sim.memstore import MemoryStore
from kvmha.manager.store import AgentInfo, UnitOfWork

T = TypeVar("T")
FAST = (("ping.interval", "0.5"), ("ping.timeout", "2"), ("heartbeat.stale.after", "1"))


class Rig(Protocol):
    """One driver in one environment, with a store that can be switched off and a view of the commands sent."""

    driver: Driver
    host_id: HostId

    def store_down(self, down: bool) -> None: ...
    def refused(self) -> int: ...
    def started_vms(self) -> list[str]: ...
    async def settle(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None: ...
    def read(self, operation: Callable[[UnitOfWork], T]) -> T: ...


def _vm_record(vm_id: int) -> VmRecord:
    return VmRecord(id=VmId(vm_id), uuid=VmUuid(str(uuid.uuid4())), name=f"vm{vm_id}", state=VmState.STOPPED,
                    ha_enabled=True, memory_mib=64, vcpus=1, domain_xml="<domain/>")


async def _connect_one_host(driver: Driver, hub: AgentHub) -> HostId:
    hello = AgentHello(host_uuid=str(uuid.uuid4()), hostname="h1", management_address="127.0.0.1",
                       capacity=HostCapacity(cpus=8, memory_mib=8192), agent=AgentInfo())
    host_id = await hub.register_agent(hello, "test")
    driver.submit(facts.PowerStateReported(host_id=host_id, full=True, hypervisor_connected=True))
    return host_id


# ---------------------------------------------------------------------- production: ManagerService on SQLite


class FlakyStore(SqlStore):
    """A store whose database can be switched off: every transaction then fails as a lost connection would."""

    failing = False
    refused = 0

    def unit_of_work(self) -> SqlUnitOfWork:
        if self.failing:
            self.refused += 1
            raise OperationalError("SELECT 1", {}, Exception("connection refused (test)"))
        return super().unit_of_work()


class ProductionRig:
    def __init__(self, service: ManagerService, store: FlakyStore, session: AgentSession, host_id: HostId) -> None:
        self.service, self.store, self.session, self.host_id = service, store, session, host_id
        self.driver = service.driver

    def store_down(self, down: bool) -> None:
        self.store.failing = down

    def refused(self) -> int:
        return self.store.refused

    def started_vms(self) -> list[str]:
        started = []
        while not self.session.outbound.empty():
            message = self.session.outbound.get_nowait()
            if message is not None and message.command.HasField("start_vm"):
                started.append(message.command.start_vm.vm_uuid)
        return started

    async def settle(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not predicate():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("condition not reached")
            await asyncio.sleep(0.05)

    def read(self, operation: Callable[[UnitOfWork], T]) -> T:
        with self.store.unit_of_work() as uow:
            return operation(uow)


async def _production(tmp_path: Path) -> ProductionRig:
    engine = make_engine(f"sqlite:///{tmp_path / 'kvmha.sqlite'}")
    migrate(engine)
    store = FlakyStore(engine)
    settings = ServiceSettings(manager_id="m1", address="127.0.0.1:1", version="test", config_overrides=FAST)
    service = ManagerService(store, settings, fencer_factory=lambda _c: FencerChain([]))
    await service.start()
    host_id = await _connect_one_host(service.driver, service.hub)
    session = AgentSession(host_id=host_id, uuid="h1-uuid", peer="test")
    service.links.claim(session)
    rig = ProductionRig(service, store, session, host_id)
    await rig.settle(lambda: service.driver.core.host_status(host_id) is HostStatus.UP)
    return rig


# ---------------------------------------------------------------------- simulation: the memory store, virtual time


class RecordingTransport:
    def __init__(self) -> None:
        self.sent: list[actions.SendCommand] = []

    def send_command(self, action: actions.SendCommand, answer: Submit) -> None:
        self.sent.append(action)

    def fence(self, action: actions.Fence, timeout_s: float, answer: Submit) -> None:
        pass

    def query_bmc(self, action: actions.QueryBmc, timeout_s: float, answer: Submit) -> None:
        pass

    def disconnect(self, action: actions.DisconnectAgent) -> None:
        pass


class CountingStore(MemoryStore):
    refused_count = 0

    def unit_of_work(self) -> Any:
        if self.down:
            self.refused_count += 1
        return super().unit_of_work()


class SimulatedRig:
    def __init__(self, loop: VirtualLoop) -> None:
        self.loop = loop
        self.clock = SimClock(loop)
        self.store = CountingStore(wall=loop.time)
        self.transport = RecordingTransport()
        journal = SimJournal(lambda kind, at, text: None, self.clock)
        env = Env(self.clock, SimPersistence(self.store, self.clock), self.transport, journal)
        self.driver = Driver(env, DriverSettings("m1", config_overrides=FAST))
        self.hub = AgentHub(self.driver)
        self.host_id = HostId(0)
        self._seen = 0

    def store_down(self, down: bool) -> None:
        self.store.down = down

    def refused(self) -> int:
        return self.store.refused_count

    def started_vms(self) -> list[str]:
        new, self._seen = self.transport.sent[self._seen:], len(self.transport.sent)
        return [c.command.vm_uuid for c in new if isinstance(c.command, actions.StartVm)]

    async def settle(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
        deadline = self.loop.time() + timeout_s
        while not predicate():
            if self.loop.time() > deadline:
                raise TimeoutError("condition not reached")
            await asyncio.sleep(0.05)  # virtual: costs no wall time

    def read(self, operation: Callable[[UnitOfWork], T]) -> T:
        with self.store.unit_of_work() as uow:
            return operation(uow)


async def _simulated(loop: VirtualLoop) -> SimulatedRig:
    rig = SimulatedRig(loop)
    await rig.driver.start()
    rig.host_id = await _connect_one_host(rig.driver, rig.hub)
    await rig.settle(lambda: rig.driver.core.host_status(rig.host_id) is HostStatus.UP)
    return rig


# ---------------------------------------------------------------------- both


@pytest.fixture(params=["production", "simulation"])
def on_rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[Callable[[Rig], Awaitable[None]]],
                                                                                 None]]:
    """Run a test body against a started rig of either kind, and stop it afterwards."""

    def run(body: Callable[[Rig], Awaitable[None]]) -> None:
        if request.param == "production":
            async def production() -> None:
                rig = await _production(tmp_path)
                try:
                    await body(rig)
                finally:
                    await rig.service.stop()

            asyncio.run(production())
        else:
            loop = VirtualLoop()
            try:
                async def simulated() -> None:
                    rig = await _simulated(loop)
                    try:
                        await body(rig)
                    finally:
                        await rig.driver.stop()

                loop.run_until_complete(simulated())
            finally:
                loop.close()

    yield run


async def _register(rig: Rig, vm_id: int) -> VmRecord:
    return await rig.driver.run(lambda uow: uow.vms.add(_vm_record(vm_id), uow.now),
                                lambda record: [facts.VmRegistered(vm=record)])


@pytest.mark.timeout(60)
def test_no_command_leaves_before_its_records_are_committed(on_rig: Callable[..., None]) -> None:
    async def body(rig: Rig) -> None:
        vm = await _register(rig, 1)
        rig.started_vms()
        rig.store_down(True)
        rig.driver.submit(facts.VmStartRequested(vm_id=vm.id))
        await rig.settle(lambda: rig.refused() >= 2)  # the driver tried to record the start, and retries
        assert rig.started_vms() == [], "a StartVm left before the store knew about it"
        rig.store_down(False)
        started: list[str] = []

        def left() -> bool:
            started.extend(rig.started_vms())
            return bool(started)

        await rig.settle(left, 15.0)
        assert started == [vm.uuid]
        [work] = rig.read(lambda uow: uow.works.all())
        events = rig.read(lambda uow: uow.events.all())
        assert work.vm_id == vm.id and work.step in (WorkStep.SCHEDULED, WorkStep.RESTARTING)
        assert any(e.subject == f"vm:{vm.id}" for e in events)

    on_rig(body)


@pytest.mark.timeout(60)
def test_operator_change_answers_after_the_core_reaction_is_recorded(on_rig: Callable[..., None]) -> None:
    async def body(rig: Rig) -> None:
        vm = await _register(rig, 1)
        await rig.driver.run(lambda uow: vm.id, lambda vm_id: [facts.VmHaChanged(vm_id=vm_id, enabled=False)])
        [stored] = rig.read(lambda uow: uow.vms.all())  # read straight after the RPC-equivalent returned
        assert stored.ha_enabled is False

    on_rig(body)


@pytest.mark.timeout(60)
def test_a_failing_operation_is_reported_and_the_driver_goes_on(on_rig: Callable[..., None]) -> None:
    async def body(rig: Rig) -> None:
        def broken(uow: UnitOfWork) -> None:
            raise LookupError("no such VM")

        with pytest.raises(LookupError):
            await rig.driver.run(broken)
        vm = await _register(rig, 2)
        assert rig.driver.core.vm(vm.id) is not None

    on_rig(body)


@pytest.mark.timeout(60)
def test_facts_that_waited_for_the_store_are_handled_before_any_deadline(on_rig: Callable[..., None]) -> None:
    """A ping that sat in the inbox while the store was down still counts: the host is not behind."""

    async def body(rig: Rig) -> None:
        core = rig.driver.core
        timeout_s = core.config.ping_timeout_s
        await _register(rig, 1)
        rig.store_down(True)
        rig.driver.submit(facts.VmStartRequested(vm_id=VmId(1)))  # something to record: the driver blocks on it
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s + 3.0
        while loop.time() < until:  # the agent keeps pinging all along
            rig.driver.submit(facts.HeartbeatReceived(rig.host_id, 1, True, True))
            await asyncio.sleep(0.25)
        rig.store_down(False)
        await rig.settle(lambda: not rig.driver._inbox.items, 15.0)
        await asyncio.sleep(0.5)
        assert core.host_status(rig.host_id) is HostStatus.UP
        changes = [e.message for e in rig.read(lambda uow: uow.events.all(subject=f"host:{rig.host_id}"))]
        assert not [m for m in changes if "Investigating" in m], changes  # never judged on an unread inbox

    on_rig(body)


def test_a_core_bug_ends_the_driver_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = VirtualLoop()

    async def body() -> None:
        rig = await _simulated(loop)
        monkeypatch.setattr(rig.driver.core, "_dispatch", _explode)
        rig.driver.submit(facts.HeartbeatReceived(rig.host_id, 1, True, True))
        with pytest.raises(RuntimeError, match="impossible"):
            await asyncio.wait_for(rig.driver.task, 5.0)
        await asyncio.sleep(0)  # the loop's end cancels the store probe: it renews no lease for a dead loop
        assert rig.driver._probe is not None and rig.driver._probe.cancelled()

    try:
        loop.run_until_complete(body())
    finally:
        loop.close()


def _explode(fact: facts.Fact) -> None:
    raise RuntimeError("an impossible transition")


def test_one_transaction_records_every_fact_that_arrived_together() -> None:
    loop = VirtualLoop()

    async def body() -> SimulatedRig:
        rig = await _simulated(loop)
        before = rig.store.commits
        for vm_id in range(1, 6):
            rig.driver.submit(facts.VmRegistered(_vm_record(vm_id)))
        await asyncio.sleep(0.1)
        assert rig.store.commits == before + 1
        assert len(rig.read(lambda uow: uow.vms.all())) == 5
        await rig.driver.stop()
        return rig

    try:
        loop.run_until_complete(body())
    finally:
        loop.close()


def test_a_restarted_manager_keeps_the_restart_window_and_never_reuses_a_work_id() -> None:
    """Found by the simulator once its manager restarts went through the driver's real load: only the active work
    was loaded, so work ids started again at 1 (overwriting finished items) and the restart history was lost."""
    loop = VirtualLoop(start=10_000.0)

    async def body() -> None:
        rig = SimulatedRig(loop)
        with rig.store.unit_of_work() as uow:
            vm = uow.vms.add(_vm_record(1), uow.now)
            uow.managers.register("m0", "", "", uow.now)
            recent = HaWorkRecord(WorkId(7), vm.id, WorkType.HA, WorkStep.DONE, None, VmState.RUNNING, 0,
                                  reason="h1 went silent", created_at=uow.now - 60)
            old = HaWorkRecord(WorkId(3), vm.id, WorkType.HA, WorkStep.DONE, None, VmState.RUNNING, 0,
                               reason="h2 went silent", created_at=uow.now - 7200)
            uow.works.save(old, "m0", uow.now - 7200)
            uow.works.save(recent, "m0", uow.now - 60)
            uow.commit()
        await rig.driver.start()
        core = rig.driver.core
        assert sorted(core.works) == [WorkId(7)]  # the finished item of the restart window, not the older one
        core_vm = core.vm(vm.id)
        assert core_vm is not None
        rig.driver.submit(facts.VmStartRequested(vm.id))
        await asyncio.sleep(0.1)
        assert max(core.works) == WorkId(8)  # above every stored id
        await rig.driver.stop()

    try:
        loop.run_until_complete(body())
    finally:
        loop.close()
