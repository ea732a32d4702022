"""A lab with agents (pointed at a manager address nobody serves yet): the agent fault and its heal."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from kvmha.lab import Lab, proc
from kvmha.lab.wait import wait_for

from .conftest import make_lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]


@pytest.fixture(scope="module")
def agent_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with make_lab(tmp_path_factory, 1, manager="default", agent_settings={"heartbeat_interval_s": 0.5}) as lab:
        yield lab


def test_agent_killed_alone_leaves_libvirt_and_vms_and_heal_restarts_it(agent_lab: Lab) -> None:
    lab = agent_lab
    assert lab.spec.manager == f"{lab.spec.bridge_address}:50051"
    lab.vm_create("vm-agent", "h1")
    services = {name: proc.info(pid) for name, pid in lab.services("h1").items()}
    agent = services["kvmha-agent"]
    assert agent is not None
    [qemu] = [p for p in lab.processes("h1") if p.comm == "qemu-system-x86"]

    lab.fail("h1", "agent")
    assert lab.faults("h1") == ["agent"]
    assert not proc.alive(agent.pid, agent.start_ticks)
    for name, info in services.items():
        if name != "kvmha-agent":
            assert info is not None and proc.alive(info.pid, info.start_ticks), name
    assert proc.alive(qemu.pid, qemu.start_ticks)
    assert lab.domstate("h1", "vm-agent") == ("running", "booted")

    assert lab.heal("h1") == ["agent"]
    assert lab.services("h1")["kvmha-agent"] != agent.pid
    assert lab.faults("h1") == []


def test_storage_cut_stops_the_agents_heartbeat_and_heal_resumes_it(agent_lab: Lab) -> None:
    heartbeat = pytest.importorskip("kvmha.agent.heartbeat")
    lab = agent_lab
    path = heartbeat.heartbeat_file(lab.spec.shared_dir, lab.host("h1").host_uuid)

    def age_s() -> float:
        try:
            return time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return float("inf")

    wait_for(lambda: age_s() < 2.0, 15, "a heartbeat on the shared storage (the agent writes none)", 0.1)
    lab.fail("h1", "storage")
    time.sleep(3.0)
    assert age_s() > 2.5, "a heartbeat got through the storage cut"
    lab.heal("h1")
    wait_for(lambda: age_s() < 2.0, 15, "a heartbeat on the shared storage after the heal", 0.1)
