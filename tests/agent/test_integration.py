"""A real kvmha-agent process streaming to an in-test AgentLink server (FakeManager) on 127.0.0.1.

Most tests use libvirt's in-process `test:///default` driver inside the agent (it starts with one running domain,
"test"); the QEMU-kill test uses the private libvirtd so that a real QEMU process dies.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmha.lab.domain import domain_xml
from kvmha.lab.testing.fake_manager import FakeManager, Received
from kvmha.lab.testing.libvirtd import PrivateLibvirtd
from kvmha.lab.testing.local import AgentProcess
from kvmha.proto.v1 import agent_pb2 as pb
from tests.agent.conftest import new_uuid
from tests.agent.test_commands import GARBAGE

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def agent(manager: FakeManager, tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path, [manager.address], storage_paths=[str(tmp_path / "shared")]).start()
    try:
        yield proc
    finally:
        code = proc.stop()
        assert code == 0, proc.log()[-3000:]


def is_full(r: Received) -> bool:
    return r.kind == "power" and r.msg.power.full


def test_hello_then_full_snapshot_then_pings_on_time(manager: FakeManager, agent: AgentProcess) -> None:
    hello = manager.wait_for(lambda r: r.kind == "hello").msg.hello
    assert hello.host_uuid == agent.host_uuid and hello.protocol_version == pb.PROTOCOL_VERSION_CURRENT
    assert hello.boot_id and hello.capacity.cpus > 0 and hello.libvirt_version.count(".") == 2
    assert list(hello.storage_paths) == [str(agent.workdir / "shared")]
    full = manager.wait_for(is_full)
    kinds = [r.kind for r in manager.received[:2]]
    assert kinds == ["hello", "power"], "the full report comes right after Hello/Welcome, before any ping"
    assert [d.name for d in full.msg.power.domains] == ["test"] and full.msg.power.hypervisor_connected
    manager.wait_for(lambda r: r.kind == "ping" and r.msg.ping.sequence >= 16, timeout_s=10)
    pings = manager.messages("ping")
    gaps_s = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert [p.msg.ping.sequence for p in pings] == list(range(1, len(pings) + 1))
    assert 0.17 < statistics.median(gaps_s) < 0.23, gaps_s  # Welcome said 0.2 s
    # Arrival times also carry this test's own scheduling on a shared 2-core machine: allow one late arrival.
    assert sorted(gaps_s)[-2] < 0.4, gaps_s
    last = pings[-1].msg.ping
    assert last.hypervisor_connected and last.domains_running == 1
    assert [s.ok for s in last.storage] == [True] and 0 <= last.storage[0].last_ok_age_s < 2


def test_command_round_trips(manager: FakeManager, agent: AgentProcess) -> None:
    manager.wait_for(is_full)
    vm = new_uuid()
    mark = manager.mark()
    started = manager.command("start-1", start_vm=pb.StartVm(vm_uuid=vm, domain_xml=domain_xml("it-vm", vm)))
    assert started.ok and started.vm_started.uuid == vm and not started.vm_started.already_running
    delta = manager.wait_for(lambda r: r.kind == "power" and not r.msg.power.full
                             and r.msg.power.domains[0].uuid == vm, since=mark).msg.power.domains[0]
    assert (delta.state, delta.cause, delta.detail_text) == (pb.POWER_ON, pb.CAUSE_BOOTED, "STARTED_BOOTED")
    again = manager.command("start-2", start_vm=pb.StartVm(vm_uuid=vm, domain_xml=domain_xml("it-vm", vm)))
    assert again.ok and again.vm_started.already_running
    cap = manager.command("cap", get_capacity=pb.GetCapacity())
    assert cap.ok and cap.capacity.cpus > 0 and cap.capacity.memory_mib > 0
    mark = manager.mark()
    assert manager.command("stop", stop_vm=pb.StopVm(vm_uuid=vm, timeout_s=5)).ok
    stopped = manager.wait_for(lambda r: r.kind == "power" and r.msg.power.domains[0].uuid == vm
                               and r.msg.power.domains[0].state == pb.POWER_OFF, since=mark).msg.power.domains[0]
    assert stopped.cause == pb.CAUSE_GUEST_SHUTDOWN  # the test driver's shutdown is a guest shutdown
    assert manager.command("destroy", destroy_vm=pb.DestroyVm(vm_uuid=vm)).ok  # already off: success
    neighbor = manager.command("nb", check_neighbor=pb.CheckNeighbor(
        host_uuid=agent.host_uuid, address="127.0.0.1", port=manager.port, timeout_s=2))
    assert neighbor.ok and neighbor.neighbor.tcp_reachable and neighbor.neighbor.heartbeat_found
    assert neighbor.neighbor.heartbeat_age_s < 2


def test_replayed_request_id_returns_the_first_result_and_does_nothing(manager: FakeManager,
                                                                       agent: AgentProcess) -> None:
    manager.wait_for(is_full)
    vm = new_uuid()
    start = pb.StartVm(vm_uuid=vm, domain_xml=domain_xml("replay-vm", vm))
    first = manager.command("once", start_vm=start)
    assert manager.command("kill", destroy_vm=pb.DestroyVm(vm_uuid=vm)).ok
    mark = manager.mark()
    replay = manager.command("once", start_vm=start)
    assert replay == first
    # No second start happened: a fresh full report (from a reconnect) still shows the VM off.
    manager.stop()
    manager.start()
    full = manager.wait_for(is_full, since=mark, timeout_s=15).msg.power
    states = {d.uuid: d.state for d in full.domains}
    assert states[vm] == pb.POWER_OFF
    assert not any(r.kind == "power" and r.msg.power.domains and r.msg.power.domains[0].uuid == vm
                   and r.msg.power.domains[0].state == pb.POWER_ON for r in manager.received[mark:])


def test_reconnects_after_the_manager_restarts(manager: FakeManager, agent: AgentProcess) -> None:
    manager.wait_for(is_full)
    manager.stop()
    time.sleep(1.0)
    mark = manager.mark()
    manager.start()  # same port
    hello = manager.wait_for(lambda r: r.kind == "hello", since=mark, timeout_s=15)
    assert hello.stream == 2 and hello.msg.hello.host_uuid == agent.host_uuid
    after = manager.wait_for(is_full, since=mark)
    assert after.stream == 2
    manager.wait_for(lambda r: r.kind == "ping" and r.stream == 2, since=mark)


def test_reject_is_logged_and_retried_after_retry_after(manager: FakeManager, agent: AgentProcess) -> None:
    manager.reject = pb.Reject(code=pb.REJECT_UNKNOWN_HOST, reason="host not registered", retry_after_s=1.5)
    manager.wait_for(lambda r: r.kind == "hello")
    def hello_on(stream: int) -> Callable[[Received], bool]:
        return lambda r: r.kind == "hello" and r.stream == stream

    hellos = [manager.wait_for(hello_on(n), timeout_s=10) for n in (1, 2, 3)]
    gaps_s = [b.at - a.at for a, b in itertools.pairwise(hellos)]
    assert all(gap >= 1.5 for gap in gaps_s), gaps_s
    assert agent.alive
    assert "event=manager_rejected" in agent.log() and "REJECT_UNKNOWN_HOST" in agent.log()
    manager.reject = None
    mark = manager.mark()
    manager.wait_for(is_full, since=mark, timeout_s=10)


def test_garbage_commands_get_errors_and_pings_go_on(manager: FakeManager, agent: AgentProcess) -> None:
    manager.wait_for(is_full)
    for i, (label, command, code) in enumerate(GARBAGE):
        cmd = pb.Command()
        cmd.CopyFrom(command)
        if cmd.request_id == "g":
            cmd.request_id = f"garbage-{i}"
        mark = manager.mark()
        manager.send(cmd)
        result = manager.wait_for(lambda r: r.kind == "result", since=mark).msg.result
        assert not result.ok and result.code == code, (label, result)
    before = manager.messages("ping")[-1].msg.ping.sequence
    manager.wait_for(lambda r: r.kind == "ping" and r.msg.ping.sequence >= before + 3)
    assert agent.alive


def test_rotates_to_the_next_manager_when_one_is_down(manager: FakeManager, tmp_path: Path) -> None:
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_address = f"127.0.0.1:{dead.getsockname()[1]}"  # nobody listens there
    proc = AgentProcess(tmp_path, [dead_address, manager.address]).start()
    try:
        manager.wait_for(is_full, timeout_s=15)
        assert "event=manager_connect_failed" in proc.log()
    finally:
        assert proc.stop() == 0


def test_sigterm_sends_goodbye_and_exits_zero(manager: FakeManager, tmp_path: Path) -> None:
    proc = AgentProcess(tmp_path, [manager.address]).start()
    manager.wait_for(is_full)
    assert proc.stop() == 0
    goodbye = manager.wait_for(lambda r: r.kind == "goodbye", timeout_s=2)
    assert "planned" in goodbye.msg.goodbye.reason


def test_libvirt_unreachable_is_said_not_all_vms_gone(manager: FakeManager, tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path}/no-such-sock"
    proc = AgentProcess(tmp_path, [manager.address], libvirt_uri=uri).start()
    try:
        hello = manager.wait_for(lambda r: r.kind == "hello", timeout_s=15)
        assert hello.msg.hello.capacity.cpus == 0  # unknown, but the Hello still went out
        report = manager.wait_for(lambda r: r.kind == "power").msg.power
        assert not report.hypervisor_connected and not report.full and not report.domains
        ping = manager.wait_for(lambda r: r.kind == "ping").msg.ping
        assert not ping.hypervisor_connected
        result = manager.command("cap", get_capacity=pb.GetCapacity())
        assert result.code == pb.ERROR_HYPERVISOR_UNAVAILABLE
    finally:
        assert proc.stop() == 0


@pytest.mark.libvirt
def test_delta_on_qemu_kill_and_libvirtd_restart(private_libvirtd: PrivateLibvirtd, manager: FakeManager,
                                                 tmp_path: Path) -> None:
    lv = private_libvirtd
    proc = AgentProcess(tmp_path, [manager.address], libvirt_uri=lv.uri).start()
    name, vm = f"it-kill-{new_uuid()[:8]}", new_uuid()
    try:
        manager.wait_for(is_full, timeout_s=15)
        started = manager.command("s", start_vm=pb.StartVm(vm_uuid=vm, domain_xml=domain_xml(name, vm,
                                                                                            domain_type=lv.domain_type)))
        assert started.ok, started.message
        assert lv.virsh("domstate", vm).stdout.strip() == "running"
        mark = manager.mark()
        killed_at = time.monotonic()
        os.kill(lv.qemu_pid(name), signal.SIGKILL)
        delta = manager.wait_for(lambda r: r.kind == "power" and bool(r.msg.power.domains)
                                 and r.msg.power.domains[0].uuid == vm, since=mark, timeout_s=5)
        latency_s = delta.at - killed_at
        d = delta.msg.power.domains[0]
        assert (d.state, d.cause, d.detail_text) == (pb.POWER_OFF, pb.CAUSE_FAILED, "STOPPED_FAILED")
        assert latency_s < 1.0, f"delta {latency_s:.3f}s after the kill"
        assert lv.virsh("domstate", vm).stdout.strip() == "shut off"
        # libvirtd restarts under the running agent: it says "disconnected", then sends a full report again.
        mark = manager.mark()
        lv.restart_libvirtd()
        manager.wait_for(lambda r: r.kind == "power" and not r.msg.power.hypervisor_connected, since=mark)
        full = manager.wait_for(is_full, since=mark, timeout_s=20).msg.power
        assert {d.uuid: d.state for d in full.domains}[vm] == pb.POWER_OFF
    finally:
        assert proc.stop() == 0
        lv.virsh("undefine", vm, check=False)


def test_sigterm_without_any_manager_exits_promptly(tmp_path: Path) -> None:
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{dead.getsockname()[1]}"
    proc = AgentProcess(tmp_path, [address]).start()
    time.sleep(2.0)
    began = time.monotonic()
    assert proc.stop(timeout_s=5) == 0
    assert time.monotonic() - began < 3.0
    assert "event=agent_stopped" in proc.log()


def test_json_log_format_is_one_object_per_line(manager: FakeManager, tmp_path: Path) -> None:
    proc = AgentProcess(tmp_path, [manager.address])
    proc.config_path.write_text(proc.config_path.read_text().replace("[agent]", '[agent]\nlog_format = "json"'))
    proc.start()
    try:
        manager.wait_for(is_full)
    finally:
        assert proc.stop() == 0
    lines = [json.loads(line) for line in proc.log().splitlines() if line.strip()]
    events = {line.get("event") for line in lines}
    assert {"agent_starting", "manager_welcome", "goodbye_sent", "agent_stopped"} <= events
    assert all("ts" in line and "level" in line for line in lines)
