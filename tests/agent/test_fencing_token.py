"""The agent's fencing token: a command from a manager whose lease epoch is older than the newest the agent has seen
(in a Welcome or a command) is refused and never reaches the hypervisor; epoch 0 (a manager without leases) is
accepted and never raises the newest."""

from __future__ import annotations

from pathlib import Path

from kvmha.agent.commands import CommandRunner
from kvmha.agent.hypervisor import FakeHypervisor
from kvmha.lab.domain import domain_xml
from kvmha.proto.v1 import agent_pb2 as pb
from tests.agent.conftest import new_uuid


def _runner(tmp_path: Path) -> tuple[CommandRunner, FakeHypervisor]:
    fake = FakeHypervisor()
    fake.open()
    return CommandRunner(fake, (str(tmp_path),), neighbor_port=22, cache_size=8), fake


def _start(vm: str, request_id: str, epoch: int) -> pb.Command:
    return pb.Command(request_id=request_id, epoch=epoch,
                      start_vm=pb.StartVm(vm_uuid=vm, domain_xml=domain_xml("vm", vm)))


def test_a_deposed_managers_start_is_refused_after_the_new_owner_welcomed_the_agent(tmp_path: Path) -> None:
    runner, fake = _runner(tmp_path)
    vm = new_uuid()
    runner.saw_epoch(5)  # the manager that took the host over (epoch 5) welcomed this agent
    late = runner.run(_start(vm, "old-manager.1", epoch=4))
    assert not late.ok and late.code == pb.ERROR_STALE_EPOCH
    assert fake.running_uuids() == set() and "start_vm" not in fake.calls
    assert runner.run(_start(vm, "new-manager.1", epoch=5)).ok
    assert fake.running_uuids() == {vm}


def test_a_newer_epoch_in_a_command_raises_the_bar_and_zero_never_does(tmp_path: Path) -> None:
    runner, _ = _runner(tmp_path)
    vm, other = new_uuid(), new_uuid()
    assert runner.run(_start(vm, "a", epoch=7)).ok
    assert runner.run(_start(other, "b", epoch=0)).ok, "a manager without leases (epoch 0) was refused"
    assert runner.newest_epoch == 7
    assert runner.run(_start(other, "c", epoch=6)).code == pb.ERROR_STALE_EPOCH
    runner.saw_epoch(3)  # an older Welcome (a manager that lost the race) never lowers the bar
    assert runner.newest_epoch == 7
