"""Evidence at once: a broken agent link is a reason to ask the BMC now — never a verdict by itself.

An agent's stream that ends without Goodbye means its process died (the kernel closed the socket) or the manager's
HTTP/2 keepalive got no answer (a power loss or a cut cable closes nothing; the manager pings each agent every
second). The host may have lost its power seconds before `ping.timeout` would say so, so the core asks its BMC at
once. Only a BMC that reads "off" is acted upon: the host is Down and its HA VMs restart now — the same proof as
the investigation table's "BMC off → dead" row. Every other answer (on, unknown, no answer in time) decides
nothing: the host stays as it is and is investigated if it misses `ping.timeout`, exactly as without this rule. So
the rule can only make a proven death known sooner; it never turns silence into a verdict.

A BMC that answers "on" is asked again every RECHECK_INTERVAL_S for RECHECK_FOR_S after the link broke: the link
can break a moment before the BMC's own reading turns off (a BMC-initiated power-off kills the host's processes —
closing their sockets — before the BMC reports the chassis off; seen with ipmi_sim in the lab). A BMC that does not
answer is not asked again (a dead BMC or a manager cut off from the BMC network would only pile up timeouts).

Invariants:
* at most one early query per host in flight, at most 1 + RECHECK_FOR_S / RECHECK_INTERVAL_S per broken link,
  only for an Up/Connecting host with a BMC and HA whose link was open (a duplicate or stale disconnect asks
  nothing);
* its answer is used only while the host is still Up/Connecting and its agent has not reconnected: a reconnected
  agent or an investigation already under way owns the host, and an "off" then is only reported (a contradiction
  for the operator), never acted upon.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from kvmha.manager.core import facts as f
from kvmha.manager.core.actions import QueryBmc
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.investigation import Bmc
from kvmha.manager.core.model import HostId, HostRecord, HostStatus, RequestId
from kvmha.manager.core.routing import LinkLossQuery, LinkLossRecheck

S = HostStatus
RECHECK_INTERVAL_S = 0.5
RECHECK_FOR_S = 3.0


class Early(enum.StrEnum):
    DOWN = "down"  # proven dead now: Down, restart its HA VMs at once
    WAIT = "wait"  # nothing proven: the ping timeout decides, as without the rule


# The early BMC answer → what happens. "unknown" also stands for no answer within the query's timeout.
RULES: dict[Bmc, tuple[Early, str]] = {
    Bmc.OFF: (Early.DOWN, "BMC says power is off"),
    Bmc.ON: (Early.WAIT, "BMC says power is on: investigated if it misses the ping timeout"),
    Bmc.UNKNOWN: (Early.WAIT, "BMC did not answer: investigated if it misses the ping timeout"),
}


class HostDeath(Protocol):
    """What the early rule asks of host HA (implemented by HostFlow)."""

    def wants_ha(self, host: HostRecord) -> bool: ...
    def down_at_link_loss(self, host: HostRecord, evidence: str) -> None: ...


@dataclass(slots=True)
class _Watch:
    """A host whose link broke and whose BMC is being asked."""

    broke_at: float
    told: bool = False  # the "nothing decided" event was recorded (once per broken link, not per recheck)


class LinkLoss:
    def __init__(self, ctx: Ctx, hosts: HostDeath) -> None:
        self.ctx = ctx
        self.hosts = hosts
        self.asked: dict[HostId, RequestId] = {}
        self.watched: dict[HostId, _Watch] = {}

    def on_disconnected(self, fact: f.AgentDisconnected) -> None:
        """Called before host HA handles the fact: `connected` still says whether this link was the open one."""
        ctx = self.ctx
        host = ctx.hosts.get(fact.host_id)
        if fact.planned or host is None or host.id not in ctx.connected or host.id in self.asked:
            return
        if host.status not in (S.UP, S.CONNECTING) or not host.has_bmc or not self.hosts.wants_ha(host):
            return
        self.watched[host.id] = _Watch(ctx.now)
        ctx.timers.cancel(LinkLossRecheck(host.id))
        self._ask(host)
        ctx.event("info", f"host:{host.id}", "link.lost", "agent link broke without goodbye: asking its BMC now")

    def recheck(self, host_id: HostId) -> None:
        host = self.ctx.hosts.get(host_id)
        if host is None or host_id in self.asked or host_id not in self.watched:
            return
        if host.has_bmc and self._still_silent(host):
            self._ask(host)
        else:
            del self.watched[host_id]

    def on_answer(self, request_id: RequestId, query: LinkLossQuery, power: Bmc) -> None:
        if self.asked.get(query.about) != request_id:
            return
        del self.asked[query.about]
        host = self.ctx.hosts.get(query.about)
        watch = self.watched.pop(query.about, None)
        if host is None or watch is None or host.status not in (S.UP, S.CONNECTING):
            return  # gone, or an investigation owns the host now and asks the BMC itself
        early, reason = RULES[power]
        subject = f"host:{host.id}"
        if host.id in self.ctx.connected:
            if early is Early.DOWN:
                why = f"{reason} but its agent is connected again: not acted upon"
                self.ctx.event("warning", subject, "link.contradiction", why)
            return
        if early is Early.DOWN:
            self.hosts.down_at_link_loss(host, f"agent link broke and {reason}")
            return
        if not watch.told:
            watch.told = True
            self.ctx.event("info", subject, "link.wait", reason)
        if power is Bmc.ON and self.ctx.now + RECHECK_INTERVAL_S <= watch.broke_at + RECHECK_FOR_S:
            self.watched[host.id] = watch
            self.ctx.timers.schedule(LinkLossRecheck(host.id), self.ctx.now + RECHECK_INTERVAL_S)

    def _ask(self, host: HostRecord) -> None:
        request_id = self.ctx.track(LinkLossQuery(host.id), host.id, self.ctx.config.check_neighbor_timeout_s)
        self.ctx.out.append(QueryBmc(request_id, host.id))
        self.asked[host.id] = request_id

    def _still_silent(self, host: HostRecord) -> bool:
        return host.status in (S.UP, S.CONNECTING) and host.id not in self.ctx.connected
