"""`down` (and a failed `up`) leave the machine as it was: namespaces, links, mounts, processes, folders."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmha.lab import Lab, LabError, proc
from kvmha.lab.wait import wait_for

from .conftest import TEST_PREFIX, TEST_SUBNET, caps_cache

pytestmark = [pytest.mark.lab, pytest.mark.slow]



def processes_of(state_dir: Path) -> list[str]:
    """Every process on the machine that belongs to a lab in state_dir: its command line names the state dir
    (ipmi_sim, unshare, the hosts' init, the keeper) or it lives in a mount namespace that binds the host folders
    from there (virtlogd, virtlockd, libvirtd, QEMU, the agent). Other people's processes match neither."""
    found = []
    for pid in proc.all_pids():
        if pid == os.getpid():
            continue
        try:
            mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        info = proc.info(pid)
        if info is None or info.zombie:
            continue
        if str(state_dir) in " ".join(proc.cmdline(pid)) or str(state_dir) in mountinfo:
            found.append(f"{pid} {info.comm}")
    return found


@dataclass(frozen=True)
class MachineState:
    netns: tuple[str, ...]
    links: tuple[str, ...]
    mounts: tuple[str, ...]
    run_dirs: tuple[str, ...]

    @staticmethod
    def now() -> MachineState:
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return MachineState(
            netns=tuple(sorted(netns.split())),
            links=tuple(sorted(os.listdir("/sys/class/net"))),
            mounts=tuple(sorted(Path("/proc/mounts").read_text().splitlines())),
            run_dirs=tuple(sorted(p for p in ("/run/libvirt", "/run/netns") if os.path.exists(p))),
        )


def lab_processes_alive(seen: set[tuple[int, int]]) -> list[int]:
    return [pid for pid, ticks in seen if proc.alive(pid, ticks)]


def remember(lab: Lab, seen: set[tuple[int, int]]) -> None:
    """Every process the lab is made of right now: BMCs, and each host's whole PID namespace."""
    for ref in lab.spec.bmcs.values():
        seen.add((ref.pid, ref.start_ticks))
        seen.update((p.pid, p.start_ticks) for p in proc.descendants(ref.pid))
    for host in lab.hosts:
        seen.update((p.pid, p.start_ticks) for p in lab.processes(host.name))


def test_down_leaves_the_machine_as_it_was(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    before = MachineState.now()
    seen: set[tuple[int, int]] = set()
    lab = Lab.up(2, state_dir=tmp_path / "state", prefix=TEST_PREFIX, subnet=TEST_SUBNET,
                 cache_dir=caps_cache(tmp_path_factory))
    try:
        # Leave it in the messiest state it can be in: VMs running, every kind of fault present.
        lab.vm_create("vm-a", "h1")
        lab.vm_create("vm-b", "h2")
        remember(lab, seen)
        assert len(processes_of(tmp_path)) >= 10
        assert sum(1 for pid, _ in seen if (info := proc.info(pid)) and info.comm == "qemu-system-x86") == 2
        lab.fail("h1", "network")
        lab.fail("h1", "storage")
        lab.fail("h2", "libvirtd")
        # And a BMC that died under a running host: the host must still be found and ended.
        bmc = lab.spec.bmcs["h2"]
        proc.kill(bmc.pid, bmc.start_ticks, signal.SIGKILL)
        wait_for(lambda: not proc.alive(bmc.pid, bmc.start_ticks), 15, "the killed BMC gone", 0.1)
        assert lab.init("h2") is not None
        assert MachineState.now() != before
    finally:
        lab.down()
    assert MachineState.now() == before
    assert lab_processes_alive(seen) == []
    assert processes_of(tmp_path) == []
    assert not (tmp_path / "state").exists()


def test_failed_up_undoes_what_it_made(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = MachineState.now()
    seen: set[tuple[int, int]] = set()
    real_wait_ready = Lab.wait_ready

    def h2_never_boots(lab: Lab, name: str, timeout_s: float = 0) -> None:
        real_wait_ready(lab, name)
        if name == "h2":  # h1 and h2 are up by now, with their BMCs, namespaces and daemons
            remember(lab, seen)
            raise LabError("h2 did not boot (simulated)")

    monkeypatch.setattr(Lab, "wait_ready", h2_never_boots)
    with pytest.raises(LabError, match="simulated"):
        Lab.up(3, state_dir=tmp_path / "state", prefix=TEST_PREFIX, subnet=TEST_SUBNET,
               cache_dir=caps_cache(tmp_path_factory))
    assert len(seen) >= 10
    assert lab_processes_alive(seen) == []
    assert processes_of(tmp_path) == []
    assert MachineState.now() == before
    # A subnet too small for the hosts is refused before anything is made.
    with pytest.raises(LabError, match="does not fit"):
        Lab.up(5, state_dir=tmp_path / "state", prefix=TEST_PREFIX, subnet="10.251.0.224/28")
    assert MachineState.now() == before


def test_cli_up_and_down_from_separate_processes(tmp_path: Path) -> None:
    before = MachineState.now()
    state_dir = tmp_path / "state"
    env = {**os.environ, "KVMHA_LAB_STATE_DIR": str(state_dir)}
    cli = [sys.executable, "-m", "kvmha.lab.cli"]
    up = subprocess.run([*cli, "up", "--hosts", "1", "--prefix", TEST_PREFIX, "--subnet", TEST_SUBNET],
                        env=env, capture_output=True, text=True, timeout=240, check=False)  # fmt: skip
    seen: set[tuple[int, int]] = set()
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        lab = Lab.attach(state_dir)
        assert lab.spec.keeper is not None
        seen.add((lab.spec.keeper.pid, lab.spec.keeper.start_ticks))
        remember(lab, seen)
        status = json.loads(subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True,
                                           check=True).stdout)  # fmt: skip
        assert status["hosts"][0]["power"] == "on"
        power = subprocess.run([*cli, "power", "h1", "off"], env=env, capture_output=True, text=True, check=False)
        assert power.returncode == 0 and "power off" in power.stdout, power.stderr
        assert Lab.attach(state_dir).init("h1") is None
    finally:
        down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    wait_for(lambda: lab_processes_alive(seen) == [], 10, f"every lab process gone (of {len(seen)} seen)", 0.1)
    assert processes_of(tmp_path) == []
    assert MachineState.now() == before
    assert not state_dir.exists()
    assert not (tmp_path / "state.keeper.log").exists()
