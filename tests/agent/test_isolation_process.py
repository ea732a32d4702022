"""The isolation response in a real agent process on a private libvirtd: it destroys its VMs only when both the
manager and the storage heartbeat are gone for longer than `after_s`. VM states are read from libvirt (virsh)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from kvmha.lab.domain import domain_xml
from kvmha.lab.testing.fake_manager import FakeManager
from kvmha.lab.testing.libvirtd import PrivateLibvirtd
from kvmha.lab.testing.local import AgentProcess
from tests.agent.conftest import new_uuid

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(120)]

AFTER_S = 2.0


def dead_manager() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def broken_storage(tmp_path: Path) -> str:
    path = tmp_path / "lost-nfs"
    path.write_text("a file where the storage directory should be: every heartbeat write fails")
    return str(path)


def run_case(lv: PrivateLibvirtd, tmp_path: Path, managers: list[str], storage: str) -> tuple[str, str]:
    vm, name = new_uuid(), f"iso-{new_uuid()[:8]}"
    xml_path = tmp_path / f"{name}.xml"
    xml_path.write_text(domain_xml(name, vm, domain_type=lv.domain_type))
    lv.virsh("create", str(xml_path))  # transient: started behind the agent's back, like any running VM
    agent = AgentProcess(tmp_path, managers, libvirt_uri=lv.uri, storage_paths=[storage], isolation="destroy-vms",
                         isolation_after_s=AFTER_S, heartbeat_interval_s=0.5).start()
    try:
        deadline = time.monotonic() + AFTER_S + 4.0
        state = lv.virsh("domstate", vm).stdout.strip()
        # "in shutdown" is a domain on its way out (destroy in progress): keep watching until it settles.
        while time.monotonic() < deadline and state in ("running", "in shutdown"):
            time.sleep(0.2)
            state = lv.virsh("domstate", vm, check=False).stdout.strip() or "gone"
    finally:
        assert agent.stop() == 0
        lv.virsh("destroy", vm, check=False)
    return state, agent.log()


def test_isolated_host_destroys_its_vms(private_libvirtd: PrivateLibvirtd, tmp_path: Path) -> None:
    state, log = run_case(private_libvirtd, tmp_path, [dead_manager()], broken_storage(tmp_path))
    assert state == "gone"  # transient domain destroyed: libvirt no longer knows it
    assert "event=isolation_response" in log and "action=destroy-vms" in log


def test_storage_alone_lost_is_not_isolation(private_libvirtd: PrivateLibvirtd, tmp_path: Path) -> None:
    manager = FakeManager(ping_interval_s=0.2).start()
    try:
        state, log = run_case(private_libvirtd, tmp_path, [manager.address], broken_storage(tmp_path))
    finally:
        manager.close()
    assert state == "running" and "event=isolation_response" not in log


def test_manager_alone_lost_is_not_isolation(private_libvirtd: PrivateLibvirtd, tmp_path: Path) -> None:
    state, log = run_case(private_libvirtd, tmp_path, [dead_manager()], str(tmp_path / "shared"))
    assert state == "running" and "event=isolation_response" not in log
