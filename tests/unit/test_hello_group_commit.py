"""Hellos registered by group commit (kvmha.manager.groupcommit, kvmha.manager.hub): a burst of agents costs one
transaction, not one per Hello, every agent gets its own host, and a refused Hello refuses only itself."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from kvmha.manager.core.model import HostCapacity
from kvmha.manager.driver import Driver, DriverSettings
from kvmha.manager.env import Env
from kvmha.manager.groupcommit import GroupCommit, GroupCommitClosed
from kvmha.manager.hub import AgentHello, AgentHub, UnknownHost
from kvmha.manager.sim.env import SimClock, SimJournal, SimPersistence
from kvmha.manager.sim.loop import VirtualLoop
from kvmha.manager.sim.memstore import MemoryStore
from kvmha.manager.store import AgentInfo
from tests.unit.test_service_driver import RecordingTransport


def _hello(name: str, host_uuid: str | None = None) -> AgentHello:
    return AgentHello(host_uuid=host_uuid or str(uuid.uuid4()), hostname=name, management_address="127.0.0.1",
                      capacity=HostCapacity(cpus=8, memory_mib=8192), agent=AgentInfo(agent_version="test"))


def _rig(loop: VirtualLoop, auto_register: bool = True) -> tuple[Driver, AgentHub, MemoryStore]:
    clock = SimClock(loop)
    store = MemoryStore(wall=loop.time)
    env = Env(clock, SimPersistence(store, clock), RecordingTransport(), SimJournal(lambda *_: None, clock))
    driver = Driver(env, DriverSettings("m1"))
    return driver, AgentHub(driver, auto_register), store


def test_a_burst_of_new_agents_is_registered_in_one_transaction() -> None:
    loop = VirtualLoop()

    async def body() -> None:
        driver, hub, store = _rig(loop)
        await driver.start()
        ids = await asyncio.gather(*(hub.register_agent(_hello(f"h{n}"), "test") for n in range(200)))
        assert len(set(ids)) == 200
        assert hub.registration_transactions == 1
        with store.unit_of_work() as uow:
            assert len(uow.hosts.all()) == 200
        await asyncio.sleep(0.5)
        assert all(host_id in driver.core.hosts for host_id in ids)  # each one's AgentConnected reached the core
        # The same agents again (a manager's agents reconnecting): one more transaction, the same host ids.
        again = await asyncio.gather(*(hub.register_agent(_hello(f"h{n}", driver.core.hosts[host_id].uuid), "test")
                                       for n, host_id in enumerate(ids)))
        assert again == ids
        assert hub.registration_transactions == 2
        await hub.close()
        await driver.stop()

    try:
        loop.run_until_complete(body())
    finally:
        loop.close()


def test_a_refused_hello_refuses_only_itself() -> None:
    loop = VirtualLoop()

    async def body() -> None:
        driver, hub, store = _rig(loop, auto_register=False)
        await driver.start()
        known = str(uuid.uuid4())
        with store.unit_of_work() as uow:
            added = uow.hosts.add(known, "h-known", "127.0.0.1", uow.now)  # `kvmha host add`, after the start
            uow.commit()
        outcomes = await asyncio.gather(hub.register_agent(_hello("h-stranger"), "test"),
                                        hub.register_agent(_hello("h-known", known), "test"), return_exceptions=True)
        assert isinstance(outcomes[0], UnknownHost)
        assert outcomes[1] == added
        assert hub.registration_transactions == 1
        await hub.close()
        await driver.stop()

    try:
        loop.run_until_complete(body())
    finally:
        loop.close()


def test_a_failed_transaction_fails_its_callers_and_the_next_flush_goes_on() -> None:
    calls: list[list[int]] = []

    async def flush(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("deadlock detected")
        return [item * 10 if item != 3 else ValueError("refused") for item in items]

    async def body() -> None:
        commit: GroupCommit[int, int] = GroupCommit(flush, max_items=2)
        first = await asyncio.gather(commit.submit(1), commit.submit(2), commit.submit(3), commit.submit(4),
                                     return_exceptions=True)
        assert [type(o) for o in first[:2]] == [RuntimeError, RuntimeError]
        assert isinstance(first[2], ValueError) and first[3] == 40
        assert calls == [[1, 2], [3, 4]]  # at most max_items per transaction, in arrival order

        async def never(items: list[int]) -> list[int | BaseException]:
            await asyncio.Event().wait()
            return []

        stuck: GroupCommit[int, int] = GroupCommit(never)
        waiting = asyncio.ensure_future(stuck.submit(1))
        await asyncio.sleep(0.01)
        await stuck.close()
        with pytest.raises(GroupCommitClosed):
            await waiting

    asyncio.run(body())
