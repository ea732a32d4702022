"""What each HA system recorded about one failure, turned into the same phases (seconds after the fault):

    detect     the system noticed (kvmha: the host leaves Up / the first event about the VM; Pacemaker: the node's
               state is "lost" / a VirtualDomain monitor returned "not running")
    fenced     power loss only: the host is proven dead or fenced (kvmha: Down or Fenced; Pacemaker: the fence
               device reported the node terminated)
    start      the first start of a VM ordered (kvmha: vm.starting; Pacemaker: "Initiating start operation")
    done       the system itself considers the last VM started (kvmha: work.done; Pacemaker: the start's result ok)

Used by bench/peer_failover.py; the times of "running again" are measured from outside (/proc + virsh), these only
explain them. Sources: the manager's events (kvmha) and every host's pacemaker.log (the hosts share one clock, the
machine's, so lines of different hosts compare exactly; the log's time stamps have milliseconds and local time).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from kvmha.lab import pacemaker

if TYPE_CHECKING:
    from kvmha.lab.harness import LabCluster
    from kvmha.lab.lab import Lab

Phases = dict[str, float]
Story = list[tuple[float, str, str]]  # seconds after the fault, source (host or "manager"), what was recorded

_STAMP = re.compile(r"^(\w{3} +\d+ \d\d:\d\d:\d\d\.\d{3}) \S+ (\S+?)\s*\[\d+\] \((\w+)\)\s+(\w+): (.*)$")
# Pacemaker 2.1 wordings (pacemaker-controld and pacemaker-fenced), one pattern per phase.
NODE_LOST = r"Node {node} state is now lost"
FENCE_REQUESTED = r"Requesting fencing \(\w+\) of node {node}"
FENCED = r"(Peer {node} was terminated \(\w+\) by \S+ .*: OK|Operation '\w+' targeting {node} .*: OK)"
START_ORDERED = r"Initiating start operation {vm}_start_0"
STARTED = r"Result of start operation for {vm} on \S+: ok"
MONITOR_FAILED = r"Result of monitor operation for {vm} on \S+: (not running|error)"
# Lines worth keeping in a run's story (the rest of pacemaker.log is the daemons' chatter).
_STORY = re.compile(r"state is now lost|Requesting fencing|was terminated|Operation '\w+' targeting|Initiating (start|"
                    r"stop) operation|Result of (start|stop) operation|Result of monitor operation .*not running|"
                    r"Actions: (Start|Recover|Move|Stop|Restart)|elected|Election|throttl|will be fenced|"
                    r"Scheduling node .* for fencing|quorum", re.IGNORECASE)


def _epoch(stamp: str) -> float:
    """'Nov 29 16:10:28.749' (local time, no year) -> seconds since the epoch (the year is taken as this one)."""
    year = time.localtime().tm_year
    parsed = datetime.strptime(f"{year} {stamp}", "%Y %b %d %H:%M:%S.%f")
    return time.mktime(parsed.timetuple()) + parsed.microsecond / 1e6


def pacemaker_lines(logs: dict[str, Path], since: float) -> list[tuple[float, str, str]]:
    """(epoch, host, 'daemon: message') for every pacemaker.log line at or after `since`, in time order."""
    out: list[tuple[float, str, str]] = []
    for host, path in logs.items():
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines()[-20000:]:
            match = _STAMP.match(line)
            if match is None:
                continue
            at = _epoch(match.group(1))
            if at >= since:
                out.append((at, host, f"{match.group(2)}: {match.group(5)}"))
    out.sort()
    return out


def _first(lines: list[tuple[float, str, str]], pattern: str) -> float | None:
    compiled = re.compile(pattern)
    return next((at for at, _host, text in lines if compiled.search(text)), None)


def _last_of_each(lines: list[tuple[float, str, str]], pattern: str, vms: list[str]) -> float | None:
    found = [_first(lines, pattern.format(vm=re.escape(vm))) for vm in vms]
    return None if any(f is None for f in found) else max(f for f in found if f is not None)


def pacemaker_phases(lab: Lab, kind: str, victim: str, vms: list[str], t0: float) -> tuple[Phases, Story]:
    """Phases of one run from every host's pacemaker.log (victim: the host powered off, or the VM's host)."""
    lines = pacemaker_lines(pacemaker.log_paths(lab), t0 - 0.001)
    node = re.escape(victim)
    found: dict[str, float | None] = {}
    if kind == "power":
        found["detect"] = _first(lines, NODE_LOST.format(node=node))
        found["fence_requested"] = _first(lines, FENCE_REQUESTED.format(node=node))
        found["fenced"] = _first(lines, FENCED.format(node=node))
    else:
        found["detect"] = _first(lines, MONITOR_FAILED.format(vm=re.escape(vms[0])))
    found["start"] = min((at for vm in vms if (at := _first(lines, START_ORDERED.format(vm=re.escape(vm))))),
                         default=None)
    found["done"] = _last_of_each(lines, STARTED, vms)
    phases = {k: round(v - t0, 3) for k, v in found.items() if v is not None}
    story = [(round(at - t0, 3), host, text[:300]) for at, host, text in lines if _STORY.search(text)]
    return phases, story[:200]


def kvmha_phases(cluster: LabCluster, kind: str, victim: str, vms: list[str], t0: float,
                 after_id: int) -> tuple[Phases, Story]:
    """Phases of one run from the manager's events (victim: the host powered off, or the VM's host)."""
    from kvmha.proto.v1 import admin_pb2 as apb

    admin = cluster.admin()
    names = {f"host:{h.id}": h.name for h in admin.ListHosts(apb.ListHostsRequest(), timeout=5).hosts}
    names |= {f"vm:{v.id}": v.name for v in admin.ListVms(apb.ListVmsRequest(), timeout=5).vms}
    names |= {f"work:{w.id}": w.vm for w in admin.ListHaWork(apb.ListHaWorkRequest(active_only=False), timeout=5).items}
    found: dict[str, float] = {}
    done: dict[str, float] = {}
    story: Story = []
    for event in cluster.events(after_id):
        subject = names.get(event.subject, event.subject)
        seconds = event.at - t0
        story.append((round(seconds, 3), "manager", f"{subject} {event.kind}: {event.message}"[:300]))
        if kind == "power" and event.kind == "host.status" and subject == victim:
            old, _, rest = event.message.partition(" -> ")
            if old == "Up":
                found.setdefault("detect", seconds)
            if rest.split(" ", 1)[0] in ("Down", "Fenced"):
                found.setdefault("fenced", seconds)
        if kind == "kill" and subject in vms:
            found.setdefault("detect", seconds)
        if event.kind == "vm.starting" and subject in vms:
            found.setdefault("start", seconds)
        if event.kind == "work.done" and subject in vms:
            done.setdefault(subject, seconds)
    if done and set(done) >= set(vms):
        found["done"] = max(done.values())
    return {k: round(v, 3) for k, v in found.items()}, story[:200]
