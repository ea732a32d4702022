"""Host HA: the ping map and monitor, the host status machine, investigations and fencing.

A silent host goes Up → Investigating; its HA VMs get work items at once (they wait for the verdict). The verdict
comes from `investigation.decide`: Down (proven dead) and Fenced (power off confirmed) release the work items;
Alert (alive but unreachable, or fencing impossible/forbidden) keeps them waiting and re-investigates later.

A host whose agent has just connected is judged by its first ping's window, not by the ping map: it enters the
map with its first ping, and until then it is behind only once max(startup.grace, ping.timeout) has passed since its
connection's arrival (stamped as its Welcome leaves). During a slow ramp of thousands of agents a Welcome, a first
report and a first ping can each wait in a busy manager; a host is not behind for what the manager did not read
yet. The window only ever delays a verdict, never hastens one.

The self-fence guarantee is a fact about the host at its agent's last contact (Hello/Ping: was its watchdog
armed, with which bound), never an assumption: a host whose watchdog was not armed and that cannot be fenced is
never declared dead by its silence; it stays Alert with one event that tells the operator why and what to do
(`kvmha host confirm-down`, which this flow takes as evidence, not as an order).
"""

from __future__ import annotations

from typing import Protocol, assert_never

from kvmha.manager.core import facts as f
from kvmha.manager.core import leaseprobe, selffence
from kvmha.manager.core.actions import CheckNeighbor, DisconnectAgent, Fence, QueryBmc, Severity
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.fencing import fence_backoff_s, fence_block_reason, silent_share
from kvmha.manager.core.flap import FlapLog
from kvmha.manager.core.hoststate import DEAD, SILENT, HostEvent, next_status
from kvmha.manager.core.investigation import (
    Bmc,
    Heartbeat,
    Investigation,
    Lease,
    Operator,
    SelfFence,
    Verdict,
    classify_heartbeat,
    decide,
    seconds_until_stale_long,
)
from kvmha.manager.core.model import (
    HostId,
    HostRecord,
    HostRole,
    HostStatus,
    HostUuid,
    RequestId,
    ResourceState,
    VmId,
)
from kvmha.manager.core.pingmap import PingMap
from kvmha.manager.core.routing import (
    BmcQuery,
    FenceRequest,
    FirstPingDue,
    HostTimer,
    InvestigationDeadline,
    LeaseQuery,
    NeighborQuery,
    PlannedWaitOver,
    Reinvestigate,
    RejoinDeadline,
)
from kvmha.manager.core.vmindex import occupies

S = HostStatus
# PrepareForMaintenance and ErrorInMaintenance hosts still run VMs: they keep host HA (core/maintenance.py). Disabled
# hosts keep it too unless ha.disabled.hosts is false (the seed's MonitorTask rule, which leaves their HA VMs
# unprotected: CloudStack's gap).
_NO_HA_RESOURCE = frozenset({ResourceState.MAINTENANCE})


class HostWork(Protocol):
    """What host HA asks of the HA work scheduler (implemented by Scheduler)."""

    def schedule_for_host(self, host: HostRecord, reason: str) -> None: ...
    def host_resolved(self, host_id: HostId) -> None: ...
    def host_fencing(self, host: HostRecord) -> None: ...


class PowerNews(Protocol):
    """What host HA tells power-state sync (implemented by PowerSync)."""

    def hypervisor_lost(self, host: HostRecord) -> None: ...
    def storage_status(self, host: HostRecord, ok: bool) -> None: ...
    def host_dead(self, host: HostRecord) -> None: ...


class HostFlow:
    def __init__(self, ctx: Ctx, work: HostWork, power: PowerNews) -> None:
        self.ctx = ctx
        self.work = work
        self.power = power
        self.pingmap = PingMap()
        self.awaiting_rejoin: set[HostId] = set()  # restored as Up, agent not back yet since the manager started
        self.awaiting_first_ping: set[HostId] = set()  # agent connected, not pinged yet: not in the ping map
        self.investigations: dict[HostId, Investigation] = {}
        self.fence_failures: dict[HostId, int] = {}
        self.flaps = FlapLog()  # failures for flap detection (core/flap.py)
        # host -> (freshest heartbeat age seen, when): a failed fence re-checks as soon as the host could be proven
        # dead by silence, instead of only after the fence backoff.
        self.heartbeat_seen: dict[HostId, tuple[float, float]] = {}
        self.confirmed_by: dict[HostId, str] = {}  # an operator's confirm-down, evidence for the next verdict
        self.told_operator: set[HostId] = set()  # the "needs the operator" event is given once per silence
        self.told_held: dict[HostId, set[VmId]] = {}  # VMs whose held lease was reported, per silence

    # ------------------------------------------------------------ status changes

    def transition(self, host: HostRecord, event: HostEvent, reason: str, severity: Severity = "info") -> None:
        old = host.status
        host.status = next_status(old, event)
        self._refresh_membership(host)
        if host.status != old:
            sev: Severity = "alert" if host.status in (S.DOWN, S.FENCED, S.FENCING, S.ALERT) else severity
            self.ctx.event(sev, f"host:{host.id}", "host.status", f"{old.value} -> {host.status.value} ({reason})")
        self.ctx.save_host(host)

    def _refresh_membership(self, host: HostRecord) -> None:
        eligible = host.status is S.UP and host.id in self.ctx.connected and host.role is HostRole.ROUTING
        self.ctx.up.refresh(host.id, eligible)

    # ------------------------------------------------------------ restore (manager restart)

    def restore(self, host: HostRecord) -> None:
        self.ctx.hosts[host.id] = host
        if host.status in (S.UP, S.CONNECTING):
            # Every agent gets the whole startup grace (at least a full ping timeout) to reconnect to the new
            # manager before it is behind: thousands of agents reconnecting at once, each backing off, must not
            # read as thousands of silent hosts (seen in bench/manager_load.py --restart-at). A timer, not a
            # future entry in the ping map, which must stay ordered by time.
            config = self.ctx.config
            self.awaiting_rejoin.add(host.id)
            grace_s = max(config.startup_grace_s, config.ping_timeout_s)
            self.ctx.timers.schedule(RejoinDeadline(host.id), self.ctx.now + grace_s)
        elif host.status in SILENT:
            self.transition(host, HostEvent.MANAGER_RESTARTED, "manager restarted mid-investigation: starting over")
            self.ctx.timers.schedule(Reinvestigate(host.id), self.ctx.now)
        elif host.status is S.DISCONNECTED and self.wants_ha(host):
            wait_s = self.ctx.config.planned_disconnect_wait_s
            self.ctx.timers.schedule(PlannedWaitOver(host.id), self.ctx.now + wait_s)

    # ------------------------------------------------------------ agent link facts

    def on_agent_connected(self, fact: f.AgentConnected) -> None:
        host = self.ctx.hosts.get(fact.host_id)
        if host is None:
            host = HostRecord(fact.host_id, HostUuid(fact.uuid), fact.name, fact.address)
            self.ctx.hosts[host.id] = host
            self.ctx.event("info", f"host:{host.id}", "host.registered", f"new host {fact.name} ({fact.address})")
        if host.status in (S.FENCING, S.REMOVED):
            # A fence in flight is never undone by a reconnect: refuse the agent until the fence has answered.
            why = "its host is being fenced" if host.status is S.FENCING else "the host was removed"
            self.ctx.out.append(DisconnectAgent(host.id, f"refused: {why}"))
            self.ctx.event("warning", f"host:{host.id}", "agent.refused", f"agent connected but {why}: refused")
            return
        host.name, host.address, host.capacity = fact.name, fact.address, fact.capacity
        host.lease_manager = fact.lease_manager
        host.inventory = fact.inventory
        selffence.note_watchdog(self.ctx, host, fact.watchdog)
        self.awaiting_rejoin.discard(host.id)
        self.ctx.connected.add(host.id)
        self._forget_silence(host.id)
        self._await_first_ping(host)
        self.transition(host, HostEvent.AGENT_CONNECTED, f"agent connected, boot {fact.boot_id}")

    def on_agent_heard(self, fact: f.AgentHeard) -> None:
        """A known host's agent said Hello (stored as AgentConnected later): alive at this arrival. A host awaiting
        its rejoin after a manager restart gets its first-ping window from here; one whose link broke (still in
        the ping map) counts its silence from here, as from a ping. Only ever a later verdict, never an earlier
        one, and only for a host whose agent demonstrably spoke."""
        host = self.ctx.hosts.get(fact.host_id)
        if host is None or host.id in self.ctx.connected or host.status not in (S.UP, S.CONNECTING):
            return
        at, config = self.ctx.received_at, self.ctx.config
        if host.id in self.awaiting_rejoin:
            due, window = self.ctx.timers.due_at(RejoinDeadline(host.id)), at + max(config.startup_grace_s,
                                                                                    config.ping_timeout_s)
            if due is not None and due < window:
                self.ctx.timers.schedule(RejoinDeadline(host.id), window)
        elif host.id in self.pingmap:
            if host.last_ping_at is None or at > host.last_ping_at:
                host.last_ping_at = at
            self.pingmap.ping(host.id, at)

    def _await_first_ping(self, host: HostRecord) -> None:
        """Out of the ping map until its first ping; behind only when its first-ping window ends (module header)."""
        at = self.ctx.received_at
        if host.last_ping_at is None or at > host.last_ping_at:
            host.last_ping_at = at  # heard: its silence (as reported) counts from here
        self.pingmap.remove(host.id)
        self.awaiting_first_ping.add(host.id)
        config = self.ctx.config
        self.ctx.timers.schedule(FirstPingDue(host.id), at + max(config.startup_grace_s, config.ping_timeout_s))

    def _forget_silence(self, host_id: HostId) -> None:
        self.investigations.pop(host_id, None)
        self.heartbeat_seen.pop(host_id, None)
        self.confirmed_by.pop(host_id, None)
        self.told_operator.discard(host_id)
        self.told_held.pop(host_id, None)
        self.awaiting_first_ping.discard(host_id)
        for timer in (InvestigationDeadline, Reinvestigate, PlannedWaitOver, RejoinDeadline, FirstPingDue):
            self.ctx.timers.cancel(timer(host_id))

    def on_inventory(self, fact: f.InventoryChanged) -> None:
        """Storage, networks or memory changed: placement reads them from the record (nothing else to decide); a
        storage that turned unhealthy or vanished leaves an event, since VMs needing it no longer go there, and so
        does one the host reaches anew (mounted, healthy again): from then on VMs on it may be placed here."""
        host = self.ctx.hosts.get(fact.host_id)
        if host is None or host.id not in self.ctx.connected:
            return
        before = {s.identity for s in host.inventory.storage if s.healthy}
        host.inventory = fact.inventory
        now = {s.identity: s.mount for s in fact.inventory.storage if s.healthy}
        lost = sorted(before - set(now))
        if lost:
            self.ctx.event("warning", f"host:{host.id}", "host.storage.lost",
                           f"no longer reaches {', '.join(lost)}: VMs on it are not placed here")
        found = sorted(set(now) - before)
        if found:
            self.ctx.event("info", f"host:{host.id}", "host.storage.found",
                           f"now reaches {', '.join(f'{i} (at {now[i]})' for i in found)}")

    def on_heartbeat(self, fact: f.HeartbeatReceived) -> None:
        host = self.ctx.hosts.get(fact.host_id)
        if host is None or host.id not in self.ctx.connected:
            return  # a ping from a link that is already gone
        self._heard(host)
        if selffence.note_watchdog(self.ctx, host, fact.watchdog):
            self.ctx.save_host(host)
        if host.status in (S.INVESTIGATING, S.ALERT):
            self._forget_silence(host.id)
            self.transition(host, HostEvent.PING, "pinged again on its open link")
            self.work.host_resolved(host.id)
        if not fact.hypervisor_connected:
            self.power.hypervisor_lost(host)
        self.power.storage_status(host, fact.storage_ok)

    def self_fence(self, host: HostRecord) -> tuple[SelfFence, float]:
        return selffence.self_fence(self.ctx.config, host)

    def _heard(self, host: HostRecord) -> None:
        """The host's agent was heard when the fact arrived (not when the driver got to it); never backwards."""
        at = self.ctx.received_at
        if host.last_ping_at is None or at > host.last_ping_at:
            host.last_ping_at = at
        self.pingmap.ping(host.id, at)
        if host.id in self.awaiting_first_ping:
            self.awaiting_first_ping.discard(host.id)
            self.ctx.timers.cancel(FirstPingDue(host.id))

    def on_store_recovered(self, fact: f.StoreRecovered) -> None:
        """The store is back after an outage in which nothing could be decided: every host gets a fresh silence
        window (agents that could not re-register meanwhile were refused through no fault of their own)."""
        config, now = self.ctx.config, self.ctx.now
        self.pingmap.refresh_all(now)
        for host_id in self.awaiting_rejoin:
            due = self.ctx.timers.due_at(RejoinDeadline(host_id))
            if due is not None and due < now + config.ping_timeout_s:
                self.ctx.timers.schedule(RejoinDeadline(host_id), now + config.ping_timeout_s)
        for host_id in self.awaiting_first_ping:
            due = self.ctx.timers.due_at(FirstPingDue(host_id))
            if due is not None and due < now + config.ping_timeout_s:
                self.ctx.timers.schedule(FirstPingDue(host_id), now + config.ping_timeout_s)
        self.ctx.event("warning", "manager", "store.recovered",
                       f"the database could not commit for {fact.down_s:.1f} s; decisions waited for it; every host "
                       f"gets a fresh silence window of {config.ping_timeout_s:.0f} s")

    def on_agent_disconnected(self, fact: f.AgentDisconnected) -> None:
        host = self.ctx.hosts.get(fact.host_id)
        if host is None or host.id not in self.ctx.connected:
            return
        self.ctx.connected.discard(host.id)
        self._refresh_membership(host)
        if not fact.planned:
            # Stay in the ping map: a link that comes back within ping.timeout is not a failure.
            self.ctx.event("info", f"host:{host.id}", "agent.link", "agent link lost; investigated if it stays silent")
            return
        self.pingmap.remove(host.id)
        self.awaiting_first_ping.discard(host.id)
        self.ctx.timers.cancel(FirstPingDue(host.id))
        if host.status in (S.UP, S.CONNECTING):
            self.transition(host, HostEvent.GOODBYE, "agent said goodbye (planned)")
            if self.wants_ha(host):
                wait_s = self.ctx.config.planned_disconnect_wait_s
                self.ctx.timers.schedule(PlannedWaitOver(host.id), self.ctx.now + wait_s)

    def on_ready(self, host: HostRecord) -> None:
        """First full power report after connecting: the host is Up and its VMs' power states are fresh."""
        if host.status is S.CONNECTING:
            self.transition(host, HostEvent.READY, "first full power report received")
            self.fence_failures.pop(host.id, None)
            self.work.host_resolved(host.id)

    # ------------------------------------------------------------ monitor

    def next_deadline(self) -> float | None:
        return self.pingmap.next_behind_at(self.ctx.config.ping_timeout_s)

    def monitor(self, now: float) -> None:
        """Hosts silent since before `now` - ping.timeout are behind. `now` is the time up to which every arrival
        has been handled (see Core.tick), which may lag the core's clock."""
        for host_id, _ in self.pingmap.take_behind(now, self.ctx.config.ping_timeout_s):
            host = self.ctx.hosts.get(host_id)
            if host is not None and host.status in (S.UP, S.CONNECTING):
                # The silence reported is the host's own (since its last arrival), not the refreshed window.
                self._behind(host, now - (host.last_ping_at if host.last_ping_at is not None else now))

    def wants_ha(self, host: HostRecord) -> bool:
        if host.resource_state is ResourceState.DISABLED and not self.ctx.config.ha_disabled_hosts:
            return False
        return host.role is HostRole.ROUTING and host.resource_state not in _NO_HA_RESOURCE

    def _behind(self, host: HostRecord, silent_s: float) -> None:
        missed = f"missed pings for {silent_s:.1f} s"
        if not self.wants_ha(host):
            why = f"role {host.role.value}" if host.role is not HostRole.ROUTING else host.resource_state.value
            self.transition(host, HostEvent.NO_HA_TIMEOUT, f"{missed}; {why}: disconnected without investigation")
            stranded = [vm.name for vm in self.ctx.vms.on_host(host.id) if vm.ha_enabled and occupies(vm)]
            if stranded:
                self.ctx.event(
                    "warning",
                    f"host:{host.id}",
                    "ha.skipped",
                    f"{', '.join(stranded)} not restarted: no HA while the host is {why}",
                )
            self.ctx.out.append(DisconnectAgent(host.id, f"behind while {why}"))
            return
        self.transition(host, HostEvent.PING_TIMEOUT, missed, "warning")
        self.flaps.host_failed(self.ctx, host)
        self.work.schedule_for_host(host, f"{host.name} went silent")
        self.start_investigation(host)

    def on_timer(self, timer: HostTimer) -> None:
        host = self.ctx.hosts.get(timer.host_id)
        if host is None:
            return
        match timer:
            case InvestigationDeadline(host_id):
                if host_id in self.investigations:
                    self.conclude(self.investigations[host_id])
            case Reinvestigate():
                if host.status in (S.ALERT, S.INVESTIGATING):
                    if host.status is S.ALERT:
                        self.transition(host, HostEvent.REINVESTIGATE, "investigating again")
                    self.start_investigation(host)
            case RejoinDeadline(host_id):
                if host_id in self.awaiting_rejoin and host.status in (S.UP, S.CONNECTING):
                    self.awaiting_rejoin.discard(host_id)
                    # Restored as Up, and its agent has not come back within the startup grace: behind.
                    self._behind(host, self._silent_s(host))
            case FirstPingDue(host_id):
                if host_id in self.awaiting_first_ping and host.status in (S.UP, S.CONNECTING):
                    self.awaiting_first_ping.discard(host_id)
                    # Connected, and no ping arrived within its first-ping window: behind.
                    self._behind(host, self._silent_s(host))
            case PlannedWaitOver():
                if host.status is S.DISCONNECTED and self.wants_ha(host):
                    wait_s = self.ctx.config.planned_disconnect_wait_s
                    why = f"did not come back within {wait_s:.0f} s of goodbye"
                    self.transition(host, HostEvent.WAITED_TOO_LONG, why)
                    self.work.schedule_for_host(host, f"{host.name} did not come back after a planned disconnect")
                    self.start_investigation(host)
            case _:
                assert_never(timer)

    # ------------------------------------------------------------ investigation

    def start_investigation(self, host: HostRecord) -> None:
        config, ctx = self.ctx.config, self.ctx
        inv = Investigation(host.id, ctx.now, ctx.now + config.investigation_timeout_s)
        self.investigations[host.id] = inv
        check = CheckNeighbor(host.id, host.uuid, host.address, config.check_neighbor_timeout_s)
        for neighbor in self.ctx.up.after(host.id, config.neighbors_per_investigation):
            inv.pending.add(ctx.send(NeighborQuery(host.id), neighbor, check, config.check_neighbor_timeout_s))
            inv.neighbors_asked += 1
        if host.has_bmc:
            request_id = ctx.track(BmcQuery(host.id), host.id, config.check_neighbor_timeout_s)
            ctx.out.append(QueryBmc(request_id, host.id))
            inv.pending.add(request_id)
        if not inv.pending:
            self.conclude(inv)
        else:
            ctx.timers.schedule(InvestigationDeadline(host.id), inv.deadline_at)

    def investigation_dispatched(self, host_id: HostId) -> None:
        """Its questions left late (the store was slow): the answers get the whole investigation timeout."""
        inv = self.investigations.get(host_id)
        if inv is not None:
            inv.deadline_at = max(inv.deadline_at, self.ctx.now + self.ctx.config.investigation_timeout_s)
            self.ctx.timers.schedule(InvestigationDeadline(host_id), inv.deadline_at)

    def on_neighbor_answer(self, request_id: RequestId, query: NeighborQuery, done: f.CommandCompleted) -> None:
        inv = self.investigations.get(query.about)
        if inv is None or request_id not in inv.pending:
            return
        inv.pending.discard(request_id)
        if done.ok and isinstance(done.payload, f.NeighborCheck):
            check = done.payload
            inv.add_neighbor(check.tcp_reachable, check.icmp_reachable, check.heartbeat_age_s, self.ctx.now)
        if not inv.pending:
            self.conclude(inv)

    def on_bmc_answer(self, request_id: RequestId, query: BmcQuery, power: Bmc) -> None:
        inv = self.investigations.get(query.about)
        if inv is None or request_id not in inv.pending:
            return
        inv.pending.discard(request_id)
        inv.bmc = power
        if inv.bmc is Bmc.OFF or not inv.pending:
            self.conclude(inv)  # power off is proof enough: no need to wait for the neighbours

    def on_lease_answer(
        self, request_id: RequestId, query: LeaseQuery, prober: HostId, done: f.CommandCompleted
    ) -> None:
        inv = self.investigations.get(query.about)
        if inv is None or inv.leases is None or request_id not in inv.pending:
            return
        inv.pending.discard(request_id)
        payload = done.payload if done.ok and isinstance(done.payload, f.LeaseCheck) else None
        state, detail = (payload.state, payload.detail) if payload else ("unknown", done.error or "no answer")
        leaseprobe.answer(inv, request_id, self.ctx.host_name(prober), state, detail)
        if not inv.pending:
            self.conclude(inv)

    def _settle(self, inv: Investigation) -> None:
        self.ctx.timers.cancel(InvestigationDeadline(inv.host_id))
        for request_id in inv.pending:
            self.ctx.settle(request_id)  # late answers are ignored
        inv.pending.clear()

    def conclude(self, inv: Investigation) -> None:
        self._settle(inv)
        host = self.ctx.hosts[inv.host_id]
        if host.status is not S.INVESTIGATING:
            self.investigations.pop(inv.host_id, None)
            return
        config = self.ctx.config
        silent_s = self._silent_s(host)
        self_fence, bound_s = self.self_fence(host)
        heartbeat = classify_heartbeat(
            inv.heartbeat_age_s, silent_s, config.heartbeat_stale_after_s, bound_s, config.isolation_link_slack_s
        )
        confirmed_by = self.confirmed_by.get(host.id)
        operator = Operator.NO if confirmed_by is None else Operator.CONFIRMED
        verdict, reason = decide(inv.bmc, heartbeat, inv.reach(), self_fence, operator, inv.lease())
        if verdict is Verdict.CHECK_LEASES:
            leaseprobe.start(self.ctx, host, inv)  # a second phase of the same investigation
            if inv.pending:
                self.ctx.timers.schedule(InvestigationDeadline(host.id), inv.deadline_at)
                return
            verdict, reason = decide(inv.bmc, heartbeat, inv.reach(), self_fence, operator, inv.lease())
        self.investigations.pop(inv.host_id, None)
        self.confirmed_by.pop(host.id, None)
        leaseprobe.tell_held(self.ctx, host, inv, self.told_held.setdefault(host.id, set()))
        if inv.heartbeat_age_s is not None and not inv.reached:
            self.heartbeat_seen[host.id] = (inv.heartbeat_age_s, self.ctx.now)
        else:
            self.heartbeat_seen.pop(host.id, None)
        evidence = f"{reason}; {inv.summary(heartbeat, self_fence)}"
        if confirmed_by is not None:
            evidence += f"; confirm-down by {confirmed_by}"
            if verdict is not Verdict.DEAD:
                self.ctx.event(
                    "alert",
                    f"host:{host.id}",
                    "host.confirm.refused",
                    f"confirm-down by {confirmed_by} not applied: {reason}",
                )
        if verdict is Verdict.DEAD:
            self.transition(host, HostEvent.VERDICT_DOWN, evidence)
            self._host_dead(host)
        elif verdict is Verdict.ALIVE:
            self.transition(host, HostEvent.VERDICT_ALIVE, f"{evidence}; its VMs are left running")
            self.ctx.timers.schedule(Reinvestigate(host.id), self.ctx.now + config.investigate_retry_interval_s)
        else:
            self._fence_or_wait(host, inv, heartbeat, evidence, silent_s, self_fence)

    def _silent_s(self, host: HostRecord) -> float:
        """Seconds since the manager last heard the host's agent. The record saved when the host went silent carries
        its last ping, so a restarted manager keeps counting from there (stored on the wall clock, converted back to
        the core's monotonic clock when loaded); without one, the count starts when this manager started."""
        last = host.last_ping_at if host.last_ping_at is not None else self.ctx.started_at
        return self.ctx.now - last

    def _fence_or_wait(
        self,
        host: HostRecord,
        inv: Investigation,
        heartbeat: Heartbeat,
        evidence: str,
        silent_s: float,
        self_fence: SelfFence,
    ) -> None:
        config, ctx = self.ctx.config, self.ctx
        silent, managed = silent_share(ctx.hosts.values())
        blocked = fence_block_reason(
            now=ctx.now,
            started_at=ctx.started_at,
            startup_grace_s=config.startup_grace_s,
            silent=silent,
            managed=managed,
            max_silent_ratio=config.fence_max_silent_ratio,
        )
        if host.has_bmc and blocked is None:
            self.transition(host, HostEvent.VERDICT_UNKNOWN, f"{evidence}; fencing")
            request_id = ctx.track(FenceRequest(host.id), host.id, config.fence_timeout_s)
            ctx.out.append(Fence(request_id, host.id))
            self.work.host_fencing(host)
            return
        delay_s = config.investigate_retry_interval_s
        if blocked is None and self_fence is SelfFence.NONE:
            blocked = "no BMC to fence it and no armed watchdog behind its agent: its silence proves nothing"
            self.tell_operator(host)
        elif blocked is None and inv.lease() is Lease.HELD:
            blocked = "no BMC to fence it and a disk lease of its VMs is held: waiting for it to be released"
        elif blocked is None:
            blocked = "no BMC to fence it"
            _, bound_s = self.self_fence(host)
            if heartbeat is Heartbeat.STALE and inv.heartbeat_age_s is not None:
                # Re-check just after the watchdog-backed self-fence has surely happened.
                wait_s = seconds_until_stale_long(inv.heartbeat_age_s, silent_s, bound_s, config.isolation_link_slack_s)
                delay_s = max(1.0, wait_s + 0.5)
            blocked += f"; waiting for its heartbeat to stay stale {bound_s:.0f} s (watchdog-backed self-fence)"
        self.ctx.event("alert", f"host:{host.id}", "fence.skipped", f"not fencing: {blocked}; its VMs stay put")
        self.transition(host, HostEvent.FENCE_BLOCKED, f"{evidence}; re-investigating in {delay_s:.1f} s")
        ctx.timers.schedule(Reinvestigate(host.id), ctx.now + delay_s)

    def down_at_link_loss(self, host: HostRecord, evidence: str) -> None:
        """Evidence at once (linkloss.py): its link broke and its BMC reads off — Down now, not after ping.timeout.
        The host is Down (and its VMs recorded off) before its HA VMs get work items, so they find it dead."""
        self.pingmap.remove(host.id)
        self.transition(host, HostEvent.LINK_LOST_POWER_OFF, evidence)
        self.flaps.host_failed(self.ctx, host)
        self._host_dead(host)
        self.work.schedule_for_host(host, f"{host.name} lost its link and its power")

    def tell_operator(self, host: HostRecord) -> None:
        """Once per silence: why a host that cannot be fenced is not declared dead, and what the operator can do."""
        if host.id not in self.told_operator:
            self.told_operator.add(host.id)
            selffence.tell_operator(self.ctx, host)

    def on_confirmed_down(self, fact: f.HostConfirmedDown) -> None:
        """An operator says the host is off: evidence for a new investigation (signs of life still win)."""
        host = self.ctx.hosts.get(fact.host_id)
        if host is None:
            return
        if host.status not in (S.INVESTIGATING, S.ALERT):  # silent statuses: its agent does not report
            self.ctx.event(
                "warning",
                f"host:{host.id}",
                "host.confirm.refused",
                f"confirm-down by {fact.by} ignored: the host is {host.status.value}",
            )
            return
        self.confirmed_by[host.id] = fact.by
        self.ctx.event(
            "alert", f"host:{host.id}", "host.confirmed.down", f"{fact.by} confirmed {host.name} is powered off"
        )
        if host.status is S.INVESTIGATING and host.id in self.investigations:
            return  # the investigation in flight decides with this evidence
        self.ctx.timers.cancel(Reinvestigate(host.id))
        if host.status is S.ALERT:
            self.transition(host, HostEvent.REINVESTIGATE, f"investigating again: confirm-down by {fact.by}")
        self.start_investigation(host)

    def _host_dead(self, host: HostRecord) -> None:
        self.told_operator.discard(host.id)
        self.told_held.pop(host.id, None)
        self.fence_failures.pop(host.id, None)
        self.ctx.timers.cancel(Reinvestigate(host.id))
        self.power.host_dead(host)
        self.work.host_resolved(host.id)

    # ------------------------------------------------------------ fencing

    def on_fence_completed(self, fact: f.FenceCompleted, current: bool) -> None:
        host = self.ctx.hosts.get(fact.host_id)
        if host is None:
            return
        if fact.ok and host.status in (S.FENCING, S.ALERT, S.INVESTIGATING):
            self.investigations.pop(host.id, None)
            self.ctx.timers.cancel(InvestigationDeadline(host.id))
            off = "it was already off" if fact.already_off else "power off confirmed"
            self.transition(host, HostEvent.FENCE_OK, f"{off}{'; ' + fact.detail if fact.detail else ''}")
            self._host_dead(host)
        elif not fact.ok and current and host.status is S.FENCING:
            self.fence_failed(host, fact.detail or "fence failed")
        elif not current or host.status in DEAD:
            self.ctx.event("info", f"host:{host.id}", "fence.late", f"late fence result ignored (ok={fact.ok})")

    def fence_failed(self, host: HostRecord, detail: str) -> None:
        config = self.ctx.config
        failures = self.fence_failures.get(host.id, 0) + 1
        self.fence_failures[host.id] = failures
        delay_s = fence_backoff_s(failures, config.fence_retry_interval_s, config.fence_retry_max_interval_s)
        seen = self.heartbeat_seen.get(host.id)
        self_fence, bound_s = self.self_fence(host)
        if self_fence is SelfFence.NONE:
            self.tell_operator(host)
        elif seen is not None:
            age_now = seen[0] + self.ctx.now - seen[1]
            wait_s = seconds_until_stale_long(age_now, self._silent_s(host), bound_s, config.isolation_link_slack_s)
            delay_s = min(delay_s, max(1.0, wait_s + 0.5))
        self.transition(
            host,
            HostEvent.FENCE_FAILED,
            f"fence attempt {failures} failed: {detail}; its VMs stay put; re-investigating in {delay_s:.1f} s",
        )
        self.ctx.timers.schedule(Reinvestigate(host.id), self.ctx.now + delay_s)

    # ------------------------------------------------------------ operator

    def remove(self, host: HostRecord) -> None:
        self.pingmap.remove(host.id)
        self.ctx.connected.discard(host.id)
        self._forget_silence(host.id)
        self.transition(host, HostEvent.REMOVE, "removed by the operator")
