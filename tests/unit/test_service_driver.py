"""The manager's driver around the pure core: persist first, act second; a dead database loses nothing."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from kvmha.manager.adapters.agent_link import AgentSession
from kvmha.manager.adapters.db import make_engine, migrate
from kvmha.manager.adapters.fencer import FencerChain
from kvmha.manager.adapters.repository import SqlStore, SqlUnitOfWork
from kvmha.manager.core import facts
from kvmha.manager.core.model import HostCapacity, HostStatus, VmId, VmRecord, VmState, VmUuid, WorkStep
from kvmha.manager.hub import AgentHello
from kvmha.manager.service import ManagerService, ServiceSettings
from kvmha.manager.store import AgentInfo, UnitOfWork


class FlakyStore(SqlStore):
    """A store whose database can be switched off: every transaction then fails as a lost connection would."""

    failing = False
    refused = 0

    def unit_of_work(self) -> SqlUnitOfWork:
        if self.failing:
            self.refused += 1
            raise OperationalError("SELECT 1", {}, Exception("connection refused (test)"))
        return super().unit_of_work()


async def _until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.05)


def _vm_record(vm_id: int) -> VmRecord:
    return VmRecord(id=VmId(vm_id), uuid=VmUuid(str(uuid.uuid4())), name=f"vm{vm_id}", state=VmState.STOPPED,
                    ha_enabled=True, memory_mib=64, vcpus=1, domain_xml="<domain/>")


async def _started_service(tmp_path: Path) -> tuple[ManagerService, FlakyStore, AgentSession]:
    engine = make_engine(f"sqlite:///{tmp_path / 'kvmha.sqlite'}")
    migrate(engine)
    store = FlakyStore(engine)
    service = ManagerService(store, ServiceSettings(manager_id="m1", address="127.0.0.1:1", version="test"),
                             fencer_factory=lambda _c: FencerChain([]))
    await service.start()
    hello = AgentHello(host_uuid=str(uuid.uuid4()), hostname="h1", management_address="127.0.0.1",
                       capacity=HostCapacity(cpus=8, memory_mib=8192), agent=AgentInfo())
    host_id = await service.register_agent(hello, "test")
    session = AgentSession(host_id=host_id, uuid=hello.host_uuid, peer="test")
    service.links.claim(session)
    service.submit(facts.PowerStateReported(host_id=host_id, full=True, hypervisor_connected=True))
    assert service.core is not None
    core = service.core
    await _until(lambda: core.host_status(host_id) is HostStatus.UP)
    return service, store, session


@pytest.mark.timeout(60)
def test_no_command_leaves_before_its_records_are_committed(tmp_path: Path) -> None:
    async def scenario() -> None:
        service, store, session = await _started_service(tmp_path)
        try:
            vm = await service.run(lambda uow: uow.vms.add(_vm_record(1), 0.0),
                                   lambda record: [facts.VmRegistered(vm=record)])
            store.failing = True
            service.submit(facts.VmStartRequested(vm_id=vm.id))
            await _until(lambda: store.refused >= 2)  # the driver tried to record the start, and retries
            assert session.outbound.empty(), "a StartVm left before the database knew about it"
            store.failing = False
            message = await asyncio.wait_for(session.outbound.get(), 15)
            assert message is not None and message.command.start_vm.vm_uuid == vm.uuid
            with store.unit_of_work() as uow:
                [work] = uow.works.all()
                events = uow.events.all()
            assert work.vm_id == vm.id and work.step in (WorkStep.SCHEDULED, WorkStep.RESTARTING)
            assert any(e.subject == f"vm:{vm.id}" for e in events)
        finally:
            await service.stop()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_operator_change_answers_after_the_core_reaction_is_recorded(tmp_path: Path) -> None:
    async def scenario() -> None:
        service, store, _session = await _started_service(tmp_path)
        try:
            vm = await service.run(lambda uow: uow.vms.add(_vm_record(1), 0.0),
                                   lambda record: [facts.VmRegistered(vm=record)])
            await service.run(lambda uow: vm.id, lambda vm_id: [facts.VmHaChanged(vm_id=vm_id, enabled=False)])
            with store.unit_of_work() as uow:  # read straight after the RPC-equivalent returned
                [stored] = uow.vms.all()
            assert stored.ha_enabled is False
        finally:
            await service.stop()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_failing_operation_is_reported_and_the_driver_goes_on(tmp_path: Path) -> None:
    async def scenario() -> None:
        service, _store, _session = await _started_service(tmp_path)
        try:
            def broken(uow: UnitOfWork) -> None:
                raise LookupError("no such VM")

            with pytest.raises(LookupError):
                await service.run(broken)
            vm = await service.run(lambda uow: uow.vms.add(_vm_record(2), 0.0),
                                   lambda record: [facts.VmRegistered(vm=record)])
            assert service.core is not None and service.core.vm(vm.id) is not None
        finally:
            await service.stop()

    asyncio.run(scenario())
