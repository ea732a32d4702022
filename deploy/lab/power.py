"""The "power supply" of a lab host: what its BMC starts on power on and signals on power off.

Power on: bring the host's network interface up, then start the host (the PID-namespace root, see
host.startcmd). Power off (SIGTERM from ipmi_sim): SIGKILL the host's PID-namespace root at once (every process of
the host dies with it, a pulled plug), then take the interface down. Without that last step the host's named
network namespace would outlive its processes and its address would still answer pings: a powered-off host that
neighbours can "reach" is not a powered-off host, and the manager (rightly) refuses to call it dead.

Usage (as the BMC's startcmd): python -m kvmha.lab.power NETNS -- COMMAND...
"""

from __future__ import annotations

import signal
import subprocess
import sys
from types import FrameType


def _set_eth0(netns: str, state: str) -> None:
    subprocess.run(["ip", "-n", netns, "link", "set", "eth0", state], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m kvmha.lab.power NETNS -- COMMAND...", file=sys.stderr)
        return 2
    netns, command = args[0], args[2:]
    _set_eth0(netns, "up")
    host = subprocess.Popen(command)

    def power_off(_signum: int, _frame: FrameType | None) -> None:
        host.kill()  # unshare --kill-child: its death takes the whole PID namespace

    signal.signal(signal.SIGTERM, power_off)
    signal.signal(signal.SIGINT, power_off)
    code = host.wait()
    _set_eth0(netns, "down")
    return code


if __name__ == "__main__":
    sys.exit(main())
