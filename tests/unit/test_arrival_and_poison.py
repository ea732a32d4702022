"""Silence measured on arrival, a bounded inbox, poison facts dropped, and the driver's health (issue 14 item 1,
issue 13 item 4's driver half).

- The inbox keeps arrival order and stamps; a host's waiting ping is replaced by its newer one (at most one per
  host waits), real events are all kept.
- The core counts a host's silence from its last ping's arrival: a ping that waited in a backlog still counts
  from when it came, and a host whose last arrival is old is behind however recently its stale ping was handled.
- A batch the store refuses while it commits is written fact by fact; the fact it refuses is dropped with an alert
  event and the others are recorded and act (both environments; production with the poison Hello of issue 13:
  a capacity no integer column holds).
- Health names the stall: the store not committing, or a batch not finishing, for longer than the set time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kvmha.manager.core import facts
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import HostCapacity, HostId, HostStatus
from kvmha.manager.core.pingmap import PingMap
from kvmha.manager.driver import DriverSettings, StoreUnavailable
from kvmha.manager.inbox import Inbox
from kvmha.manager.sim.loop import VirtualLoop
from tests.unit.test_service_driver import SimulatedRig, _production, _simulated, _vm_record


def _ping(host: int, seq: int = 1) -> facts.HeartbeatReceived:
    return facts.HeartbeatReceived(HostId(host), seq, True, True)


def test_the_inbox_keeps_one_ping_per_host_and_every_real_event_in_arrival_order() -> None:
    inbox: Inbox[object] = Inbox()
    report = facts.PowerStateReported(HostId(1), full=True, hypervisor_connected=True)
    inbox.put(_ping(1, 1), 1.0)
    inbox.put(_ping(2, 1), 1.5)
    inbox.put(report, 2.0)
    inbox.put(_ping(1, 2), 3.0)  # replaces host 1's first ping, moves to the end with its own stamp
    inbox.put(report, 4.0)  # a real event is never merged
    assert len(inbox) == 4 and inbox.coalesced == 1
    taken = inbox.take()
    assert [stamp for _, stamp in taken] == [1.5, 2.0, 3.0, 4.0]  # stamps never run backwards
    assert taken[2][0] == _ping(1, 2)
    assert len(inbox) == 0


def test_a_backlog_never_reads_as_silence_and_an_old_arrival_is_not_made_young() -> None:
    config = CoreConfig.from_mapping({"ping.timeout": "7"})
    core = Core(config, now=0.0)
    for host in (1, 2):
        core.handle(facts.AgentConnected(HostId(host), str(uuid.uuid4()), f"h{host}", "10.0.0.1",
                                         HostCapacity(8, 8192), "boot"), 0.0)
        core.handle(facts.PowerStateReported(HostId(host), full=True, hypervisor_connected=True), 0.0)
    # Host 2 last pinged at 1 s, host 1 at 5 s. The driver gets to both only at 11 s (a stall).
    core.handle(_ping(2), 11.0, received_at=1.0)
    core.handle(_ping(1), 11.0, received_at=5.0)
    core.tick(11.0)
    assert core.host_status(HostId(1)) is HostStatus.UP  # silent 6 s by its arrival: not behind
    assert core.host_status(HostId(2)) is HostStatus.INVESTIGATING  # silent 10 s, however late it was handled
    assert core.hosts[HostId(1)].last_ping_at == 5.0


def test_the_store_coming_back_gives_every_host_a_fresh_silence_window() -> None:
    core = Core(CoreConfig.from_mapping({"ping.timeout": "7"}), now=0.0)
    core.handle(facts.AgentConnected(HostId(1), str(uuid.uuid4()), "h1", "10.0.0.1", HostCapacity(8, 8192), "b"), 0.0)
    core.handle(facts.PowerStateReported(HostId(1), full=True, hypervisor_connected=True), 0.0)
    core.handle(_ping(1), 0.0)
    out = core.handle(facts.StoreRecovered(down_s=30.0), 30.0)
    assert any(getattr(action, "kind", "") == "store.recovered" for action in out)
    core.tick(36.0)
    assert core.host_status(HostId(1)) is HostStatus.UP  # its window runs from 30 s
    out = core.tick(37.5)
    assert core.host_status(HostId(1)) is not HostStatus.UP  # and it does run out
    assert any("missed pings for 37.5 s" in getattr(action, "message", "") for action in out)  # its own silence


def test_a_host_that_connected_is_judged_by_its_first_ping_window_until_it_pings() -> None:
    """Connected at 0 (its Welcome's arrival stamp), no ping yet: not behind after ping.timeout, only when its
    first-ping window, max(startup.grace, ping.timeout), ends; once it pinged, the ping map judges it. A store
    outage in between gives the window a fresh ping.timeout at least, as for every host."""
    config = CoreConfig.from_mapping({"ping.timeout": "7", "startup.grace": "20"})
    hello = facts.AgentConnected(HostId(1), str(uuid.uuid4()), "h1", "10.0.0.1", HostCapacity(8, 8192), "b")
    core = Core(config, now=0.0)
    core.handle(hello, 3.0, received_at=0.0)  # the driver got to it late: the window counts from its arrival
    core.handle(facts.PowerStateReported(HostId(1), full=True, hypervisor_connected=True), 3.0)
    core.tick(19.9)
    assert core.host_status(HostId(1)) is HostStatus.UP
    out = core.tick(20.0)
    assert core.host_status(HostId(1)) is not HostStatus.UP  # behind (no neighbour, no BMC: Alert at once)
    assert any("missed pings for 20.0 s" in getattr(action, "message", "") for action in out)

    core = Core(config, now=0.0)
    core.handle(hello, 0.0)
    core.handle(facts.PowerStateReported(HostId(1), full=True, hypervisor_connected=True), 0.0)
    core.handle(_ping(1), 12.0)  # a late first ping: inside the window, so nothing was judged; now the ping map
    core.tick(18.9)
    assert core.host_status(HostId(1)) is HostStatus.UP
    core.tick(19.0)
    assert core.host_status(HostId(1)) is not HostStatus.UP  # 7 s after that ping, not at 20 s

    core = Core(config, now=0.0)
    core.handle(hello, 0.0)
    core.handle(facts.PowerStateReported(HostId(1), full=True, hypervisor_connected=True), 0.0)
    core.handle(facts.StoreRecovered(down_s=18.0), 18.0)
    core.tick(24.9)
    assert core.host_status(HostId(1)) is HostStatus.UP  # its window moved to 18 + 7
    core.tick(25.0)
    assert core.host_status(HostId(1)) is not HostStatus.UP  # behind (no neighbour, no BMC: Alert at once)


def test_a_hello_whose_registration_waits_counts_as_the_host_heard() -> None:
    """A known host's Hello (AgentHeard, before its registration is stored) is proof of life: a host whose link
    broke counts its silence from the Hello, as from a ping; a host restored by a restarted manager gets its
    first-ping window from the Hello. A Hello never makes a verdict earlier, and a host that stays silent after it
    is behind when that window ends."""
    config = CoreConfig.from_mapping({"ping.timeout": "7", "startup.grace": "20"})
    hello = facts.AgentConnected(HostId(1), str(uuid.uuid4()), "h1", "10.0.0.1", HostCapacity(8, 8192), "b")
    core = Core(config, now=0.0)
    core.handle(hello, 0.0)
    core.handle(facts.PowerStateReported(HostId(1), full=True, hypervisor_connected=True), 0.0)
    core.handle(_ping(1), 10.0)
    core.handle(facts.AgentDisconnected(HostId(1), planned=False), 11.0)
    core.handle(facts.AgentHeard(HostId(1)), 15.0)  # its agent is back; the store has not registered it yet
    core.tick(21.9)
    assert core.host_status(HostId(1)) is HostStatus.UP  # 7 s after the ping would have been 17
    core.tick(22.0)
    assert core.host_status(HostId(1)) is not HostStatus.UP  # 7 s after the Hello, and nothing since

    record = dataclasses.replace(core.hosts[HostId(1)], status=HostStatus.UP, last_ping_at=5.0)
    restarted = Core(config, now=100.0, hosts=[dataclasses.replace(record)])  # a restarted manager: h1 restored Up
    restarted.handle(facts.AgentHeard(HostId(1)), 115.0)  # its Hello at 115; registration slow
    restarted.tick(134.9)
    assert restarted.host_status(HostId(1)) is HostStatus.UP  # its rejoin window (120) moved to 115 + 20
    restarted.handle(hello, 134.9)
    restarted.tick(140.0)
    assert restarted.host_status(HostId(1)) is not HostStatus.INVESTIGATING
    early = Core(config, now=100.0, hosts=[dataclasses.replace(record)])
    early.handle(facts.AgentHeard(HostId(1)), 100.5)  # a Hello right away: the window stays at 120, never earlier
    early.tick(119.9)
    assert early.host_status(HostId(1)) is HostStatus.UP
    early.handle(facts.AgentHeard(HostId(1)), 119.9)
    early.tick(139.8)
    assert early.host_status(HostId(1)) is HostStatus.UP
    early.tick(139.9)
    assert early.host_status(HostId(1)) is not HostStatus.UP  # 20 s after its last Hello, never registered


def test_the_ping_map_stays_ordered_when_a_stamp_is_older_than_its_newest_entry() -> None:
    pings = PingMap()
    pings.ping(HostId(1), 5.0)
    pings.ping(HostId(2), 3.0)  # counted as 5.0: judged later, never earlier
    assert pings.take_behind(11.9, 7.0) == []
    assert [host for host, _ in pings.take_behind(12.0, 7.0)] == [HostId(1), HostId(2)]
    pings.ping(HostId(1), 1.0)
    pings.ping(HostId(2), 2.0)
    pings.refresh_all(10.0)
    assert pings.next_behind_at(7.0) == 17.0


def _poison_rig(loop: VirtualLoop) -> Any:
    async def body() -> SimulatedRig:
        return await _simulated(loop)
    return loop.run_until_complete(body())


def test_a_poison_fact_is_dropped_with_an_event_and_the_others_go_on_simulated(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    loop = VirtualLoop()
    try:
        rig = _poison_rig(loop)
        from kvmha.manager.sim import memstore

        original = memstore.MemoryVms.upsert

        def refusing(self: Any, vm: Any, now: float) -> None:
            if vm.name == "poison":
                raise OverflowError("Python int too large to convert to SQLite INTEGER")
            original(self, vm, now)

        monkeypatch.setattr(memstore.MemoryVms, "upsert", refusing)

        async def body() -> None:
            bad, good = _vm_record(1), _vm_record(2)
            bad.name = "poison"
            rig.driver.submit(facts.VmRegistered(bad))
            rig.driver.submit(facts.VmRegistered(good))  # same batch as the poison
            await asyncio.sleep(1.0)
            names = [vm.name for vm in rig.read(lambda uow: uow.vms.all())]
            assert names == ["vm2"]
            dropped = rig.read(lambda uow: uow.events.all(subject="manager"))
            assert [e.kind for e in dropped if e.kind == "fact.dropped"] == ["fact.dropped"]
            assert "VmRegistered" in next(e.message for e in dropped if e.kind == "fact.dropped")
            assert not rig.driver.store.down  # a poison fact is not an outage
            rig.driver.submit(facts.VmRegistered(_vm_record(3)))  # the driver goes on
            await asyncio.sleep(0.5)
            assert len(rig.read(lambda uow: uow.vms.all())) == 2
            await rig.driver.stop()

        loop.run_until_complete(body())
    finally:
        loop.close()


@pytest.mark.timeout(60)
def test_the_poison_hello_of_issue_13_is_dropped_and_the_manager_keeps_serving(tmp_path: Path) -> None:
    """memory_mib = 2**64-1 reached the store and stopped all HA work; now only that fact is dropped."""

    async def body() -> None:
        rig = await _production(tmp_path)
        try:
            poison = facts.AgentConnected(HostId(rig.host_id), "h1-uuid", "h1", "127.0.0.1",
                                          HostCapacity(cpus=8, memory_mib=2**64 - 1), "boot")
            rig.driver.submit(poison)
            rig.driver.submit(facts.VmRegistered(_vm_record(7)))
            await rig.settle(lambda: bool(rig.read(lambda uow: uow.vms.all())), 15.0)
            events = rig.read(lambda uow: uow.events.all(subject="manager"))
            assert any(e.kind == "fact.dropped" and "AgentConnected" in e.message for e in events)
            assert rig.driver.health() is None
        finally:
            await rig.service.stop()

    asyncio.run(body())


def test_health_says_why_once_the_store_has_not_committed_for_the_set_time() -> None:
    loop = VirtualLoop()

    async def body() -> None:
        rig = await _simulated(loop)
        rig.driver.settings = DriverSettings("m1", not_serving_after_s=3.0)
        assert rig.driver.health() is None
        rig.store_down(True)
        await asyncio.sleep(2.5)
        assert rig.driver.store.down and rig.driver.health() is None  # down, not yet for the set time
        await asyncio.sleep(2.0)
        assert "database has not committed" in (rig.driver.health() or "")
        with pytest.raises(StoreUnavailable, match=r"has not committed"):
            await rig.driver.run(lambda uow: None)
        rig.store_down(False)
        await asyncio.sleep(1.5)
        assert rig.driver.health() is None
        recovered = rig.read(lambda uow: uow.events.all(subject="manager"))
        assert [e.kind for e in recovered if e.kind == "store.recovered"] == ["store.recovered"]
        assert rig.driver.core.host_status(rig.host_id) is HostStatus.UP
        await rig.driver.stop()

    try:
        loop.run_until_complete(body())
    finally:
        loop.close()


def test_the_fact_tally_exports_counts_and_the_lag_histogram_as_prometheus_would() -> None:
    from prometheus_client import generate_latest

    from kvmha.manager.metrics import Metrics

    metrics = Metrics()
    for waited_s in (0.0, 0.001, 0.004, 3.0, 100.0):
        metrics.observe_fact(_ping(1), waited_s)
    metrics.observe_fact(facts.AgentDisconnected(HostId(1), planned=False))
    text = generate_latest(metrics.registry).decode()
    assert 'kvmha_facts_total{kind="HeartbeatReceived"} 5.0' in text
    assert 'kvmha_facts_total{kind="AgentDisconnected"} 1.0' in text
    assert 'kvmha_driver_lag_seconds_bucket{le="0.001"} 3.0' in text  # 0, exactly 1 ms (le), and the disconnect
    assert 'kvmha_driver_lag_seconds_bucket{le="0.005"} 4.0' in text
    assert 'kvmha_driver_lag_seconds_bucket{le="30.0"} 5.0' in text
    assert 'kvmha_driver_lag_seconds_bucket{le="+Inf"} 6.0' in text


@pytest.mark.timeout(60)
def test_a_blocked_event_loop_is_the_managers_deafness_not_the_hosts_silence(tmp_path: Path) -> None:
    """Pings are stamped when the loop reads them: while the loop is blocked they wait unread inside gRPC. The
    driver judges silence at now minus the loop's measured lag, so the host that kept pinging is not behind."""

    async def body() -> None:
        rig = await _production(tmp_path)
        try:
            loop = asyncio.get_running_loop()
            for _ in range(4):
                rig.driver.submit(_ping(rig.host_id))
                await asyncio.sleep(0.25)
            blocked_at = loop.time()
            loop.call_soon(time.sleep, 3.0)  # the loop is blocked (or starved) for 3 s: nothing is read
            # A ping that reached the socket 2.1 s in is read (stamped) only some loop turns after the block, once
            # the driver's ping-timeout deadline (2 s after the last ping) has woken it.
            loop.call_at(blocked_at + 3.3, rig.driver.submit, _ping(rig.host_id))
            await asyncio.sleep(3.5)  # (this test's own pings resume after the block)
            for _ in range(4):
                await asyncio.sleep(0.25)
                rig.driver.submit(_ping(rig.host_id))
            assert rig.driver.core.host_status(rig.host_id) is HostStatus.UP
            changes = [e.message for e in rig.read(lambda uow: uow.events.all(subject=f"host:{rig.host_id}"))]
            assert not [m for m in changes if "Investigating" in m], changes
            assert rig.driver.hearing.lag_s(loop.time()) >= 2.5  # it was measured
        finally:
            await rig.service.stop()

    asyncio.run(body())


def test_pings_read_late_before_the_loop_are_the_managers_deafness_not_the_hosts_silence(tmp_path: Path) -> None:
    """The loop runs on time but reads every stream 2.5 s late (the pings wait in gRPC's C core or in the kernel:
    the loop's own lag does not see them). The streams' pings say when they were built, so the hearing's transit
    lag shows the 2.5 s, and the host whose pings come 2.5 s late is not judged behind at its ping timeout (2 s)."""

    async def body() -> None:
        rig = await _production(tmp_path)
        try:
            loop, hearing, others = asyncio.get_running_loop(), rig.driver.hearing, (101, 102, 103)
            for _ in range(4):  # on time: every stream's baseline
                now = loop.time()
                rig.driver.submit(_ping(rig.host_id), now)
                for stream in (1, *others):
                    hearing.ping_read(stream, now, now)
                await asyncio.sleep(0.25)
            deaf_at = loop.time()
            lags: list[float] = []
            while loop.time() < deaf_at + 4.0:  # from now on each ping is read 2.5 s after it was built
                now = loop.time()
                for stream in others:
                    hearing.ping_read(stream, now - 2.5, now)
                if now >= deaf_at + 2.5:  # the host's first late ping, built at deaf_at, is read now
                    rig.driver.submit(_ping(rig.host_id), now)
                    hearing.ping_read(1, now - 2.5, now)
                lags.append(hearing.transit_lag_s)
                await asyncio.sleep(0.25)
            assert rig.driver.core.host_status(rig.host_id) is HostStatus.UP
            changes = [e.message for e in rig.read(lambda uow: uow.events.all(subject=f"host:{rig.host_id}"))]
            assert not [m for m in changes if "Investigating" in m], changes
            assert max(lags) >= 2.4  # it was the transit lag that held the verdict (the loop ran on time)
        finally:
            await rig.service.stop()

    asyncio.run(body())
