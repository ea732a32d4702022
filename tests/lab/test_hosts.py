"""One lab of three hosts, shared by the tests of this module: isolation of the hosts, their network, their BMCs,
and the faults that a heal undoes (network, storage, libvirtd), plus the two ways a VM can stop."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvmha.lab import Lab, proc, vm
from kvmha.lab.fault import STORAGE_CUT_SOURCE
from kvmha.lab.wait import wait_for

from .conftest import ping

pytestmark = [pytest.mark.lab, pytest.mark.slow]


def domains(lab: Lab, host: str) -> set[str]:
    return set(lab.virsh(host, "list", "--all", "--name").split())


def test_each_host_runs_its_own_libvirt_and_sees_only_its_own_domains(lab: Lab, vm_name: str) -> None:
    lab.vm_create(vm_name, "h1")
    assert vm_name in domains(lab, "h1")
    assert vm_name not in domains(lab, "h2") | domains(lab, "h3")
    assert lab.domstate("h1", vm_name) == ("running", "booted")
    # One libvirtd per host, each in the host's own PID namespace (PID 1 there is the host's init).
    daemons = {host.name: lab.services(host.name) for host in lab.hosts}
    assert len({d["libvirtd"] for d in daemons.values()}) == 3
    namespaces = {proc.pid_ns(d["libvirtd"]) for d in daemons.values()}
    assert len(namespaces) == 3 and proc.pid_ns(os.getpid()) not in namespaces
    # The VM's QEMU lives in h1's PID namespace and nowhere else.
    assert lab.vm_hosts(vm_name) == ["h1"]
    everywhere = lab.running_vms()
    assert vm_name in everywhere["h1"] and all(vm_name not in everywhere[h] for h in ("h2", "h3"))


def test_hosts_reach_each_other_and_the_manager_side_over_the_bridge(lab: Lab) -> None:
    for source in lab.hosts:
        for target in lab.hosts:
            if source is not target:
                assert ping(lab, source.name, target.address, tries=3), f"{source.name} -> {target.name}"
        assert ping(lab, source.name, lab.spec.bridge_address, tries=3)
        assert ping(lab, None, source.address, tries=3)


def test_hosts_use_only_loopback_the_lab_subnet_and_the_bmc_network(lab: Lab) -> None:
    plan = lab.bmc_net
    assert plan is not None and plan.subnet == "10.251.1.192/26"  # the test subnet shifted by 256 addresses
    for host in lab.hosts:
        lines = lab.exec(host.name, ["ip", "-o", "addr", "show"]).stdout.splitlines()
        addresses = sorted(line.split()[3] for line in lines)
        assert addresses == sorted(["127.0.0.1/8", f"{host.address}/26", f"{plan.host_address(host.index)}/26"])


def _ipmi_status_from(lab: Lab, source: str, target: str) -> str:
    address, port, user, password = lab.bmc_credentials(target)
    argv = ["ipmitool", "-I", "lanplus", "-C", "3", "-H", address, "-p", str(port), "-U", user, "-E",
            "-N", "1", "-R", "2", "chassis", "power", "status"]
    done = lab.exec(source, ["env", f"IPMI_PASSWORD={password}", *argv], check=False)
    return done.stdout.strip() if done.returncode == 0 else f"failed: {done.stderr.strip()}"


def test_bmcs_answer_on_the_bmc_network_from_the_machine_and_from_every_host(lab: Lab) -> None:
    """The out-of-band network: each BMC in its own namespace on the BMC bridge at port 623, reachable from the root
    namespace (a manager) and from inside the hosts (a cluster stack's fence agent), also from a host whose lab
    network is cut (a partitioned node must still be able to fence)."""
    plan = lab.bmc_net
    assert plan is not None
    for host in lab.hosts:
        assert lab.bmc_credentials(host.name)[:2] == (plan.bmc_address(host.index), 623)
        assert lab.power_state(host.name) == "on"  # ipmitool from the root namespace
        for source in lab.hosts:
            assert _ipmi_status_from(lab, source.name, host.name) == "Chassis Power is on", (source.name, host.name)
    lab.fail("h1", "network")
    assert not ping(lab, "h1", lab.host("h2").address)
    assert _ipmi_status_from(lab, "h1", "h2") == "Chassis Power is on"


def test_every_bmc_reports_power_on_through_ipmi(lab: Lab) -> None:
    for host in lab.hosts:
        assert lab.power_state(host.name) == "on"
        assert lab.init(host.name) is not None


def test_network_cut_keeps_vms_running_but_the_host_unreachable(lab: Lab, vm_name: str) -> None:
    lab.vm_create(vm_name, "h2")
    qemu_before = lab.vm_hosts(vm_name)
    lab.fail("h2", "network")
    assert lab.faults("h2") == ["network"]
    h2 = lab.host("h2").address
    assert not ping(lab, None, h2)
    assert not ping(lab, "h1", h2)
    assert not ping(lab, "h2", lab.host("h3").address)
    # Inside, the host goes on: its libvirtd answers and its VM runs.
    assert lab.domstate("h2", vm_name) == ("running", "booted")
    assert lab.vm_hosts(vm_name) == qemu_before == ["h2"]
    assert lab.heal("h2") == ["network"]
    wait_for(lambda: ping(lab, "h1", h2), 10, "h1 reaching h2 after the heal", 0.1)
    assert ping(lab, None, h2, tries=3)


def test_storage_cut_fails_writes_in_that_host_only(lab: Lab) -> None:
    probe = os.path.join(lab.spec.shared_dir, "probe-storage-cut")
    lab.fail("h3", "storage")
    assert lab.faults("h3") == ["storage"]
    denied = lab.exec("h3", ["touch", probe], check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    # The other hosts and the root namespace still see and write the shared storage.
    lab.exec("h1", ["touch", probe])
    assert os.path.exists(probe)
    mounts = lab.exec("h3", ["cat", "/proc/self/mounts"]).stdout
    assert STORAGE_CUT_SOURCE in mounts
    lab.heal("h3")
    lab.exec("h3", ["rm", probe])
    assert not os.path.exists(probe)


def test_libvirtd_killed_alone_leaves_vms_running_and_heal_restarts_it(lab: Lab, vm_name: str) -> None:
    lab.vm_create(vm_name, "h3")
    [(_, qemu)] = vm.qemu_of(lab, vm_name)
    libvirtd = proc.info(lab.services("h3")["libvirtd"])
    assert libvirtd is not None
    lab.fail("h3", "libvirtd")
    assert lab.faults("h3") == ["libvirtd"]
    assert "libvirtd" not in lab.services("h3")
    assert not proc.alive(libvirtd.pid, libvirtd.start_ticks)
    assert proc.alive(qemu.pid, qemu.start_ticks), "QEMU must survive its libvirtd"
    assert lab.exec("h3", ["virsh", "-c", "qemu:///system", "list"], check=False).returncode != 0
    assert lab.heal("h3") == ["libvirtd"]
    assert lab.services("h3")["libvirtd"] != libvirtd.pid
    # The new libvirtd found the running domain again: same QEMU process, still running.
    assert lab.domstate("h3", vm_name)[0] == "running"
    assert proc.alive(qemu.pid, qemu.start_ticks)


def test_vm_kill_is_a_crash_for_libvirt(lab: Lab, vm_name: str) -> None:
    lab.vm_create(vm_name, "h1")
    assert lab.vm_kill(vm_name) == "h1"
    wait_for(lambda: lab.domstate("h1", vm_name)[0] == "shut off", 15, f"{vm_name} shut off on h1", 0.1)
    assert lab.domstate("h1", vm_name) == ("shut off", "crashed")
    assert lab.vm_hosts(vm_name) == []


def test_guest_shutdown_is_a_shutdown_asked_by_the_guest(lab: Lab, vm_name: str) -> None:
    lab.vm_create(vm_name, "h2")
    assert lab.guest_shutdown(vm_name) == "h2"
    wait_for(lambda: lab.domstate("h2", vm_name)[0] == "shut off", 15, f"{vm_name} shut off on h2", 0.1)
    assert lab.domstate("h2", vm_name) == ("shut off", "shutdown")
    # Second witness, the domain's log: libvirt ended it because QEMU reported a shutdown, not by a destroy.
    with open(os.path.join(lab.host("h2").dir, "log", "qemu", f"{vm_name}.log")) as fh:
        assert "shutting down, reason=shutdown" in fh.read()


def test_cli_drives_the_lab_from_another_process(lab: Lab, vm_name: str) -> None:
    env = {**os.environ, "KVMHA_LAB_STATE_DIR": lab.spec.state_dir}

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "kvmha.lab.cli", *args], env=env, capture_output=True,
                              text=True, check=False, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    status = json.loads(cli("status", "--json"))
    assert [h["name"] for h in status["hosts"]] == ["h1", "h2", "h3"]
    for shown, host in zip(status["hosts"], lab.hosts, strict=True):
        assert shown["address"] == host.address
        assert shown["bmc"]["port"] == host.bmc_port
        assert shown["power"] == "on"
        assert shown["pids"]["libvirtd"] == lab.services(host.name)["libvirtd"]
    assert "Name" in cli("exec", "h1", "--", "virsh", "list", "--all")
    assert "faults now network" in cli("fail", "h1", "--network")
    assert lab.faults("h1") == ["network"]
    assert "healed network" in cli("heal", "h1")
    assert lab.faults("h1") == []
    cli("vm-create", vm_name, "--host", "h3")
    assert lab.domstate("h3", vm_name) == ("running", "booted")
    assert "powered off on h3" in cli("guest-shutdown", vm_name)
    assert lab.domstate("h3", vm_name) == ("shut off", "shutdown")
