"""Processes seen through /proc: who lives in which PID namespace, and how to end only our own, by PID.

A lab host is one PID namespace. Its root ("init", PID 1 inside) is the process the host's BMC started, so the
host's processes are exactly the processes whose PID namespace is init's. PIDs are always the root namespace's
numbers here; the last NSpid entry is the number inside the host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    start_ticks: int  # start time since boot, in clock ticks: with the PID it names one process, not a reused PID
    ns_pid: int  # the PID inside the process's own (innermost) PID namespace
    zombie: bool = False  # ended, not yet reaped by its parent


def _read_status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (PROC / str(pid) / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat; None when the process is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields after it start after the last ')'.
    return int(stat.rpartition(")")[2].split()[19])


def started_at(pid: int) -> float | None:
    """When the process started, in wall-clock seconds (time.time()), to the clock tick: its age from
    /proc/uptime and its start in ticks since boot (btime has whole seconds only). None when it is gone."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    now = time.time()
    uptime_s = float((PROC / "uptime").read_text().split()[0])
    return now - (uptime_s - ticks / os.sysconf("SC_CLK_TCK"))


def info(pid: int) -> ProcInfo | None:
    try:
        status = _read_status(pid)
    except OSError:
        return None
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    ns_pids = status.get("NSpid", str(pid)).split()
    zombie = status.get("State", "").startswith("Z")
    return ProcInfo(pid, int(status["PPid"]), status["Name"], ticks, int(ns_pids[-1]), zombie)


def all_pids() -> Iterator[int]:
    for entry in os.scandir(PROC):
        if entry.name.isdigit():
            yield int(entry.name)


def pid_ns(pid: int) -> int | None:
    """Inode of the process's PID namespace; None when the process is gone."""
    try:
        return os.stat(PROC / str(pid) / "ns" / "pid").st_ino
    except OSError:
        return None


def cmdline(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def members(init_pid: int) -> list[ProcInfo]:
    """Every live process in init's PID namespace (init included; zombies left out): the whole lab host."""
    ns = pid_ns(init_pid)
    if ns is None:
        return []
    out = []
    for pid in all_pids():
        if pid_ns(pid) == ns:
            found = info(pid)
            if found is not None and not found.zombie:
                out.append(found)
    return out


def descendants(root_pid: int) -> list[ProcInfo]:
    """Children, grandchildren, ... of root_pid (by PPid; /proc/PID/task/*/children is not always built in)."""
    by_parent: dict[int, list[ProcInfo]] = {}
    for pid in all_pids():
        found = info(pid)
        if found is not None:
            by_parent.setdefault(found.ppid, []).append(found)
    out: list[ProcInfo] = []
    todo = [root_pid]
    while todo:
        for child in by_parent.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


def find_init(marker: str) -> ProcInfo | None:
    """The process that is PID 1 of a PID namespace other than ours and whose command line ends with `marker`
    (a lab host's init ends with its own boot.json). Found by itself, not through its BMC, so that a host whose
    BMC died is still found, and ended, by `down`."""
    own_ns = pid_ns(os.getpid())
    for pid in all_pids():
        argv = cmdline(pid)
        if argv and argv[-1] == marker and "kvmha.lab.boot" in argv:
            found = info(pid)
            if found is not None and found.ns_pid == 1 and not found.zombie and pid_ns(pid) != own_ns:
                return found
    return None


def alive(pid: int, ticks: int) -> bool:
    """True if the very process (PID and start time) still exists and is not a zombie."""
    if start_ticks(pid) != ticks:
        return False
    try:
        return _read_status(pid).get("State", "").split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stopped(pid: int) -> bool:
    """True if the process is stopped by a signal (State T)."""
    try:
        return _read_status(pid).get("State", "").startswith("T")
    except OSError:
        return False


def kill(pid: int, start: int, sig: int = signal.SIGKILL) -> None:
    """Signal one process we started, named by PID and start time: checked right before the signal, so a PID
    reused by an unrelated process is never hit. A process that is already gone is fine."""
    if start_ticks(pid) != start:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(procs: list[ProcInfo], timeout_s: float) -> list[ProcInfo]:
    """Wait until none of procs is alive; returns the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    left = [p for p in procs if alive(p.pid, p.start_ticks)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p.pid, p.start_ticks)]
    return left


def mounted_anywhere(path: str) -> bool:
    """True if some process's mount namespace has a mount on `path` (removing the folder would detach it)."""
    for pid in all_pids():
        try:
            with open(PROC / str(pid) / "mountinfo") as fh:
                if any(line.split()[4] == path for line in fh):
                    return True
        except OSError:
            continue
    return False
