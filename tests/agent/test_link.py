"""AgentLink in-process, over a FakeHypervisor, against the FakeManager: timing and ordering properties."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from kvmha.agent.commands import CommandRunner
from kvmha.agent.hypervisor import FakeHypervisor
from kvmha.agent.link import AgentLink, LinkSettings, backoff_s
from kvmha.lab.domain import domain_xml
from kvmha.lab.testing.fake_manager import FakeManager, Received
from kvmha.proto.v1 import agent_pb2 as pb
from tests.agent.conftest import new_uuid

pytestmark = pytest.mark.timeout(60)


@dataclass
class Running:
    link: AgentLink
    hv: FakeHypervisor
    stop: asyncio.Event
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread


def start_link(manager_addresses: tuple[str, ...], hv: FakeHypervisor,
               inventory: Callable[[], pb.Inventory] | None = None) -> Running:
    settings = LinkSettings(managers=manager_addresses, host_uuid=new_uuid(), hostname="h", management_address="",
                            storage_paths=(), agent_version="test", boot_id=new_uuid(), reconnect_base_s=0.1,
                            reconnect_max_s=0.5, inventory=inventory, inventory_interval_s=0.2)
    link = AgentLink(settings, hv, CommandRunner(hv, (), 22), heartbeat=None)
    hv.subscribe(link)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(link.run(stop),), daemon=True)
    thread.start()
    return Running(link, hv, stop, loop, thread)


@pytest.fixture
def fake() -> FakeHypervisor:
    hv = FakeHypervisor()
    hv.open()
    return hv


@pytest.fixture
def running(manager: FakeManager, fake: FakeHypervisor) -> Iterator[Running]:
    r = start_link((manager.address,), fake)
    try:
        yield r
    finally:
        r.loop.call_soon_threadsafe(r.stop.set)
        r.thread.join(timeout=10)
        assert not r.thread.is_alive()


def is_full(r: Received) -> bool:
    return r.kind == "power" and r.msg.power.full


def test_pings_are_not_delayed_by_slow_hypervisor_calls(manager: FakeManager, running: Running) -> None:
    manager.wait_for(is_full)
    running.hv.delay_s = 1.5  # every hypervisor call now takes 1.5 s (a struggling libvirtd)
    mark = manager.mark()
    for i in range(6):
        manager.send(pb.Command(request_id=f"slow-{i}", get_capacity=pb.GetCapacity()))
    manager.result("slow-5", timeout_s=10, since=mark)
    pings = [r for r in manager.received[mark:] if r.kind == "ping"]
    gaps_s = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 6
    # Interval 0.2 s; a ping that waited behind one hypervisor call would leave a gap of 1.5 s or more. The bound
    # leaves room for a loaded CI machine's scheduling, not for a blocked ping.
    assert max(gaps_s) < 1.0, gaps_s


def test_hypervisor_loss_is_reported_then_healed_with_a_full_report(manager: FakeManager, running: Running) -> None:
    manager.wait_for(is_full)
    mark = manager.mark()
    running.hv.set_connected(False)
    down = manager.wait_for(lambda r: r.kind == "power", since=mark).msg.power
    assert not down.hypervisor_connected and not down.full and not down.domains
    manager.wait_for(lambda r: r.kind == "ping" and not r.msg.ping.hypervisor_connected, since=mark)
    mark = manager.mark()
    running.hv.set_connected(True)
    manager.wait_for(is_full, since=mark)
    manager.wait_for(lambda r: r.kind == "ping" and r.msg.ping.hypervisor_connected, since=mark)


def test_delta_arriving_during_a_snapshot_is_sent_after_it(manager: FakeManager, running: Running) -> None:
    manager.wait_for(is_full)
    vm = new_uuid()
    running.hv.start_vm(domain_xml("vm", vm))
    manager.wait_for(lambda r: r.kind == "power" and not r.msg.power.full and r.msg.power.domains[0].uuid == vm)
    running.hv.delay_s = 0.5
    mark = manager.mark()
    running.hv.set_connected(True)  # asks for a full report, which now takes 0.5 s to list
    threading.Timer(0.2, lambda: running.hv.crash(vm)).start()  # the VM dies while the listing runs
    full = manager.wait_for(is_full, since=mark, timeout_s=5)
    delta = manager.wait_for(lambda r: r.kind == "power" and not r.msg.power.full and bool(r.msg.power.domains)
                             and r.msg.power.domains[0].uuid == vm, since=mark, timeout_s=5)
    assert delta.msg.power.domains[0].state == pb.POWER_OFF
    assert delta.msg.power.sequence > full.msg.power.sequence  # the newer truth comes last


def test_rejected_agent_waits_and_keeps_trying(manager: FakeManager, fake: FakeHypervisor) -> None:
    manager.reject = pb.Reject(code=pb.REJECT_DUPLICATE_HOST, reason="dup", retry_after_s=0.5)
    r = start_link((manager.address,), fake)
    try:
        first = manager.wait_for(lambda m: m.kind == "hello" and m.stream == 1)
        second = manager.wait_for(lambda m: m.kind == "hello" and m.stream == 2)
        assert second.at - first.at >= 0.5
        manager.reject = None
        manager.wait_for(is_full, timeout_s=5)
        assert r.thread.is_alive()
    finally:
        r.loop.call_soon_threadsafe(r.stop.set)
        r.thread.join(timeout=10)


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    assert backoff_s(0, 0.5, 30, rand=lambda: 0.0) == 0.25
    assert backoff_s(0, 0.5, 30, rand=lambda: 1.0) == 0.5
    assert backoff_s(3, 0.5, 30, rand=lambda: 1.0) == 4.0
    assert backoff_s(50, 0.5, 30, rand=lambda: 1.0) == 30.0
    assert backoff_s(50, 0.5, 30, rand=lambda: 0.0) == 15.0


def test_inventory_goes_in_hello_and_again_only_when_it_changes(manager: FakeManager, fake: FakeHypervisor) -> None:
    """Issue 16: the Hello carries the inventory; a change is sent once, an unchanged one never; one session."""
    current = [pb.Inventory(networks=["bridge:br0"], free_memory_mib=4096)]
    r = start_link((manager.address,), fake, inventory=lambda: current[0])
    try:
        hello = manager.wait_for(lambda m: m.kind == "hello").msg.hello
        assert list(hello.inventory.networks) == ["bridge:br0"] and hello.inventory.free_memory_mib == 4096
        manager.wait_for(is_full)
        mark = manager.mark()
        current[0] = pb.Inventory(networks=["bridge:br0", "bridge:br1"], free_memory_mib=4096)
        sent = manager.wait_for(lambda m: m.kind == "inventory", since=mark).msg.inventory
        assert list(sent.networks) == ["bridge:br0", "bridge:br1"]
        later = manager.mark()
        manager.wait_for(lambda m: m.kind == "ping", since=later)
        time.sleep(1.0)  # five more reads of an unchanged inventory
        assert manager.messages("inventory", since=later) == []
        assert {m.stream for m in manager.received} == {1}, "the session was never dropped"
    finally:
        r.loop.call_soon_threadsafe(r.stop.set)
        r.thread.join(timeout=10)


def test_an_agent_without_an_inventory_source_keeps_its_session(manager: FakeManager, running: Running) -> None:
    manager.wait_for(is_full)
    mark = manager.mark()
    assert len([m for m in manager.received[mark:] if m.kind == "hello"]) == 0
    manager.wait_for(lambda m: m.kind == "ping", since=mark)
    assert {m.stream for m in manager.received} == {1} and manager.messages("inventory") == []
