"""A seeded storm of compound manager faults over three production drivers on one simulated store: managers paused
past their lease (all their transactions wait, as under SIGSTOP), killed and restarted under the same id, and
database stalls that hit everyone, while an agent keeps pinging and VMs keep being started.

Invariant (the lease's promise): nothing a manager sends acts after another manager took the lease over — every
command, fence and BMC query left with an epoch that was still the newest at that instant; and at the end exactly one
manager holds the lease, the one the store names.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from kvmha.manager.core import actions, facts
from kvmha.manager.core.model import VmRecord
from kvmha.manager.env import Submit
from kvmha.manager.sim.loop import VirtualLoop
from kvmha.manager.sim.memstore import MemoryStore
from kvmha.manager.store import UnitOfWork
from tests.unit.test_manager_lease import Agent, Manager, Transport
from tests.unit.test_service_driver import _vm_record

STORM_S = 240.0


class EpochTransport(Transport):
    """Notes (virtual time, the sender's epoch) of everything that leaves."""

    def __init__(self, loop: VirtualLoop, sent: list[tuple[float, int, str]], name: str) -> None:
        super().__init__()
        self._loop, self._sent, self._name = loop, sent, name
        self.manager: Manager | None = None

    def _note(self) -> None:
        assert self.manager is not None
        epoch = self.manager.driver.lease.epoch
        assert epoch is not None, f"{self._name} sent without a lease"
        self._sent.append((self._loop.time(), epoch, self._name))

    def send_command(self, action: actions.SendCommand, answer: Submit) -> None:
        self._note()
        super().send_command(action, answer)

    def fence(self, action: actions.Fence, timeout_s: float, answer: Submit) -> None:
        self._note()
        super().fence(action, timeout_s, answer)

    def query_bmc(self, action: actions.QueryBmc, timeout_s: float, answer: Submit) -> None:
        self._note()
        super().query_bmc(action, timeout_s, answer)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_no_deposed_manager_acts_in_a_storm_of_manager_faults(seed: int) -> None:
    rng = random.Random(seed)
    loop = VirtualLoop()
    store = MemoryStore(wall=loop.time)
    sent: list[tuple[float, int, str]] = []
    acquired: list[tuple[float, int]] = []

    managers_seen: list[Manager] = []

    def build(name: str) -> Manager:
        transport = EpochTransport(loop, sent, name)
        manager = Manager(loop, store, name, transport)
        transport.manager = manager
        manager.driver.on_active(lambda epoch: acquired.append((loop.time(), epoch)))
        managers_seen.append(manager)
        return manager

    async def body() -> None:
        managers = {name: build(name) for name in ("m1", "m2", "m3")}
        for manager in managers.values():
            await manager.driver.start()
        agent = Agent()
        pinging = asyncio.ensure_future(agent.run())
        vm_ids: list[int] = []
        next_vm = 1
        until = loop.time() + STORM_S
        while loop.time() < until:
            holder = next((m for m in managers.values() if m.driver.started), None)
            if holder is not None and (agent.manager is not holder or not agent.host_id):
                try:
                    await agent.connect(holder)
                except Exception:  # the holder stepped down meanwhile: the agent tries again
                    agent.manager = None
            if holder is not None and rng.random() < 0.5:
                try:
                    vm = await asyncio.wait_for(holder.driver.run(_adder(next_vm), _registered), 5.0)
                    vm_ids.append(vm.id)
                    next_vm += 1
                    holder.driver.submit(facts.VmStartRequested(vm_id=vm.id))
                except Exception:  # refused (standby, store stalled) or too slow: the storm goes on
                    pass
            fault = rng.random()
            name = rng.choice(sorted(managers))
            if fault < 0.15:  # SIGSTOP past (or within) the lease
                managers[name].persistence.paused_until = loop.time() + rng.uniform(2.0, 15.0)
            elif fault < 0.25:  # SIGKILL, restarted a little later under the same id
                await managers[name].driver.stop()
                await asyncio.sleep(rng.uniform(0.5, 5.0))
                managers[name] = build(name)
                await managers[name].driver.start()
            elif fault < 0.30:  # the database stalls for everyone
                store.stalled_until = loop.time() + rng.uniform(2.0, 12.0)
            await asyncio.sleep(rng.uniform(0.5, 4.0))
        for manager in managers.values():
            manager.persistence.paused_until = 0.0
        store.stalled_until = 0.0
        await asyncio.sleep(20.0)  # quiet: every lease question settles
        holders = [name for name, m in managers.items() if m.driver.started]
        with store.unit_of_work() as uow:
            lease = uow.managers.lease()
        assert lease is not None and holders == [lease.manager_id], (holders, lease)
        pinging.cancel()
        for manager in managers.values():
            await manager.driver.stop()

    try:
        loop.run_until_complete(body())
    finally:
        loop.close()
    starts = sum(isinstance(c.command, actions.StartVm) for m in managers_seen for c in m.transport.sent)
    assert len(acquired) >= 3 and starts >= 10, f"a storm that tested little: {len(acquired)} leases, {starts} starts"
    assert sent, "nothing was ever sent: it tested nothing"
    print(f"seed {seed}: {len(acquired)} acquisitions, {len(sent)} actions sent, {starts} VM starts")
    for at, epoch, name in sent:
        newer = [(t, e) for t, e in acquired if e > epoch and t <= at]
        assert not newer, f"{name} sent with epoch {epoch} at {at:.2f} s after epoch {newer[0][1]} was taken"


def _adder(vm_id: int) -> Callable[[UnitOfWork], VmRecord]:
    return lambda uow: uow.vms.add(_vm_record(vm_id), uow.now)


def _registered(record: VmRecord) -> list[facts.Fact]:
    return [facts.VmRegistered(vm=record)]
