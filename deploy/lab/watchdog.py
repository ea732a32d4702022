"""A hardware watchdog per lab host (issue 11): what a lab made with `watchdog_device_timeout_s` adds to its hosts,
and the helpers tests use to watch it.

- The power supply (kvmha.lab.power --watchdog DIR) serves the host's watchdog timer on DIR/device.sock and resets
  the host when it expires: killed at once, booted again, recorded in DIR/resets.log (kvmha.lab.watchdog_device).
- Inside the host, the init starts `kvmha-watchdog --device unix:DIR/device.sock` before the agent, with its socket
  and "active" marker on a tmpfs mounted at every boot over <host dir>/run (a reboot clears the marker, as /run on
  a real host). It runs with KVMHA_WATCHDOG_NO_KERNEL_DEVICE=1: a misconfigured lab can never open the machine's
  own /dev/watchdog.
- The agent's [watchdog] section points at that socket; its timeout is twice the device's unless an agent setting
  `watchdog.timeout_s` says otherwise. Labs without a watchdog write `enabled = false`.

"systemd restarts the agent" is modelled by `crash_agent(..., restart_after_s=...)`: SIGKILL, then after the delay
a SIGHUP to the host's init, which starts the services that are not running (as `heal` does).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmha.lab import proc
from kvmha.lab.boot import Service
from kvmha.lab.state import AGENT, WATCHDOG, HostSpec, LabError, LabSpec
from kvmha.lab.watchdog_device import SOCKET_NAME, read_resets, read_status

if TYPE_CHECKING:
    from kvmha.lab.lab import Lab

WATCHDOG_DIR = "watchdog"
RUN_DIR = "run"
DAEMON_SOCKET = "kvmha-watchdog.sock"
DAEMON_MARKER = "kvmha-watchdog.active"


def enabled(lab: LabSpec) -> bool:
    return lab.watchdog_device_timeout_s > 0 and bool(lab.manager)


def device_dir(lab: LabSpec, host: HostSpec) -> Path:
    return Path(host.dir) / WATCHDOG_DIR


def daemon_socket(host: HostSpec) -> str:
    """The daemon's socket, as a path inside the host (under the per-boot tmpfs)."""
    return str(Path(host.dir) / RUN_DIR / DAEMON_SOCKET)


def agent_timeout_s(lab: LabSpec) -> float:
    return 2.0 * lab.watchdog_device_timeout_s


# ----- what the lab's hosts get ----------------------------------------------------------------------------------


def prepare(lab: LabSpec, host: HostSpec) -> None:
    if enabled(lab):
        device_dir(lab, host).mkdir(parents=True, exist_ok=True)
        (Path(host.dir) / RUN_DIR).mkdir(exist_ok=True)


def tmpfs(lab: LabSpec, host: HostSpec) -> list[str]:
    return [str(Path(host.dir) / RUN_DIR)] if enabled(lab) else []


def power_args(lab: LabSpec, host: HostSpec) -> list[str]:
    return ["--watchdog", str(device_dir(lab, host))] if enabled(lab) else []


def services(lab: LabSpec, host: HostSpec) -> list[Service]:
    if not enabled(lab):
        return []
    from kvmha.lab.host import agent_executable  # the venv's console scripts sit side by side

    run = Path(host.dir) / RUN_DIR
    timeout_s = lab.watchdog_device_timeout_s
    argv = ["env", "KVMHA_WATCHDOG_NO_KERNEL_DEVICE=1", str(agent_executable().with_name(WATCHDOG)),
            "--device", f"unix:{device_dir(lab, host) / SOCKET_NAME}", "--device-timeout-s", str(timeout_s),
            "--socket", str(run / DAEMON_SOCKET), "--active-marker", str(run / DAEMON_MARKER),
            "--pet-interval-s", str(min(1.0, timeout_s / 4))]
    return [Service(WATCHDOG, argv, str(run / DAEMON_SOCKET))]


def agent_section(lab: LabSpec, host: HostSpec) -> dict[str, object]:
    if not enabled(lab):
        return {"enabled": False}
    return {"enabled": True, "socket": daemon_socket(host), "timeout_s": agent_timeout_s(lab)}


# ----- watching and poking it (tests, `kvmha-lab status`) ---------------------------------------------------------


def resets(lab: Lab, name: str) -> list[dict[str, Any]]:
    """Every reset of the host by its watchdog, oldest first: {"at": epoch seconds, "why": ...}."""
    return read_resets(device_dir(lab.spec, lab.host(name)))


def device_state(lab: Lab, name: str) -> dict[str, object]:
    """The hardware timer: running, timeout_s, open, fired, fires_in_s (as of its last change)."""
    return read_status(device_dir(lab.spec, lab.host(name)))


def daemon_status(lab: Lab, name: str) -> dict[str, Any]:
    """kvmha-watchdog's own view (its clients and whether it pets), asked through the host's root."""
    init = lab.init(name)
    if init is None:
        raise LabError(f"{name} is powered off")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(3.0)
        sock.connect(f"/proc/{init.pid}/root{daemon_socket(lab.host(name))}")
        sock.sendall(b'{"op":"status"}\n')
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status: dict[str, Any] = json.loads(data)["status"]
    return status


def crash_agent(lab: Lab, name: str, restart_after_s: float | None = None) -> None:
    """SIGKILL the agent; with `restart_after_s`, start it again that much later through the host's init (what
    systemd's Restart=always with RestartSec does)."""
    victims = [p for p in lab.processes(name) if p.comm == AGENT]
    if not victims:
        raise LabError(f"{name}: no {AGENT} running")
    for victim in victims:
        proc.kill(victim.pid, victim.start_ticks, signal.SIGKILL)
    if proc.wait_gone(victims, 10.0):
        raise LabError(f"{name}: {AGENT} survived SIGKILL")
    if restart_after_s is None:
        return
    time.sleep(restart_after_s)
    init = lab.init(name)
    if init is None:
        raise LabError(f"{name} went down before its agent could be restarted")
    proc.kill(init.pid, init.start_ticks, signal.SIGHUP)


def stop_agent(lab: Lab, name: str, timeout_s: float = 20.0) -> None:
    """SIGTERM the agent (a planned stop: Goodbye, then the clean disarm) and wait until it has exited."""
    victims = [p for p in lab.processes(name) if p.comm == AGENT]
    for victim in victims:
        proc.kill(victim.pid, victim.start_ticks, signal.SIGTERM)
    if proc.wait_gone(victims, timeout_s):
        raise LabError(f"{name}: {AGENT} did not stop on SIGTERM")


def wait_reset(lab: Lab, name: str, after: float, timeout_s: float) -> dict[str, Any] | None:
    """The first reset of the host recorded at or after `after` (epoch seconds), waiting up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in resets(lab, name) if float(r["at"]) >= after]
        if found:
            return found[0]
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
