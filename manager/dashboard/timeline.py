"""Recovery timelines: each host failure told from the manager's events, as the operator wants it after an incident.

Pure: events (EventRow), HA work records and names in, `Failure` records out; no clock, no I/O. Times are the
events' wall-clock seconds.

A failure opens when a host goes from Up (or Connecting, Disconnected) to a failing status: Investigating — the event
says how long it had missed pings, which gives its last ping — or straight to Down when its link broke and its BMC
read off at once (the link-loss event before it gives when the link broke). It closes when the host comes back
(Connecting/Up) or is Removed.
In between, every host.status event is a mark (Investigating, Alert, Fencing, Fenced, Down) and the verdict's message
carries the evidence the investigation gathered (`bmc=..., heartbeat=... (age ...), reach=... (n/m neighbours
answered)`). Each HA work item scheduled for the host while the failure was open is one VM's recovery: scheduled,
start sent (`vm.starting`, with its target), confirmed running (`work.done`) or ended otherwise.

Invariant: nothing here guesses. A phase whose event is missing (pruned, or not happened yet) is None and drawn as
open, never interpolated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kvmha.manager.core.model import HaWorkRecord
from kvmha.manager.store import EventRow

_STATUS = re.compile(r"^(?P<old>\w+) -> (?P<new>\w+) \((?P<reason>.*)\)$", re.S)
_MISSED = re.compile(r"missed pings for (?P<s>[0-9.]+) s")
_FIELD = re.compile(r", (?=[a-z][a-z-]*=)")  # between the summary's "name=value" fields
EVIDENCE_NAMES = {"reach": "neighbours"}  # the summary's field names, as the page shows them
_STARTING = re.compile(r"^starting on (?P<host>\S+)")
OPENING_FROM = frozenset({"Up", "Connecting", "Disconnected"})
FAILING = frozenset({"Investigating", "Alert", "Fencing", "Fenced", "Down"})
LINK_LOST_KINDS = frozenset({"link.lost", "agent.link"})
VERDICTS = frozenset({"Down", "Fenced"})
CLOSING = frozenset({"Connecting", "Up", "Removed"})


@dataclass(frozen=True, slots=True)
class Mark:
    at: float
    status: str  # the host status entered
    reason: str


@dataclass(frozen=True, slots=True)
class VmRecovery:
    work_id: int
    vm: str
    scheduled_at: float
    started_at: float | None = None
    target: str = ""
    confirmed_at: float | None = None
    ended_at: float | None = None
    outcome: str = "in progress"  # Done, Error, Cancelled, or in progress
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Failure:
    id: int  # the event id of the detection: stable, usable in URLs
    host_id: int
    host: str
    detected_at: float
    last_ping_at: float | None
    marks: tuple[Mark, ...]
    verdict: str  # Down, Fenced, or the status it is in (Investigating, Alert, Fencing), or Up (came back)
    verdict_at: float | None
    fencing_at: float | None
    evidence: Mapping[str, str]
    vms: tuple[VmRecovery, ...] = field(default_factory=tuple)
    closed_at: float | None = None
    link_lost_at: float | None = None  # the agent's stream broke (before the detection), when the manager saw it

    @property
    def origin(self) -> float:
        """The first sign of the failure: its last ping, else its link breaking, else its detection."""
        known = [t for t in (self.last_ping_at, self.link_lost_at) if t is not None]
        return min(known) if known else self.detected_at

    @property
    def recovered_at(self) -> float | None:
        """When the last VM was confirmed running (None while any is open or none was confirmed)."""
        if not self.vms or any(v.outcome == "in progress" for v in self.vms):
            return None
        confirmed = [v.confirmed_at for v in self.vms if v.confirmed_at is not None]
        return max(confirmed) if confirmed else None

    def durations_s(self) -> dict[str, float]:
        """The figures an incident report quotes, only those whose two ends are known."""
        out: dict[str, float] = {}
        if self.origin < self.detected_at:
            out["detection_s"] = self.detected_at - self.origin
        if self.verdict_at is not None:
            out["verdict_s"] = self.verdict_at - self.detected_at
        recovered = self.recovered_at
        if recovered is not None:
            out["recovery_s"] = recovered - self.origin
        return out


@dataclass
class _Open:
    event_id: int
    host_id: int
    detected_at: float
    last_ping_at: float | None
    marks: list[Mark]
    verdict: str = "Investigating"
    verdict_at: float | None = None
    fencing_at: float | None = None
    evidence: dict[str, str] = field(default_factory=dict)
    closed_at: float | None = None
    link_lost_at: float | None = None


def host_id_of(subject: str, prefix: str = "host:") -> int | None:
    if not subject.startswith(prefix):
        return None
    number = subject[len(prefix):]
    return int(number) if number.isdigit() else None


def evidence_of(reason: str) -> dict[str, str]:
    """The investigation's summary in a verdict's reason ("...; bmc=off, heartbeat=stale (age 30.0 s), reach=...,
    leases=held (...): vm1 ...; re-investigating in 10.0 s") as {field: value}, plus the verdict's own words."""
    start = reason.find("bmc=")
    if start < 0:
        return {}
    summary = reason[start:].split("; ", 1)[0]
    fields = {}
    for part in _FIELD.split(summary):
        name, _, value = part.partition("=")
        fields[EVIDENCE_NAMES.get(name, name)] = value
    return {**fields, "verdict": reason[:start].rstrip("; ").split(";")[0]}


def failures(events: Iterable[EventRow], works: Sequence[HaWorkRecord], host_names: Mapping[int, str],
             vm_names: Mapping[int, str]) -> list[Failure]:
    """Every host failure in `events` (in id order), newest last."""
    rows = sorted(events, key=lambda e: e.id)
    opened: dict[int, _Open] = {}
    done: list[_Open] = []
    link_lost: dict[int, float] = {}  # host -> when its link broke, since it was last Up
    for row in rows:
        host_id = host_id_of(row.subject)
        if host_id is not None and row.kind in LINK_LOST_KINDS and host_id not in opened:
            link_lost.setdefault(host_id, row.at)
        if host_id is None or row.kind != "host.status":
            continue
        parsed = _STATUS.match(row.message)
        if parsed is None:
            continue
        old, new, reason = parsed["old"], parsed["new"], parsed["reason"]
        current = opened.get(host_id)
        if new in ("Up", "Connecting"):
            link_lost.pop(host_id, None)
        if new in FAILING and old in OPENING_FROM:
            if current is not None:
                current.closed_at = row.at
                done.append(opened.pop(host_id))
            missed = _MISSED.search(reason)
            current = _Open(row.id, host_id, row.at, row.at - float(missed["s"]) if missed else None,
                            [Mark(row.at, new, reason)], link_lost_at=link_lost.pop(host_id, None))
            opened[host_id] = current
            _verdict(current, row.at, new, reason)
            continue
        if current is None:
            continue
        current.marks.append(Mark(row.at, new, reason))
        if new in CLOSING:
            current.closed_at = row.at
            current.verdict = new if current.verdict_at is None else current.verdict
            done.append(opened.pop(host_id))
        else:
            _verdict(current, row.at, new, reason)
    done.extend(opened.values())
    return [_finish(o, rows, works, host_names, vm_names) for o in sorted(done, key=lambda o: o.event_id)]


def _verdict(item: _Open, at: float, status: str, reason: str) -> None:
    """What a failing status tells: the evidence gathered, fencing started, the verdict (Down or Fenced)."""
    evidence = evidence_of(reason)
    if evidence:
        item.evidence = evidence
    elif status in VERDICTS and not item.evidence:
        item.evidence = {"verdict": reason}
    if status == "Fencing":
        item.fencing_at = at
    if status in VERDICTS and item.verdict_at is None:
        item.verdict_at = at
    if item.verdict not in VERDICTS:
        item.verdict = status


def _finish(item: _Open, rows: Sequence[EventRow], works: Sequence[HaWorkRecord], host_names: Mapping[int, str],
            vm_names: Mapping[int, str]) -> Failure:
    end = item.closed_at
    mine = [w for w in works if w.host_id == item.host_id and w.created_at >= item.detected_at - 1.0
            and (end is None or w.created_at <= end)]
    return Failure(id=item.event_id, host_id=item.host_id, host=host_names.get(item.host_id, f"host#{item.host_id}"),
                   detected_at=item.detected_at, last_ping_at=item.last_ping_at, marks=tuple(item.marks),
                   verdict=item.verdict, verdict_at=item.verdict_at, fencing_at=item.fencing_at,
                   evidence=item.evidence, vms=tuple(_recovery(w, rows, vm_names) for w in sorted(mine, key=_id)),
                   closed_at=end, link_lost_at=item.link_lost_at)


def _id(work: HaWorkRecord) -> int:
    return int(work.id)


def _recovery(work: HaWorkRecord, rows: Sequence[EventRow], vm_names: Mapping[int, str]) -> VmRecovery:
    vm_subject, work_subject = f"vm:{work.vm_id}", f"work:{work.id}"
    started_at, target, attempts = None, "", 0
    confirmed_at = ended_at = None
    outcome = work.step.value if not work.step.active else "in progress"
    for row in rows:
        if row.at < work.created_at - 0.001:
            continue
        if row.subject == vm_subject and row.kind == "vm.starting" and ended_at is None:
            found = _STARTING.match(row.message)
            attempts += 1
            if started_at is None:
                started_at = row.at
            target = found["host"] if found else target
        elif row.subject == work_subject and row.kind in ("work.done", "work.error", "work.cancelled"):
            ended_at = row.at
            if row.kind == "work.done":
                confirmed_at = row.at
    return VmRecovery(work_id=work.id, vm=vm_names.get(work.vm_id, f"vm#{work.vm_id}"), scheduled_at=work.created_at,
                      started_at=started_at, target=target, confirmed_at=confirmed_at, ended_at=ended_at,
                      outcome=outcome, attempts=attempts)
