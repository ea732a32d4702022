"""CommandRunner against the FakeHypervisor: results, idempotence, garbage arguments, bounded neighbour checks."""

from __future__ import annotations

import math
import os
import socket
import threading
import time

import pytest

from kvmha.agent.commands import CommandRunner
from kvmha.agent.heartbeat import HEARTBEAT_DIR, write_heartbeat
from kvmha.agent.hypervisor import Cause, FakeHypervisor
from kvmha.lab.domain import domain_xml
from kvmha.proto.v1 import agent_pb2 as pb
from tests.agent.conftest import new_uuid


@pytest.fixture
def fake() -> FakeHypervisor:
    hv = FakeHypervisor()
    hv.open()
    return hv


@pytest.fixture
def runner(fake: FakeHypervisor, tmp_path: object) -> CommandRunner:
    return CommandRunner(fake, (str(tmp_path),), neighbor_port=22, cache_size=8)


def start(vm_uuid: str, request_id: str = "r1", xml: str | None = None) -> pb.Command:
    return pb.Command(request_id=request_id, start_vm=pb.StartVm(
        vm_uuid=vm_uuid, domain_xml=xml if xml is not None else domain_xml("vm", vm_uuid)))


def test_start_then_start_again_reports_already_running_and_starts_one_copy(
        runner: CommandRunner, fake: FakeHypervisor) -> None:
    vm = new_uuid()
    first = runner.run(start(vm, "r1"))
    second = runner.run(start(vm, "r2"))
    assert first.ok and not first.vm_started.already_running
    assert second.ok and second.vm_started.already_running
    assert fake.running_uuids() == {vm}
    assert fake.calls.count("start_vm") == 2


def test_replay_returns_first_result_and_does_nothing_twice(runner: CommandRunner, fake: FakeHypervisor) -> None:
    vm = new_uuid()
    first = runner.run(start(vm, "same"))
    fake.destroy_vm(vm)
    replay = runner.run(start(vm, "same"))
    assert replay == first
    assert fake.calls.count("start_vm") == 1
    assert fake.running_uuids() == set()  # the replay did not start it again


def test_concurrent_replay_waits_for_the_first_run(runner: CommandRunner, fake: FakeHypervisor) -> None:
    fake.delay_s = 0.3
    vm = new_uuid()
    results: list[pb.CommandResult] = []
    threads = [threading.Thread(target=lambda: results.append(runner.run(start(vm, "dup")))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.calls.count("start_vm") == 1
    assert len(results) == 4 and all(r == results[0] for r in results)


def test_lru_forgets_oldest_request_ids(runner: CommandRunner, fake: FakeHypervisor) -> None:
    for i in range(9):
        runner.run(pb.Command(request_id=f"cap-{i}", get_capacity=pb.GetCapacity()))
    runner.run(pb.Command(request_id="cap-0", get_capacity=pb.GetCapacity()))  # evicted: runs again
    runner.run(pb.Command(request_id="cap-8", get_capacity=pb.GetCapacity()))  # cached: does not
    assert fake.calls.count("capacity") == 10


def test_stop_and_destroy(runner: CommandRunner, fake: FakeHypervisor) -> None:
    vm = new_uuid()
    runner.run(start(vm))
    stopped = runner.run(pb.Command(request_id="s", stop_vm=pb.StopVm(vm_uuid=vm, timeout_s=1)))
    assert stopped.ok and fake.running_uuids() == set()
    again = runner.run(pb.Command(request_id="d", destroy_vm=pb.DestroyVm(vm_uuid=vm)))
    assert again.ok  # destroying an off domain is success
    missing = runner.run(pb.Command(request_id="m", destroy_vm=pb.DestroyVm(vm_uuid=new_uuid())))
    assert not missing.ok and missing.code == pb.ERROR_NOT_FOUND


def test_capacity(runner: CommandRunner) -> None:
    result = runner.run(pb.Command(request_id="c", get_capacity=pb.GetCapacity()))
    assert result.ok and result.capacity.cpus == 8 and result.capacity.memory_mib == 16384


def test_libvirt_error_message_is_passed_through(runner: CommandRunner, fake: FakeHypervisor) -> None:
    fake.fail_next = "internal error: process exited while connecting to monitor"
    result = runner.run(start(new_uuid()))
    assert not result.ok and result.code == pb.ERROR_LIBVIRT
    assert "process exited while connecting to monitor" in result.message


def test_hypervisor_down_is_its_own_error(runner: CommandRunner, fake: FakeHypervisor) -> None:
    fake.set_connected(False)
    result = runner.run(pb.Command(request_id="c", get_capacity=pb.GetCapacity()))
    assert result.code == pb.ERROR_HYPERVISOR_UNAVAILABLE


def test_missing_xml_uuid_gets_the_commands_uuid(runner: CommandRunner, fake: FakeHypervisor) -> None:
    vm = new_uuid()
    xml = domain_xml("vm", vm).replace(f"<uuid>{vm}</uuid>", "")
    assert runner.run(start(vm, xml=xml)).ok
    assert fake.running_uuids() == {vm}


GARBAGE = [
    ("empty command", pb.Command(request_id="g"), pb.ERROR_UNKNOWN_COMMAND),
    ("no request id", pb.Command(get_capacity=pb.GetCapacity()), pb.ERROR_INVALID_ARGUMENT),
    ("huge request id", pb.Command(request_id="x" * 1000, get_capacity=pb.GetCapacity()), pb.ERROR_INVALID_ARGUMENT),
    ("start: bad uuid", pb.Command(request_id="g", start_vm=pb.StartVm(vm_uuid="nope", domain_xml="<domain/>")),
     pb.ERROR_INVALID_ARGUMENT),
    ("start: empty xml", pb.Command(request_id="g", start_vm=pb.StartVm(vm_uuid=new_uuid())),
     pb.ERROR_INVALID_ARGUMENT),
    ("start: malformed xml", pb.Command(request_id="g", start_vm=pb.StartVm(vm_uuid=new_uuid(), domain_xml="<dom")),
     pb.ERROR_INVALID_ARGUMENT),
    ("start: not a domain", pb.Command(request_id="g", start_vm=pb.StartVm(vm_uuid=new_uuid(),
                                                                          domain_xml="<network/>")),
     pb.ERROR_INVALID_ARGUMENT),
    ("start: uuid mismatch", pb.Command(request_id="g", start_vm=pb.StartVm(
        vm_uuid=new_uuid(), domain_xml=domain_xml("x", new_uuid()))), pb.ERROR_INVALID_ARGUMENT),
    ("start: bad xml uuid", pb.Command(request_id="g", start_vm=pb.StartVm(
        vm_uuid=new_uuid(), domain_xml="<domain><name>x</name><uuid>zzz</uuid></domain>")),
     pb.ERROR_INVALID_ARGUMENT),
    ("start: no name", pb.Command(request_id="g", start_vm=pb.StartVm(
        vm_uuid=new_uuid(), domain_xml="<domain type='qemu'></domain>")), pb.ERROR_LIBVIRT),
    ("stop: bad uuid", pb.Command(request_id="g", stop_vm=pb.StopVm(vm_uuid="../../etc")), pb.ERROR_INVALID_ARGUMENT),
    ("stop: negative timeout", pb.Command(request_id="g", stop_vm=pb.StopVm(vm_uuid=new_uuid(), timeout_s=-1)),
     pb.ERROR_INVALID_ARGUMENT),
    ("stop: NaN timeout", pb.Command(request_id="g", stop_vm=pb.StopVm(vm_uuid=new_uuid(), timeout_s=math.nan)),
     pb.ERROR_INVALID_ARGUMENT),
    ("destroy: empty uuid", pb.Command(request_id="g", destroy_vm=pb.DestroyVm()), pb.ERROR_INVALID_ARGUMENT),
    ("neighbor: bad host uuid", pb.Command(request_id="g", check_neighbor=pb.CheckNeighbor(
        host_uuid="../../../etc/passwd", address="127.0.0.1")), pb.ERROR_INVALID_ARGUMENT),
    ("neighbor: empty address", pb.Command(request_id="g", check_neighbor=pb.CheckNeighbor(host_uuid=new_uuid())),
     pb.ERROR_INVALID_ARGUMENT),
    ("neighbor: option-like address", pb.Command(request_id="g", check_neighbor=pb.CheckNeighbor(
        host_uuid=new_uuid(), address="-f")), pb.ERROR_INVALID_ARGUMENT),
    ("neighbor: port out of range", pb.Command(request_id="g", check_neighbor=pb.CheckNeighbor(
        host_uuid=new_uuid(), address="127.0.0.1", port=70000)), pb.ERROR_INVALID_ARGUMENT),
    ("neighbor: infinite timeout", pb.Command(request_id="g", check_neighbor=pb.CheckNeighbor(
        host_uuid=new_uuid(), address="127.0.0.1", timeout_s=math.inf)), pb.ERROR_INVALID_ARGUMENT),
]


@pytest.mark.parametrize(("label", "command", "code"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_gets_an_error_result(runner: CommandRunner, fake: FakeHypervisor, label: str,
                                      command: pb.Command, code: int) -> None:
    result = runner.run(command)
    assert not result.ok, label
    assert result.code == code, (label, result)
    assert result.message
    assert fake.running_uuids() == set()


def _heartbeat_fifo(storage: str, host_uuid: str) -> str:
    path = os.path.join(storage, HEARTBEAT_DIR, host_uuid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.mkfifo(path)
    return path


def test_check_neighbor_reports_tcp_and_heartbeat(runner: CommandRunner, tmp_path: object) -> None:
    host = new_uuid()
    write_heartbeat(str(tmp_path), host, time.time() - 5)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = runner.run(pb.Command(request_id="n", check_neighbor=pb.CheckNeighbor(
            host_uuid=host, address="127.0.0.1", port=port, timeout_s=2)))
    report = result.neighbor
    assert result.ok and report.tcp_reachable and report.heartbeat_found
    assert 4.5 < report.heartbeat_age_s < 8


def test_check_neighbor_answers_within_its_timeout_when_storage_hangs(runner: CommandRunner, tmp_path: object) -> None:
    host = new_uuid()
    # Reading a FIFO with no writer blocks forever: a stand-in for a hung NFS mount.
    fifo = _heartbeat_fifo(str(tmp_path), host)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: connection refused
    try:
        began = time.monotonic()
        result = runner.run(pb.Command(request_id="n", check_neighbor=pb.CheckNeighbor(
            host_uuid=host, address="127.0.0.1", port=port, timeout_s=1.0)))
        took_s = time.monotonic() - began
    finally:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # releases the blocked reader thread
        os.close(fd)
    assert took_s < 1.6
    assert result.ok and not result.neighbor.tcp_reachable and not result.neighbor.heartbeat_found
    assert "still running at the deadline" in result.neighbor.detail


def test_stop_of_guest_ignoring_acpi_destroys(runner: CommandRunner, fake: FakeHypervisor) -> None:
    vm = new_uuid()
    runner.run(start(vm))
    fake.ignore_shutdown = True
    assert runner.run(pb.Command(request_id="s", stop_vm=pb.StopVm(vm_uuid=vm, timeout_s=0.1))).ok
    assert [d.cause for d in fake.list_domains()] == [Cause.DESTROYED]
