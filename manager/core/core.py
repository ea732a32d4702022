"""The manager's decision core: facts and the time in, actions out. No I/O, no clock, no threads.

Invariants (fencing safety above all):
- A VM is started on a new host only after its old host is proven dead (BMC says off; or unreachable with a storage
  heartbeat stale beyond the agent's self-fence time, when a watchdog armed at its last contact guarantees that
  self-fence; or confirmed off by an operator, with nothing showing it alive) or fenced (power off confirmed), or
  its Up host reported it off. Never two running copies: a VM found running elsewhere is followed, a StartVm whose
  outcome is unknown keeps the VM recorded on its target until that host says otherwise.
- Every state change and every skipped action yields a RecordEvent with its reason.
- Work is idempotent: every command and fence has a request id unique across manager restarts (request_prefix +
  counter); answers to settled or unknown ids are ignored; every command times out inside the core at its deadline.
- An impossible host transition raises TransitionError (hoststate.TRANSITIONS): loud, never a silent stall.

Theory of operation: the driver calls `handle(fact, now)` for every fact and `tick(now)` whenever
`next_deadline()` is reached, and carries out the returned actions (persisting SaveHost/SaveVm/SaveWork of one
batch in one transaction before sending its commands). Rebuilding a Core from the persisted records is a manager
restart: agents get a ping timeout to reconnect, interrupted investigations start over, and nothing is fenced during
`startup.grace`.

The composition, a DAG (tests/unit/core/test_imports.py fails on a circle): scheduler (HA work and placement)
depends on nothing but the `Ctx`; powersync (VM power states) asks the scheduler for restarts; hostflow (ping map,
monitor, host states, investigation, fencing) tells the scheduler and powersync what it learnt; operator (operator
facts) asks the scheduler and hostflow; linkloss (evidence at once: the BMC asked when an agent link breaks) asks
hostflow. Each flow declares what it needs as a Protocol and never imports another
flow; Core wires them. What one flow learns for another (Up hosts, held-out hosts, pending absences) lives in the
`Ctx`'s leaf indexes (core/shared.py). The configuration has one owner: `Ctx.config`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import assert_never

from kvmha.manager.core import capacityplan
from kvmha.manager.core import facts as f
from kvmha.manager.core.actions import Action
from kvmha.manager.core.config import ConfigError, CoreConfig
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.hostflow import HostFlow
from kvmha.manager.core.investigation import Bmc
from kvmha.manager.core.linkloss import LinkLoss
from kvmha.manager.core.maintenance import MaintenanceFlow
from kvmha.manager.core.migration import MigrationFlow
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostId,
    HostRecord,
    HostStatus,
    RequestId,
    VmId,
    VmRecord,
    VmState,
    WorkId,
    WorkType,
)
from kvmha.manager.core.operator import OperatorFlow
from kvmha.manager.core.powersync import PowerSync
from kvmha.manager.core.routing import (
    AbsenceGraceOver,
    BmcQuery,
    CommandDeadline,
    FenceRequest,
    FirstPingDue,
    InvestigationDeadline,
    LeaseQuery,
    LinkLossQuery,
    LinkLossRecheck,
    MaintenanceDue,
    MigrationAttempt,
    MigrationCancel,
    NeighborQuery,
    OperatorDestroy,
    OperatorStop,
    Pending,
    PlannedWaitOver,
    Reinvestigate,
    RejoinDeadline,
    StartAttempt,
    StartConfirmDeadline,
    TimerKey,
    WorkDue,
)
from kvmha.manager.core.scheduler import Scheduler
from kvmha.manager.core.vmindex import occupies


class Core:
    def __init__(
        self,
        config: CoreConfig,
        *,
        now: float,
        hosts: Iterable[HostRecord] = (),
        vms: Iterable[VmRecord] = (),
        works: Iterable[HaWorkRecord] = (),
        next_work_id: int = 1,
        request_prefix: str = "",
    ) -> None:
        """`works`: the active items this manager holds and the finished ones of the restart window (their restarts
        count towards restart.max.per.window); `next_work_id`: above every id ever stored."""
        self._ctx = ctx = Ctx(config, now, request_prefix)
        for vm in vms:
            ctx.vms.add(vm)
        # The flows form a DAG through narrow interfaces: each gets, at construction, only what it asks of the
        # flows below it (Protocols declared by the consumer); shared facts go through the Ctx's leaf indexes.
        self._sched = Scheduler(ctx, next_work_id)
        self._migration = MigrationFlow(ctx, restarts=self._sched)
        self._power = PowerSync(ctx, restarts=self._sched, migration=self._migration)
        self._hosts = HostFlow(ctx, work=self._sched, power=self._power)
        self._linkloss = LinkLoss(ctx, hosts=self._hosts)
        self._maintenance = MaintenanceFlow(ctx, migrator=self._migration)
        self._operator = OperatorFlow(
            ctx, work=self._sched, hosts=self._hosts, life=self._maintenance, migration=self._migration
        )
        for host in sorted(hosts, key=lambda h: h.id):
            self._hosts.restore(host)
            self._maintenance.restore(host)
        for work in sorted(works, key=lambda w: w.id):
            if work.type is WorkType.MIGRATION:
                self._migration.restore(work)
            else:
                self._sched.restore(work)
        for vm in list(ctx.vms):
            self._migration.restore_vm(vm)
        self._startup_actions = ctx.out
        ctx.out = []

    # ------------------------------------------------------------ driver API

    def handle(self, fact: f.Fact, now: float, received_at: float | None = None) -> list[Action]:
        """`received_at`: when the fact arrived at the manager (default: `now`). A ping counts from its arrival,
        however long it waited for the driver: a backlog is not silence."""
        ctx = self._begin(now)
        ctx.received_at = ctx.now if received_at is None else min(received_at, ctx.now)
        self._dispatch(fact)
        return self._end(ctx)

    def tick(self, now: float) -> list[Action]:
        """Run everything due at `now`: the monitor, command and investigation deadlines, retries, grace periods.
        The caller promises that every fact received before `now` has been handled (the driver ticks only after
        its inbox's batch); silence is judged at `now`, even if the core's clock has moved past it (commands that
        left late are handled at the time they left, before pings that arrived meanwhile)."""
        ctx = self._begin(now)
        self._hosts.monitor(now)
        for key in ctx.timers.pop_due(now):
            ctx.decisions += 1
            self._on_timer(key)
        return self._end(ctx)

    def next_deadline(self) -> float | None:
        behind_at, timer_at = self._hosts.next_deadline(), self._ctx.timers.next_at()
        if behind_at is None or timer_at is None:
            return timer_at if behind_at is None else behind_at
        return min(behind_at, timer_at)

    # ------------------------------------------------------------ read-only views

    def plan_failure(self, failed: Sequence[HostId]) -> list[capacityplan.PlannedVm]:
        """What-if: what the core would do if `failed` hosts lost power now (core/capacityplan.py). Changes nothing."""
        return capacityplan.plan_failure(self._world(), failed)

    def _world(self) -> capacityplan.World:
        return capacityplan.world_of(self._ctx, self._sched.placement_cursor, self._sched.start_times.estimate())

    def headroom(self) -> list[capacityplan.Headroom]:
        return capacityplan.headroom(self._world())

    def admission(self, vm_id: VmId, *, ha_on: bool = False) -> capacityplan.Admission:
        """Admission control for an operator start of this VM, or (`ha_on`) for switching its HA on while it runs
        (the core refuses either the same way when the fact comes)."""
        vm = self._ctx.vms.get(vm_id)
        if vm is None:
            return capacityplan.Admission(True)
        if ha_on:
            if vm.ha_enabled or not occupies(vm):
                return capacityplan.Admission(True)  # nothing changes, or nothing runs: its start is checked
        elif not vm.ha_enabled or vm.state not in (VmState.STOPPED, VmState.ERROR):
            return capacityplan.Admission(True)
        return capacityplan.admission(capacityplan.world_of(self._ctx, self._sched.placement_cursor), vm)

    def worst_failure(self) -> tuple[tuple[HostId, ...], list[capacityplan.PlannedVm]]:
        """The admission.host.failures hosts whose loss strands the most HA VMs, and the plan for it."""
        return capacityplan.worst_failure(self._world(), max(1, self._ctx.config.admission_host_failures))

    @property
    def config(self) -> CoreConfig:
        return self._ctx.config

    @property
    def hosts(self) -> Mapping[HostId, HostRecord]:
        return self._ctx.hosts

    def vm(self, vm_id: VmId) -> VmRecord | None:
        return self._ctx.vms.get(vm_id)

    @property
    def vms(self) -> list[VmRecord]:
        return list(self._ctx.vms)

    @property
    def works(self) -> Mapping[WorkId, HaWorkRecord]:
        return self._ctx.works

    @property
    def decisions(self) -> int:
        return self._ctx.decisions

    def host_status(self, host_id: HostId) -> HostStatus | None:
        host = self._ctx.hosts.get(host_id)
        return host.status if host else None

    # ------------------------------------------------------------ internals

    def _begin(self, now: float) -> Ctx:
        ctx = self._ctx
        ctx.now = max(ctx.now, now)  # time never runs backwards inside the core
        # Actions decided while restoring (restarted investigations) go out with the first batch.
        ctx.out, self._startup_actions = self._startup_actions, []
        ctx.decisions += 1
        ctx.received_at = ctx.now
        return ctx

    def _end(self, ctx: Ctx) -> list[Action]:
        actions, ctx.out = ctx.out, []
        return actions

    def _dispatch(self, fact: f.Fact) -> None:
        """Every fact type has exactly one handler; mypy checks the match is exhaustive. Most frequent first."""
        hosts, operator = self._hosts, self._operator
        match fact:
            case f.HeartbeatReceived():
                hosts.on_heartbeat(fact)
            case f.PowerStateReported():
                self._on_power_report(fact)
            case f.CommandCompleted():
                self._on_command_completed(fact)
            case f.MigrationProgressed():
                self._migration.on_progress(fact)
            case f.AgentConnected():
                hosts.on_agent_connected(fact)
            case f.AgentHeard():
                hosts.on_agent_heard(fact)
            case f.InventoryChanged():
                hosts.on_inventory(fact)
            case f.AgentDisconnected():
                self._linkloss.on_disconnected(fact)  # first: it reads whether this link was the open one
                hosts.on_agent_disconnected(fact)
                self._migration.link_lost(fact.host_id)
            case f.FenceCompleted():
                self._on_fence_completed(fact)
            case f.BmcPowerReported():
                self._on_bmc_reported(fact)
            case f.CommandsDispatched():
                self._on_dispatched(fact)
            case f.StoreRecovered():
                hosts.on_store_recovered(fact)
            case f.HostRegistered():
                operator.host_registered(fact)
            case f.HostRemoved():
                operator.host_removed(fact)
            case f.HostMaintenanceChanged():
                operator.host_maintenance(fact)
            case f.HostBmcChanged():
                operator.host_bmc(fact)
            case f.HostConfirmedDown():
                hosts.on_confirmed_down(fact)
            case f.HostEnabledChanged():
                operator.host_enabled(fact)
            case f.VmMigrateRequested():
                operator.vm_migrate(fact)
            case f.VmMigrationCancelRequested():
                self._migration.cancel_requested(fact.vm_id)
            case f.VmRegistered():
                operator.vm_registered(fact)
            case f.VmStartRequested():
                operator.vm_start(fact)
            case f.VmStopRequested():
                operator.vm_stop(fact)
            case f.VmDeleted():
                operator.vm_deleted(fact)
            case f.VmHaChanged():
                operator.vm_ha(fact)
            case f.ConfigChanged():
                self._on_config_changed(fact)
            case _:
                assert_never(fact)

    def _on_timer(self, key: TimerKey) -> None:
        match key:
            case CommandDeadline(request_id):
                pending = self._ctx.settle(request_id)
                if pending is not None:
                    seconds = self._ctx.now - pending.sent_at
                    timed_out = f.CommandCompleted(request_id, False, f"timed out after {seconds:.1f} s")
                    self._route_answer(request_id, pending, timed_out)
            case InvestigationDeadline() | Reinvestigate() | PlannedWaitOver() | RejoinDeadline() | FirstPingDue():
                self._hosts.on_timer(key)
            case LinkLossRecheck(host_id):
                self._linkloss.recheck(host_id)
            case WorkDue(work_id):
                work = self._ctx.works.get(work_id)
                if work is not None:
                    self._sched.evaluate(work)
            case StartConfirmDeadline(work_id):
                self._sched.on_confirm_timeout(work_id)
            case AbsenceGraceOver(vm_id):
                self._power.missing_timeout(vm_id)
            case MaintenanceDue(host_id):
                self._maintenance.due(host_id)
            case _:
                assert_never(key)

    def _on_power_report(self, fact: f.PowerStateReported) -> None:
        host = self._ctx.hosts.get(fact.host_id)
        if host is None or host.id not in self._ctx.connected:
            return  # a report from a link that is gone says nothing reliable
        self._power.on_report(host, fact)
        if fact.full and fact.hypervisor_connected:
            self._hosts.on_ready(host)

    def _on_command_completed(self, fact: f.CommandCompleted) -> None:
        pending = self._ctx.pending.get(fact.request_id)
        if pending is not None and not isinstance(pending.owner, (FenceRequest, BmcQuery, LinkLossQuery)):
            # Fences and BMC queries are answered by the fencing adapter (FenceCompleted / BmcPowerReported) or
            # time out here; an agent's CommandCompleted with their id settles nothing.
            self._ctx.settle(fact.request_id)
            self._route_answer(fact.request_id, pending, fact)

    def _route_answer(self, request_id: RequestId, pending: Pending, done: f.CommandCompleted) -> None:
        """The answer to a command (or its timeout), to whoever sent it."""
        owner = pending.owner
        match owner:
            case NeighborQuery():
                self._hosts.on_neighbor_answer(request_id, owner, done)
            case LeaseQuery():
                self._hosts.on_lease_answer(request_id, owner, pending.host_id, done)
            case BmcQuery():
                self._hosts.on_bmc_answer(request_id, owner, Bmc.UNKNOWN)  # only its timeout comes this way
            case LinkLossQuery():
                self._linkloss.on_answer(request_id, owner, Bmc.UNKNOWN)  # likewise
            case FenceRequest(host_id):
                host = self._ctx.hosts.get(host_id)
                if host is not None and host.status is HostStatus.FENCING:
                    self._hosts.fence_failed(host, done.error)
            case StartAttempt(work_id):
                self._sched.on_start_result(work_id, done.ok, done.error)
            case OperatorStop(vm_id):
                self._operator.stop_result(vm_id, done.ok, done.error)
            case OperatorDestroy():
                self._operator.destroy_result(owner, pending.host_id, done.ok, done.error)
            case MigrationAttempt(work_id):
                self._migration.on_result(work_id, done)
            case MigrationCancel(work_id):
                self._migration.on_cancel_answer(work_id, done)
            case _:
                assert_never(owner)

    def _on_fence_completed(self, fact: f.FenceCompleted) -> None:
        pending = self._ctx.pending.get(fact.request_id)
        current = pending is not None and pending.owner == FenceRequest(fact.host_id)
        if current:
            self._ctx.settle(fact.request_id)
        self._hosts.on_fence_completed(fact, current)

    def _on_bmc_reported(self, fact: f.BmcPowerReported) -> None:
        pending = self._ctx.pending.get(fact.request_id)
        owner = pending.owner if pending is not None else None
        if isinstance(owner, BmcQuery) and owner.about == fact.host_id:
            self._ctx.settle(fact.request_id)
            self._hosts.on_bmc_answer(fact.request_id, owner, Bmc(fact.power))
        elif isinstance(owner, LinkLossQuery) and owner.about == fact.host_id:
            self._ctx.settle(fact.request_id)
            self._linkloss.on_answer(fact.request_id, owner, Bmc(fact.power))

    def _on_dispatched(self, fact: f.CommandsDispatched) -> None:
        investigated: set[HostId] = set()
        for request_id in fact.request_ids:
            pending = self._ctx.dispatched(request_id)
            if pending is not None and isinstance(pending.owner, (NeighborQuery, LeaseQuery, BmcQuery)):
                investigated.add(pending.owner.about)
        for host_id in sorted(investigated):
            self._hosts.investigation_dispatched(host_id)

    def _on_config_changed(self, fact: f.ConfigChanged) -> None:
        try:
            config = CoreConfig.from_mapping({fact.name: fact.value}, base=self._ctx.config)
        except ConfigError as error:
            self._ctx.event("warning", "manager", "config.rejected", f"{error}; keeping the old value")
            return
        self._ctx.config = config
        self._ctx.event("info", "manager", "config.changed", f"{fact.name} = {fact.value}")
