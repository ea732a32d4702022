"""The agent's migrate_vm / cancel_migration commands against two fake hypervisors (the real libvirt path runs in
the lab e2e tests): the domain moves, progress is reported, bad arguments, a timeout and a cancel are errors."""

from __future__ import annotations

import threading

import pytest

from kvmha.agent.commands import CommandRunner
from kvmha.agent.hypervisor import FakeHypervisor, MigrationOptions
from kvmha.lab.domain import domain_xml
from kvmha.proto.v1 import agent_pb2 as pb
from tests.agent.conftest import new_uuid

PEER_UUID = "0f0e0d0c-0b0a-4908-8706-050403020100"


@pytest.fixture
def hosts() -> tuple[FakeHypervisor, FakeHypervisor]:
    source, target = FakeHypervisor(), FakeHypervisor()
    source.open()
    target.open()
    source.peers["qemu+tcp://10.251.0.12/system"] = target
    return source, target


def _runner(source: FakeHypervisor) -> CommandRunner:
    return CommandRunner(source, (), neighbor_port=22, migration_uri="qemu+tcp://{address}/system",
                         migration=MigrationOptions(tls=False))


def _migrate(vm: str, address: str = "10.251.0.12", timeout_s: float = 60.0, rid: str = "m1") -> pb.Command:
    return pb.Command(request_id=rid, migrate_vm=pb.MigrateVm(vm_uuid=vm, target_host_uuid=PEER_UUID,
                                                              target_address=address, timeout_s=timeout_s))


def _started(source: FakeHypervisor) -> str:
    vm = new_uuid()
    source.start_vm(domain_xml("vm", vm))
    return vm


def test_migrate_moves_the_domain_and_reports_progress(hosts: tuple[FakeHypervisor, FakeHypervisor]) -> None:
    source, target = hosts
    vm = _started(source)
    progress: list[pb.MigrationProgress] = []
    result = _runner(source).run(_migrate(vm), progress.append)
    assert result.ok, result.message
    assert source.running_uuids() == set() and target.running_uuids() == {vm}
    assert [p.memory_iteration for p in progress] == [1, 2, 3]
    assert all(p.request_id == "m1" and p.vm_uuid == vm for p in progress)
    assert progress[-1].data_processed_bytes > progress[0].data_processed_bytes


@pytest.mark.parametrize("address", ["", "a b", "-oProxyCommand=x", "user@host", "h/../x"])
def test_a_target_address_that_is_not_a_host_is_refused(
    hosts: tuple[FakeHypervisor, FakeHypervisor], address: str
) -> None:
    source, _ = hosts
    vm = _started(source)
    result = _runner(source).run(_migrate(vm, address))
    assert not result.ok and result.code == pb.ERROR_INVALID_ARGUMENT
    assert source.running_uuids() == {vm}


def test_an_unreachable_peer_is_a_libvirt_error_and_the_vm_stays(hosts: tuple[FakeHypervisor, FakeHypervisor]) -> None:
    source, _ = hosts
    vm = _started(source)
    result = _runner(source).run(_migrate(vm, "10.251.0.99"))
    assert not result.ok and result.code == pb.ERROR_LIBVIRT and "unable to connect" in result.message
    assert source.running_uuids() == {vm}


def test_timeout_and_cancel_leave_the_vm_on_its_source(hosts: tuple[FakeHypervisor, FakeHypervisor]) -> None:
    source, target = hosts
    vm = _started(source)
    source.migration_step_s = 0.05
    timed_out = _runner(source).run(_migrate(vm, timeout_s=0.01, rid="t"))
    assert not timed_out.ok and timed_out.code == pb.ERROR_TIMEOUT
    runner = _runner(source)
    results: list[pb.CommandResult] = []
    worker = threading.Thread(target=lambda: results.append(runner.run(_migrate(vm, rid="c"))))
    worker.start()
    cancel = runner.run(pb.Command(request_id="x", cancel_migration=pb.CancelMigration(vm_uuid=vm)))
    worker.join(5.0)
    assert cancel.ok and results and not results[0].ok and "canceled" in results[0].message
    assert source.running_uuids() == {vm} and target.running_uuids() == set()
