"""Investigation of a silent host: gather evidence, then read the verdict off a decision table.

Evidence has three independent sources (see docs/decisions.md for the table with its reasons):
- the BMC's power status (off / on / unknown — unknown also when the host has no BMC or it did not answer);
- the freshest storage heartbeat age any neighbour read (fresh / stale / stale long enough that the agent must have
  self-fenced / unknown);
- whether any neighbour reaches the host over the network (reached / unreached / unknown: nobody answered).

Verdicts: DEAD (proven: restart without fencing), ALIVE (the host runs, only its agent link is gone: leave its VMs
alone and raise an alert), UNKNOWN (fence it; without a usable fence, wait). Down needs positive evidence.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final

from kvmha.manager.core.model import HostId, RequestId


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


class Verdict(enum.StrEnum):
    DEAD = "dead"
    ALIVE = "alive"
    UNKNOWN = "unknown"


ANY: Final = None

# First matching row wins. (bmc, heartbeat, reach) → verdict, reason. Order matters and is part of the design.
RULES: tuple[tuple[Bmc | None, Heartbeat | None, Reach | None, Verdict, str], ...] = (
    (Bmc.OFF, Heartbeat.FRESH, ANY, Verdict.UNKNOWN, "BMC says off but the heartbeat is fresh: fence to be sure"),
    (Bmc.OFF, ANY, ANY, Verdict.DEAD, "BMC says power is off"),
    (ANY, Heartbeat.FRESH, ANY, Verdict.ALIVE, "storage heartbeat is fresh: the host runs, its agent link is lost"),
    (ANY, ANY, Reach.REACHED, Verdict.ALIVE, "a neighbour reaches the host: it runs, its agent link is lost"),
    (Bmc.ON, ANY, ANY, Verdict.UNKNOWN, "BMC says on, nothing shows it alive: hung or isolated"),
    (
        Bmc.UNKNOWN,
        Heartbeat.STALE_LONG,
        Reach.UNREACHED,
        Verdict.DEAD,
        "no neighbour reaches it and its heartbeat is stale beyond the self-fence time",
    ),
    (ANY, ANY, ANY, Verdict.UNKNOWN, "no proof either way"),
)


def decide(bmc: Bmc, heartbeat: Heartbeat, reach: Reach) -> tuple[Verdict, str]:
    for rule_bmc, rule_hb, rule_reach, verdict, reason in RULES:
        if rule_bmc not in (ANY, bmc) or rule_hb not in (ANY, heartbeat) or rule_reach not in (ANY, reach):
            continue
        return verdict, reason
    raise AssertionError("the last rule matches everything")  # pragma: no cover


def classify_heartbeat(
    age_s: float | None, silent_s: float, stale_after_s: float, self_fenced_after_s: float
) -> Heartbeat:
    """`silent_s`: how long the manager has not heard the agent. An agent self-fences `isolation.after` seconds after
    it lost BOTH its storage heartbeat and the manager, so the heartbeat only counts as stale-long when it has been
    stale, and the agent silent, for the whole self-fence time (plus margin)."""
    if age_s is None:
        return Heartbeat.UNKNOWN
    if age_s < stale_after_s:
        return Heartbeat.FRESH
    return Heartbeat.STALE_LONG if min(age_s, silent_s) >= self_fenced_after_s else Heartbeat.STALE


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

    def summary(self, heartbeat: Heartbeat) -> str:
        age = self.heartbeat_age_s
        age_text = "none" if age is None else f"{age:.1f} s"
        return (
            f"bmc={self.bmc.value}, heartbeat={heartbeat.value} (age {age_text}), reach={self.reach().value} "
            f"({self.neighbors_answered}/{self.neighbors_asked} neighbours answered)"
        )
