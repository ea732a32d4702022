"""Fault injection into one lab host, and healing. Each fault is what it would be on real hardware:

- power:    chassis power off through the host's BMC (IPMI); the whole host dies at once, as if unplugged.
- network:  the bridge side of the host's veth goes down: the manager and the neighbours lose the host, while
            the host itself (libvirtd, its VMs, its storage) keeps running.
- storage:  in the host's mount namespace only, a read-only empty tmpfs covers the shared storage: every new
            open or write by path fails (heartbeats, leases, new VM starts). Files already open stay open (a
            running QEMU keeps its disk), which a kernel-level fault cannot take from it without killing it.
- agent:    SIGKILL to the kvmha agent alone (by PID); everything else keeps running.
- libvirtd: SIGKILL to libvirtd alone (by PID); its VMs keep running (QEMU does not depend on libvirtd).
- bmc:      the host's ipmi_sim is stopped (SIGSTOP): IPMI requests time out, the host runs on. Before `power`,
            it is a host that lost power together with its BMC: nobody can confirm it is off (the power then goes
            as a pulled plug: the lab signals the host's power supply itself, since the hung BMC cannot). In the
            other order the BMC may answer "off" in between, and a manager that asks at once rightly hears it.
- agent-freeze, libvirtd-hang: SIGSTOP to the agent / libvirtd (a hung process, not a dead one); heal: SIGCONT.
- watchdog: SIGKILL to kvmha-watchdog (labs with a watchdog per host): its device stays armed and, unless healed
            in time (and even then: a restarted daemon refuses an armed device), resets the host.

`heal` undoes whichever of them are present; the state is read from the machine, not remembered.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kvmha.lab import net, proc
from kvmha.lab.state import AGENT, WATCHDOG, LabError

if TYPE_CHECKING:
    from kvmha.lab.lab import Lab

Fault = Literal["power", "network", "storage", "agent", "libvirtd", "bmc", "agent-freeze", "libvirtd-hang",
                "watchdog"]
FAULTS: tuple[Fault, ...] = ("power", "network", "storage", "agent", "libvirtd", "bmc", "agent-freeze",
                             "libvirtd-hang", "watchdog")
STORAGE_CUT_SOURCE = "kvmha-storage-cut"
HEAL_TIMEOUT_S = 60.0
PLUG_TIMEOUT_S = 15.0
# A missing service is reported under the name of the fault that kills it; virtlogd/virtlockd have none ("-down").
_SERVICE_FAULTS = {AGENT: "agent", "libvirtd": "libvirtd", WATCHDOG: "watchdog"}
_FREEZE_FAULTS = {AGENT: "agent-freeze", "libvirtd": "libvirtd-hang"}  # a stopped (SIGSTOP) service


def storage_cut(lab: Lab, name: str) -> bool:
    """True when the host's view of the shared storage is covered by the lab's read-only tmpfs."""
    init = lab.init(name)
    if init is None:
        return False
    try:
        lines = Path(f"/proc/{init.pid}/mountinfo").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        # mountinfo: ... mount point is field 5; after the " - " separator come fs type and source.
        after = line.split(" - ", 1)[1].split() if " - " in line else []
        if fields[4] == lab.spec.shared_dir and len(after) > 1 and after[1] == STORAGE_CUT_SOURCE:
            return True
    return False


def bmc_stopped(lab: Lab, name: str) -> bool:
    ref = lab.spec.bmcs.get(name)
    return ref is not None and proc.alive(ref.pid, ref.start_ticks) and proc.stopped(ref.pid)


def set_bmc_running(lab: Lab, name: str, running: bool) -> None:
    """SIGSTOP / SIGCONT the host's ipmi_sim (by PID): a BMC that hangs, and one that answers again."""
    ref = lab.spec.bmcs.get(name)
    if ref is None or not proc.alive(ref.pid, ref.start_ticks):
        raise LabError(f"{name}: no BMC process")
    proc.kill(ref.pid, ref.start_ticks, signal.SIGCONT if running else signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    while proc.stopped(ref.pid) == running and time.monotonic() < deadline:
        time.sleep(0.02)


def faults(lab: Lab, name: str) -> list[str]:
    """The faults present on the host right now, read from the machine."""
    host = lab.host(name)
    found: list[str] = ["bmc"] if bmc_stopped(lab, name) else []
    if lab.init(name) is None:
        found.append("power")
    if not net.link_is_up(host.veth):
        found.append("network")
    if "power" in found:
        return found
    if storage_cut(lab, name):
        found.append("storage")
    running = lab.services(name)
    found += [_SERVICE_FAULTS.get(s, f"{s}-down") for s in lab.expected_services() if s not in running]
    found += [fault for s, fault in _FREEZE_FAULTS.items() if s in running and proc.stopped(running[s])]
    return found


def fail(lab: Lab, name: str, fault: Fault) -> None:
    host = lab.host(name)
    if fault == "power":
        if bmc_stopped(lab, name):
            _pull_plug(lab, name)
        else:
            lab.power(name, "off")
    elif fault == "network":
        net.set_link(host.veth, up=False)
    elif fault == "storage":
        if not storage_cut(lab, name):
            lab.exec(name, ["mount", "-t", "tmpfs", "-o", "ro,size=64k", STORAGE_CUT_SOURCE, lab.spec.shared_dir])
    elif fault in ("agent", "libvirtd"):
        comm = AGENT if fault == "agent" else "libvirtd"
        if fault == "agent" and not lab.spec.manager:
            raise LabError("this lab runs no agents (it was made without --manager)")
        victims = [p for p in lab.processes(name) if p.comm == comm]
        if not victims:
            raise LabError(f"{name}: no {comm} running")
        for victim in victims:
            proc.kill(victim.pid, victim.start_ticks, signal.SIGKILL)
        if proc.wait_gone(victims, 10.0):
            raise LabError(f"{name}: {comm} survived SIGKILL")
    elif fault == "bmc":
        set_bmc_running(lab, name, running=False)
    elif fault in ("agent-freeze", "libvirtd-hang"):
        _freeze(lab, name, AGENT if fault == "agent-freeze" else "libvirtd")
    elif fault == "watchdog":
        victims = [p for p in lab.processes(name) if p.comm == WATCHDOG]
        if not victims:
            raise LabError(f"{name}: no {WATCHDOG} running (a lab made without a watchdog?)")
        for victim in victims:
            proc.kill(victim.pid, victim.start_ticks, signal.SIGKILL)
        if proc.wait_gone(victims, 10.0):
            raise LabError(f"{name}: {WATCHDOG} survived SIGKILL")
    else:
        raise LabError(f"unknown fault {fault!r} (one of {', '.join(FAULTS)})")


def _pull_plug(lab: Lab, name: str) -> None:
    """Power off without the BMC (it hangs): SIGTERM to the host's power supply (kvmha.lab.power, the BMC's child
    and the PID-namespace root's ancestor), which kills the host and takes its interfaces down as on a BMC power-off.
    The stopped BMC reads "off" only once it runs again."""
    init = lab.init(name)
    if init is None:
        return  # already off
    members = lab.processes(name)
    supply = proc.info(init.ppid)
    while supply is not None and "kvmha.lab.power" not in proc.cmdline(supply.pid):
        supply = proc.info(supply.ppid) if supply.ppid > 1 else None
    if supply is None:
        raise LabError(f"{name}: no power supply process above the host's init (pid {init.pid})")
    proc.kill(supply.pid, supply.start_ticks, signal.SIGTERM)
    # The host's processes die first, then the supply takes the interfaces down and exits (a zombie until the
    # stopped BMC reaps it).
    left = proc.wait_gone([*members, supply], PLUG_TIMEOUT_S)
    if left:
        raise LabError(f"{name}: pulling the plug did not end the host (left: {[p.pid for p in left]})")


def _freeze(lab: Lab, name: str, comm: str) -> None:
    victims = [p for p in lab.processes(name) if p.comm == comm]
    if not victims:
        raise LabError(f"{name}: no {comm} running")
    for victim in victims:
        proc.kill(victim.pid, victim.start_ticks, signal.SIGSTOP)
    deadline = time.monotonic() + 5.0
    while not all(proc.stopped(v.pid) for v in victims) and time.monotonic() < deadline:
        time.sleep(0.02)


def heal(lab: Lab, name: str) -> list[str]:
    """Undo every fault present on the host; returns what was healed."""
    host = lab.host(name)
    present = faults(lab, name)
    if "bmc" in present:
        set_bmc_running(lab, name, running=True)  # first: powering on needs the BMC
    if not net.link_is_up(host.veth):
        net.set_link(host.veth, up=True)
    if "power" in present:
        lab.power(name, "on")  # a fresh boot: no storage cut, every service started
        return present
    while storage_cut(lab, name):  # covered twice is still one fault
        lab.exec(name, ["umount", lab.spec.shared_dir])
    for comm, fault in _FREEZE_FAULTS.items():
        if fault in present:
            for victim in [p for p in lab.processes(name) if p.comm == comm]:
                proc.kill(victim.pid, victim.start_ticks, signal.SIGCONT)
    if set(present) - {"bmc", "network", "storage", *_FREEZE_FAULTS.values()}:  # a service is not running
        init = lab.init(name)
        assert init is not None
        # The host's init starts again the services that are not running.
        proc.kill(init.pid, init.start_ticks, signal.SIGHUP)
        lab.wait_ready(name, HEAL_TIMEOUT_S)
    deadline = time.monotonic() + HEAL_TIMEOUT_S
    while faults(lab, name) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = faults(lab, name)
    if left:
        raise LabError(f"{name}: still faulty after heal: {left}")
    return present
