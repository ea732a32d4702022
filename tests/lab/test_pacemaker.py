"""The peer stack (`--stack pacemaker`): a small Pacemaker cluster forms in the lab's hosts, runs a VirtualDomain,
fences through the BMC network, and `down` leaves the machine as it was. The long series: bench/peer_failover.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kvmha.lab import Lab, pacemaker, proc
from kvmha.lab.harness import DuplicateWatch
from kvmha.lab.wait import wait_for

from .conftest import TEST_PREFIX, TEST_SUBNET, caps_cache
from .test_cleanup import MachineState, lab_processes_alive, processes_of, remember

pytestmark = [pytest.mark.lab, pytest.mark.slow,
              pytest.mark.skipif(any(shutil.which(b) is None for b in pacemaker.NEEDED),
                                 reason="Debian's pacemaker, corosync and fence-agents are not installed")]


def cluster_daemons_in_root_namespace() -> list[str]:
    """corosync/pacemaker processes running in the machine's own PID namespace (there must never be any)."""
    own = proc.pid_ns(os.getpid())
    names = ("corosync", "pacemakerd", "pacemaker-based", "pacemaker-fence", "pacemaker-contr")
    return [f"{p.pid} {p.comm}" for pid in proc.all_pids()
            if (p := proc.info(pid)) is not None and p.comm in names and proc.pid_ns(pid) == own]


def test_pacemaker_cluster_forms_runs_a_virtual_domain_fences_and_leaves_nothing(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert cluster_daemons_in_root_namespace() == []
    before = MachineState.now()
    seen: set[tuple[int, int]] = set()
    lab = Lab.up(2, state_dir=tmp_path / "state", prefix=TEST_PREFIX, subnet=TEST_SUBNET, stack="pacemaker",
                 stack_profile="tuned", cache_dir=caps_cache(tmp_path_factory))
    try:
        view = pacemaker.view(lab, "h1")
        assert set(view.online) == {"h1", "h2"} and view.dc in ("h1", "h2") and view.quorate
        # One fence device per node, running on the other node (it may not fence itself).
        assert view.resources["fence-h1"] == ["h2"] and view.resources["fence-h2"] == ["h1"], view
        for host in lab.hosts:
            assert set(lab.services(host.name)) >= {"libvirtd", "virtlockd", "corosync", "pacemakerd"}
        remember(lab, seen)
        assert cluster_daemons_in_root_namespace() == []

        pacemaker.add_vm(lab, "pvm")
        pacemaker.wait_settled(lab)
        [first] = lab.vm_hosts("pvm")  # from /proc: exactly one QEMU for it, in that host
        assert lab.domstate(first, "pvm") == ("running", "booted")
        assert pacemaker.view(lab, first).resources["pvm"] == [first]

        with DuplicateWatch(lab) as watch:
            # A crashed QEMU: the VirtualDomain monitor notices, Pacemaker restarts it (in place).
            old_pid = lab.running_vms()[first]["pvm"]
            lab.vm_kill("pvm")
            wait_for(lambda: any(vms.get("pvm", old_pid) != old_pid for vms in lab.running_vms().values()), 60,
                     "a new QEMU for pvm")
            pacemaker.wait_settled(lab)
            # Its host loses power: the other node fences it through fence_ipmilan over the BMC network, then
            # starts the VM.
            other = "h2" if first == "h1" else "h1"
            host_now = lab.vm_hosts("pvm")[0]
            lab.power(host_now, "off")
            survivor = other if host_now == first else first
            # A QEMU exists a moment before its CPUs run ("paused, starting up"): running is what virsh says.
            wait_for(lambda: lab.vm_hosts("pvm") == [survivor]
                     and lab.domstate(survivor, "pvm") == ("running", "booted"), 90, f"pvm running on {survivor} only")
        assert watch.samples > 10 and watch.duplicates == []
        history = lab.exec(survivor, ["stonith_admin", "--history", host_now]).stdout
        assert f"off of {host_now} successful" in history or f"reboot of {host_now} successful" in history, history
        remember(lab, seen)
    finally:
        lab.down()
    assert MachineState.now() == before
    wait_for(lambda: lab_processes_alive(seen) == [], 10, "every process of the lab gone", 0.1)
    assert processes_of(tmp_path) == []
    assert cluster_daemons_in_root_namespace() == []
    assert not (tmp_path / "state").exists()
