"""CheckNeighbor probes: can this host reach host X, and how old is X's storage heartbeat.

All probes run at once in daemon threads and the answer is assembled at the deadline, whatever is still pending
(a hung NFS read or a slow DNS lookup must not make the manager's investigation wait: CloudStack's CheckOnHost
without timeouts stalled HA for minutes, apache/cloudstack#10477). A probe still running at the deadline counts as
"not reachable" / "heartbeat not found" and says so in `detail`.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvmha.agent.heartbeat import HeartbeatReading, read_heartbeat

T = TypeVar("T")


@dataclass(frozen=True)
class NeighborOutcome:
    tcp_reachable: bool
    icmp_checked: bool
    icmp_reachable: bool
    heartbeat: HeartbeatReading
    detail: str


def tcp_reachable(address: str, port: int, timeout_s: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True, f"tcp {address}:{port} connected"
    except OSError as exc:
        return False, f"tcp {address}:{port}: {exc.strerror or exc}"


def icmp_reachable(address: str, timeout_s: float) -> tuple[bool | None, str]:
    """(True/False, detail), or (None, why) when ICMP could not be tried at all."""
    ping = shutil.which("ping")
    if ping is not None:
        wait_s = max(1, int(timeout_s))
        try:
            proc = subprocess.run([ping, "-n", "-c1", f"-W{wait_s}", address], capture_output=True,
                                  timeout=timeout_s + 0.5, check=False)
        except subprocess.TimeoutExpired:
            return False, "icmp: ping timed out"
        except OSError as exc:
            return None, f"icmp: cannot run ping: {exc}"
        return proc.returncode == 0, f"icmp: ping exit {proc.returncode}"
    return _icmp_raw(address, timeout_s)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _icmp_raw(address: str, timeout_s: float) -> tuple[bool | None, str]:
    """One ICMP echo over a raw socket (root only): used when no `ping` binary is installed."""
    try:
        target = socket.getaddrinfo(address, None, socket.AF_INET)[0][4][0]
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError:
        return None, "icmp: no ping binary and no permission for a raw socket"
    except OSError as exc:
        return False, f"icmp: {exc}"
    ident, seq = os.getpid() & 0xFFFF, random.randrange(0x10000)
    header = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    payload = b"kvmha-neighbor"
    packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, seq) + payload
    deadline = time.monotonic() + timeout_s
    with sock:
        sock.sendto(packet, (str(target), 0))
        while (left_s := deadline - time.monotonic()) > 0:
            sock.settimeout(left_s)
            try:
                data, source = sock.recvfrom(1024)
            except TimeoutError:
                break
            offset = (data[0] & 0x0F) * 4
            kind, _, _, r_ident, r_seq = struct.unpack("!BBHHH", data[offset:offset + 8])
            if kind == 0 and r_ident == ident and r_seq == seq and source[0] == target:
                return True, "icmp: echo reply (raw socket)"
    return False, "icmp: no echo reply (raw socket)"


class _Probe(Generic[T]):
    """Runs `fn` in a daemon thread; `result(deadline)` gives its value, or None if it is still running."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), daemon=True, name="neighbor-probe").start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def result(self, deadline: float) -> tuple[T | None, str]:
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            return None, "still running at the deadline"
        if self._error is not None:
            return None, f"failed: {self._error!r}"
        return self._value, ""


def check_neighbor(host_uuid: str, address: str, port: int, timeout_s: float,
                   storage_paths: tuple[str, ...]) -> NeighborOutcome:
    """All probes at once; answers within `timeout_s` (plus scheduling noise) whatever the network does."""
    deadline = time.monotonic() + timeout_s
    # Probes get a little less than the whole budget so that their own timeouts fire before ours.
    probe_s = max(0.1, timeout_s * 0.9)
    tcp = _Probe(lambda: tcp_reachable(address, port, probe_s))
    icmp = _Probe(lambda: icmp_reachable(address, probe_s))
    hb = _Probe(lambda: read_heartbeat(storage_paths, host_uuid, time.time()))
    details: list[str] = []
    tcp_value, why = tcp.result(deadline)
    tcp_ok = bool(tcp_value and tcp_value[0])
    details.append(tcp_value[1] if tcp_value else f"tcp: {why}")
    icmp_value, why = icmp.result(deadline)
    icmp_checked = icmp_value is not None and icmp_value[0] is not None
    icmp_ok = bool(icmp_value and icmp_value[0])
    details.append(icmp_value[1] if icmp_value else f"icmp: {why}")
    reading, why = hb.result(deadline)
    if reading is None:
        reading = HeartbeatReading(False, error=f"heartbeat read {why}")
    if reading.found:
        details.append(f"heartbeat {reading.path} age {reading.age_s:.1f}s")
    else:
        error = f": {reading.error}" if reading.error else ""
        details.append(f"heartbeat not found on {list(storage_paths)}{error}")
    return NeighborOutcome(tcp_ok, icmp_checked, icmp_ok, reading, "; ".join(details))
