"""Power through the BMC (IPMI) and disk leases (virtlockd), on a lab of their own: these tests power hosts off."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmha.lab import Lab, proc
from kvmha.lab.bmc import BmcError
from kvmha.lab.fault import Fault
from kvmha.lab.wait import wait_for

from .conftest import heal_all, make_lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]


@pytest.fixture(scope="module")
def power_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with make_lab(tmp_path_factory, 2) as lab:
        yield lab


@pytest.fixture
def lab(power_lab: Lab) -> Iterator[Lab]:
    yield power_lab
    heal_all(power_lab)


def test_power_off_ends_every_process_of_the_host_and_power_on_resurrects_no_vm(lab: Lab) -> None:
    lab.vm_create("vm-power", "h1")
    before = lab.processes("h1")
    comms = {p.comm for p in before}
    assert {"virtlogd", "virtlockd", "libvirtd", "qemu-system-x86"} <= comms
    h2_before = lab.processes("h2")

    lab.power("h1", "off", wait=False)  # chassis power off through ipmitool, nothing else
    wait_for(lambda: not any(proc.alive(p.pid, p.start_ticks) for p in before), 10, "every process of h1 gone", 0.1)
    # The host's processes die first; the power supply then takes its network down and exits, and only then does
    # the BMC read off (a CI run read "on" right after the last process was gone).
    wait_for(lambda: lab.power_state("h1") == "off", 10, "h1's BMC reads off", 0.2)
    assert lab.init("h1") is None
    # The neighbour did not notice anything.
    assert all(proc.alive(p.pid, p.start_ticks) for p in h2_before)
    # A powered-off host is gone from the network too: its neighbour's ping gets no answer (a named network
    # namespace would otherwise keep answering for a host with no processes left).
    h1_address = lab.host("h1").address
    ping = ["ping", "-n", "-c1", "-W1", h1_address]
    wait_for(lambda: lab.exec("h2", ping, check=False).returncode != 0, 5, "h1 no longer answering pings", 0.1)

    lab.power("h1", "on")
    assert lab.exec("h2", ping, check=False).returncode == 0  # back on the network with its power
    after = lab.processes("h1")
    assert lab.power_state("h1") == "on"
    assert "libvirtd" in lab.services("h1")
    # The domain is still defined (the host's disk kept it) but nothing started it again.
    assert lab.domstate("h1", "vm-power")[0] == "shut off"
    assert lab.vm_hosts("vm-power") == []
    assert "qemu-system-x86" not in {p.comm for p in after}


def _lease_holders(lab: Lab) -> dict[str, str]:
    """Lease file name -> host whose virtlockd holds a POSIX lock on it (read from /proc/locks)."""
    leases = Path(lab.spec.shared_dir) / "leases"
    by_inode = {f.stat().st_ino: f.name for f in leases.iterdir()}
    virtlockd = {lab.services(h.name).get("virtlockd"): h.name for h in lab.hosts}
    holders = {}
    for line in Path("/proc/locks").read_text().splitlines():
        match = re.search(r"POSIX\s+ADVISORY\s+WRITE\s+(\d+)\s+[0-9a-f]+:[0-9a-f]+:(\d+)", line)
        if match and int(match.group(2)) in by_inode and int(match.group(1)) in virtlockd:
            holders[by_inode[int(match.group(2))]] = virtlockd[int(match.group(1))]
    return holders


def test_virtlockd_refuses_a_second_start_and_a_dead_host_releases_the_lease(lab: Lab) -> None:
    lab.vm_create("vm-lease", "h1")
    lab.vm_define("vm-lease", "h2")  # the same VM (name, UUID, disk) as a manager would define it elsewhere
    assert set(_lease_holders(lab).values()) == {"h1"}

    refused = lab.exec("h2", ["virsh", "-c", "qemu:///system", "start", "vm-lease"], check=False)
    assert refused.returncode != 0
    # Refused by the lock manager (virtlockd), not by QEMU's own image locking.
    assert "resource busy: Lockspace resource" in refused.stderr and "is locked" in refused.stderr, refused.stderr
    assert lab.vm_hosts("vm-lease") == ["h1"]
    assert lab.domstate("h2", "vm-lease")[0] == "shut off"

    lab.power("h1", "off")  # the host dies with its virtlockd: the kernel drops its locks
    lab.virsh("h2", "start", "vm-lease")
    assert lab.domstate("h2", "vm-lease") == ("running", "booted")
    assert lab.vm_hosts("vm-lease") == ["h2"]
    assert set(_lease_holders(lab).values()) == {"h2"}

    # And the lease now protects the VM from the host that comes back.
    lab.power("h1", "on")
    again = lab.exec("h1", ["virsh", "-c", "qemu:///system", "start", "vm-lease"], check=False)
    assert again.returncode != 0 and "is locked" in again.stderr
    assert lab.vm_hosts("vm-lease") == ["h2"]


def test_a_hung_bmc_leaves_the_host_running_and_unconfirmable(lab: Lab) -> None:
    libvirtd = lab.services("h2")["libvirtd"]
    lab.fail("h2", "bmc")
    assert lab.faults("h2") == ["bmc"]
    with pytest.raises(BmcError):
        lab.power_state("h2")  # IPMI times out: nobody can say whether h2 is on
    assert lab.services("h2")["libvirtd"] == libvirtd and lab.virsh("h2", "list") is not None
    assert lab.heal("h2") == ["bmc"]
    assert lab.power_state("h2") == "on"


@pytest.mark.parametrize("order", [("power", "bmc"), ("bmc", "power")], ids=["power-first", "bmc-first"])
def test_power_lost_together_with_the_bmc(lab: Lab, order: tuple[Fault, Fault]) -> None:
    """Either order ends in a dead host whose BMC hangs; BMC first pulls the plug without it (nobody could have
    read "off" in between)."""
    for fault in order:
        lab.fail("h2", fault)
    assert lab.faults("h2") == ["bmc", "power"]
    assert lab.init("h2") is None and not lab.processes("h2")
    with pytest.raises(BmcError):
        lab.power_state("h2")
    assert lab.heal("h2") == ["bmc", "power"]
    assert lab.power_state("h2") == "on" and "libvirtd" in lab.services("h2")
