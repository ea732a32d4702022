"""The "power supply" of a lab host: what its BMC starts on power on and signals on power off.

Power on: bring the host's network interface up, then start the host (the PID-namespace root, see
host.startcmd). Power off (SIGTERM from ipmi_sim): SIGKILL the host's PID-namespace root at once (every process of
the host dies with it, a pulled plug), then take the interface down. Without that last step the host's named
network namespace would outlive its processes and its address would still answer pings: a powered-off host that
neighbours can "reach" is not a powered-off host, and the manager (rightly) refuses to call it dead.

With `--watchdog DIR` the supply also carries the host's hardware watchdog (kvmha.lab.watchdog_device, issue 11):
when it expires, the supply resets the host as a board does: the host is killed at once, its interface goes down
for RESET_HOLD_S, then it boots again. The BMC still reads "on" throughout (a reset is not a power-off), and every
reset is recorded in DIR/resets.log.

Usage (as the BMC's startcmd): python -m kvmha.lab.power NETNS [--watchdog DIR] -- COMMAND...
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import FrameType

from kvmha.lab import proc
from kvmha.lab.watchdog_device import LabWatchdogDevice, record_reset

RESET_HOLD_S = 1.0


def _set_eth0(netns: str, state: str) -> None:
    # eth0: the lab network; eth1: the BMC network (kvmha.lab.bmcnet), absent in labs made without one.
    for interface in ("eth0", "eth1"):
        subprocess.run(["ip", "-n", netns, "link", "set", interface, state], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    watchdog_dir = None
    if len(args) > 2 and args[1] == "--watchdog":
        watchdog_dir, args = Path(args[2]), [args[0], *args[3:]]
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m kvmha.lab.power NETNS [--watchdog DIR] -- COMMAND...", file=sys.stderr)
        return 2
    netns, command = args[0], args[2:]
    powering_off = threading.Event()
    expired: list[str] = []  # why the watchdog fired (set by the device's thread)
    device = None
    if watchdog_dir is not None:
        device = LabWatchdogDevice(watchdog_dir, expired.append)
        device.start()
    _set_eth0(netns, "up")
    hosts = [subprocess.Popen(command)]

    def power_off(_signum: int, _frame: FrameType | None) -> None:
        powering_off.set()
        hosts[-1].kill()  # unshare --kill-child: its death takes the whole PID namespace

    signal.signal(signal.SIGTERM, power_off)
    signal.signal(signal.SIGINT, power_off)
    while True:
        code = _wait(hosts[-1], expired)
        if not expired or powering_off.is_set() or watchdog_dir is None or device is None:
            break
        # The watchdog fired: a reset. The host dies at once (as with power off) and boots again.
        why = expired.pop()
        members = _members(hosts[-1].pid)
        hosts[-1].kill()
        hosts[-1].wait()
        proc.wait_gone(members, 10.0)  # the kernel ends the namespace's processes after its init: wait for them
        _set_eth0(netns, "down")
        record_reset(watchdog_dir, why)
        print(f"kvmha.lab.power: {netns}: reset ({why})", file=sys.stderr, flush=True)
        device.reset()
        if powering_off.wait(RESET_HOLD_S):
            code = 0
            break
        _set_eth0(netns, "up")
        hosts.append(subprocess.Popen(command))
        if powering_off.is_set():  # a power off raced the boot: the handler may have killed the old host
            hosts[-1].kill()
    if device is not None:
        device.stop()
    _set_eth0(netns, "down")
    return code


def _members(root_pid: int) -> list[proc.ProcInfo]:
    """Every process of the host started as `root_pid` (unshare): its child is the PID namespace's init."""
    inits = [p for p in proc.descendants(root_pid) if p.ns_pid == 1]
    return proc.members(inits[0].pid) if inits else []


def _wait(host: subprocess.Popen[bytes], expired: list[str]) -> int:
    """Until the host ends (power off, or the init died) or its watchdog fires; the host's exit code, or 0."""
    while not expired:
        try:
            return host.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
    return 0


if __name__ == "__main__":
    sys.exit(main())
