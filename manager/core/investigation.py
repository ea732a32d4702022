"""Investigation of a silent host: gather evidence, then read the verdict off a decision table.

Evidence has three independent sources (see docs/decisions.md for the table with its reasons):
- the BMC's power status (off / on / unknown — unknown also when the host has no BMC or it did not answer);
- the freshest storage heartbeat age any neighbour read (fresh / stale / stale long enough that the agent must have
  self-fenced / unknown);
- whether any neighbour reaches the host over the network (reached / unreached / unknown: nobody answered);
and two facts that are not questions: whether the host's self-fence is backed by a watchdog armed at its last
contact, and whether an operator confirmed it is off.

Verdicts: DEAD (proven: restart without fencing), ALIVE (the host runs, only its agent link is gone: leave its VMs
alone and raise an alert), UNKNOWN (fence it; without a usable fence, wait). Down needs positive evidence: the
BMC says off, or the host is silent and unreachable for longer than a watchdog guarantees it self-fenced, or an
operator confirmed it is off and nothing shows it alive. Silence alone never proves death: the evidence "silence"
is produced by the very agent that may have died, hung or been stopped with its VMs still running (issue 11).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from kvmha.manager.core.model import HostId, RequestId, VmId


class Bmc(enum.StrEnum):
    OFF = "off"
    ON = "on"
    UNKNOWN = "unknown"


class Heartbeat(enum.StrEnum):
    FRESH = "fresh"
    STALE = "stale"  # stale, but the agent may still be inside its isolation window: VMs may run
    STALE_LONG = "stale-long"  # stale past isolation.after + margin: an isolated agent has self-fenced by now
    UNKNOWN = "unknown"


class Reach(enum.StrEnum):
    REACHED = "reached"
    UNREACHED = "unreached"
    UNKNOWN = "unknown"


class SelfFence(enum.StrEnum):
    """Is the host's self-fence guaranteed by something other than its agent's goodwill? BACKED: its watchdog was
    armed at its last contact (and `isolation.self.fence` is on): an agent that died, hangs or was stopped gets its
    host reset within the watchdog's bound. NONE: nothing stops the VMs of a silent host."""

    BACKED = "backed"
    NONE = "none"


class Operator(enum.StrEnum):
    CONFIRMED = "confirmed"  # an operator confirmed the host is off (`kvmha host confirm-down`)
    NO = "-"


class Lease(enum.StrEnum):
    """The disk leases of the host's VMs, probed from a healthy neighbour (CheckLease, never taking them) before a
    verdict that rests on anything but the power being off. HELD: some QEMU still holds a VM's disk (the host may be
    alive); FREE: every lease tested free — not proof of death (NFS expires a dead client's lock, and also a cut-off
    live one's: docs/watchdog.md), only no reason to wait; UNKNOWN: not testable (no leases on the host, no
    neighbour, storage unreachable, no answer); UNTESTED: not probed yet."""

    HELD = "held"
    FREE = "free"
    UNKNOWN = "unknown"
    UNTESTED = "-"


class Verdict(enum.StrEnum):
    DEAD = "dead"
    ALIVE = "alive"
    UNKNOWN = "unknown"
    CHECK_LEASES = "check-leases"  # dead unless a disk lease is held: probe the leases, then decide again


ANY: Final = None

Rule = tuple[
    Bmc | None, Heartbeat | None, Reach | None, SelfFence | None, Operator | None, Lease | None, Verdict, str
]
_SELF_FENCED = "no neighbour reaches it and its heartbeat is stale beyond the watchdog-backed self-fence time"
_UNBACKED = "silent beyond the self-fence time, but no armed watchdog backed its agent: silence proves nothing"
_HELD = "a disk lease of its VMs is held: some QEMU still holds that disk, the host may be alive"
_CONFIRMED = "an operator confirmed it is off, nothing shows it alive"
_PROBE = "dead unless a VM's disk lease is still held: probing the leases"
B, H, R, F, Op, L, V = Bmc, Heartbeat, Reach, SelfFence, Operator, Lease, Verdict
# First matching row wins. (bmc, heartbeat, reach, self-fence, operator, lease) → verdict, reason. Order matters and
# is part of the design: positive signs of life come before the operator's word; silence proves death only when a
# watchdog guarantees the self-fence; and neither silence nor the operator's word outweighs a held disk lease.
RULES: tuple[Rule, ...] = (
    (B.OFF, H.FRESH, ANY, ANY, ANY, ANY, V.UNKNOWN, "BMC says off, heartbeat fresh: fence to be sure"),
    (B.OFF, ANY, ANY, ANY, ANY, ANY, V.DEAD, "BMC says power is off"),
    (ANY, H.FRESH, ANY, ANY, ANY, ANY, V.ALIVE, "storage heartbeat is fresh: the host runs, its link is lost"),
    (ANY, ANY, R.REACHED, ANY, ANY, ANY, V.ALIVE, "a neighbour reaches the host: it runs, its agent link is lost"),
    (B.ON, ANY, ANY, ANY, ANY, ANY, V.UNKNOWN, "BMC says on, nothing shows it alive: hung or isolated"),
    (ANY, ANY, ANY, ANY, ANY, L.HELD, V.UNKNOWN, _HELD),
    (B.UNKNOWN, H.STALE_LONG, R.UNREACHED, F.BACKED, ANY, L.UNTESTED, V.CHECK_LEASES, _PROBE),
    (B.UNKNOWN, H.STALE_LONG, R.UNREACHED, F.BACKED, ANY, ANY, V.DEAD, _SELF_FENCED),
    (ANY, ANY, ANY, ANY, Op.CONFIRMED, L.UNTESTED, V.CHECK_LEASES, _PROBE),
    (ANY, ANY, ANY, ANY, Op.CONFIRMED, ANY, V.DEAD, _CONFIRMED),
    (B.UNKNOWN, H.STALE_LONG, R.UNREACHED, F.NONE, ANY, ANY, V.UNKNOWN, _UNBACKED),
    (ANY, ANY, ANY, ANY, ANY, ANY, V.UNKNOWN, "no proof either way"),
)


def decide(
    bmc: Bmc,
    heartbeat: Heartbeat,
    reach: Reach,
    self_fence: SelfFence,
    operator: Operator = Operator.NO,
    lease: Lease = Lease.UNTESTED,
) -> tuple[Verdict, str]:
    facts = (bmc, heartbeat, reach, self_fence, operator, lease)
    for *columns, verdict, reason in RULES:
        if all(column in (ANY, value) for column, value in zip(columns, facts, strict=True)):
            return verdict, reason
    raise AssertionError("the last rule matches everything")  # pragma: no cover


def self_fenced_after_s(isolation_after_s: float, margin_s: float, watchdog_timeout_s: float | None) -> float:
    """Heartbeat age after which an isolated host's VMs are surely gone: the agent declares isolation
    `isolation.after` after it lost both its storage and the manager, and its watchdog resets the host at most
    `watchdog_timeout_s` later if the isolation response did not complete (or the agent is dead). Without a
    watchdog's bound (None) the last reported bound is unknown: count with 0 (the verdict then rests on SelfFence)."""
    return isolation_after_s + (watchdog_timeout_s or 0.0) + margin_s


def classify_heartbeat(
    age_s: float | None, silent_s: float, stale_after_s: float, self_fenced_after_s: float, link_slack_s: float = 0.0
) -> Heartbeat:
    """`silent_s`: how long the manager has not heard the agent. An agent counts its manager link as alive up to
    `link_slack_s` after the manager's last received ping (its HTTP/2 keepalive must first end the stream), and its
    isolation clock needs BOTH the storage heartbeat and the manager lost: so the heartbeat only counts as
    stale-long when it has been stale for the whole self-fence time, and the agent silent for that plus the slack."""
    if age_s is None:
        return Heartbeat.UNKNOWN
    if age_s < stale_after_s:
        return Heartbeat.FRESH
    if age_s >= self_fenced_after_s and silent_s >= self_fenced_after_s + link_slack_s:
        return Heartbeat.STALE_LONG
    return Heartbeat.STALE


def seconds_until_stale_long(
    age_s: float, silent_s: float, self_fenced_after_s: float, link_slack_s: float
) -> float:
    """How long until `classify_heartbeat` could say stale-long (if the heartbeat stays stale and the agent silent)."""
    return max(self_fenced_after_s - age_s, self_fenced_after_s + link_slack_s - silent_s, 0.0)


@dataclass(slots=True)
class Investigation:
    """Evidence about one host, collected until every question is answered or the deadline passes."""

    host_id: HostId
    started_at: float
    deadline_at: float
    pending: set[RequestId] = field(default_factory=set)
    neighbors_asked: int = 0
    neighbors_answered: int = 0
    reached: bool = False
    heartbeat_age_s: float | None = None  # freshest seen
    heartbeat_read_at: float | None = None
    bmc: Bmc = Bmc.UNKNOWN
    leases: LeaseEvidence | None = None  # None: not probed (yet)

    def add_neighbor(self, tcp: bool, icmp: bool | None, heartbeat_age_s: float | None, at: float) -> None:
        self.neighbors_answered += 1
        self.reached = self.reached or tcp or bool(icmp)
        if heartbeat_age_s is not None and (self.heartbeat_age_s is None or heartbeat_age_s < self.heartbeat_age_s):
            self.heartbeat_age_s = heartbeat_age_s
            self.heartbeat_read_at = at

    def reach(self) -> Reach:
        if self.reached:
            return Reach.REACHED
        return Reach.UNREACHED if self.neighbors_answered else Reach.UNKNOWN

    def lease(self) -> Lease:
        return Lease.UNTESTED if self.leases is None else self.leases.state()

    def summary(self, heartbeat: Heartbeat, self_fence: SelfFence) -> str:
        age = self.heartbeat_age_s
        age_text = "none" if age is None else f"{age:.1f} s"
        leases = "" if self.leases is None else f", leases={self.leases.summary()}"
        return (
            f"bmc={self.bmc.value}, heartbeat={heartbeat.value} (age {age_text}), reach={self.reach().value} "
            f"({self.neighbors_answered}/{self.neighbors_asked} neighbours answered), self-fence={self_fence.value}"
            f"{leases}"
        )


@dataclass(slots=True)
class LeaseEvidence:
    """The disk-lease probes of one investigation: one CheckLease per VM of the host, spread over its neighbours."""

    asked: dict[RequestId, tuple[VmId, str]] = field(default_factory=dict)  # request → VM, while unanswered
    held: list[tuple[VmId, str]] = field(default_factory=list)  # (vm, "vm1 (seen from h2: ...)")
    free: int = 0
    unknown: int = 0
    note: str = ""  # why nothing was probed

    def answer(self, request_id: RequestId, state: Lease, detail: str) -> None:
        asked = self.asked.pop(request_id, None)
        if asked is None:
            return
        vm_id, name = asked
        if state is Lease.HELD:
            self.held.append((vm_id, f"{name} ({detail})" if detail else name))
        elif state is Lease.FREE:
            self.free += 1
        else:
            self.unknown += 1

    def state(self) -> Lease:
        if self.held:
            return Lease.HELD
        if self.free and not self.unknown and not self.asked:
            return Lease.FREE
        return Lease.UNKNOWN

    def summary(self) -> str:
        if self.note:
            return f"{self.state().value} ({self.note})"
        unanswered = f", {len(self.asked)} unanswered" if self.asked else ""
        held = f": {', '.join(text for _, text in self.held)}" if self.held else ""
        counts = f"{len(self.held)} held, {self.free} free, {self.unknown} unknown{unanswered}"
        return f"{self.state().value} ({counts}){held}"
