"""HA work: scheduleRestart / scheduleRestartForVmsOnHost, and restart(work) in CloudStack's order.

restart(work): (1) drop it if the VM is gone, its HA was switched off or it changed since (update_count);
(2) check where it last ran (core/clearance.py): a Down/Fenced host, or an Up host that reports it off, is safe; a
host still being investigated or fenced means wait (the host's verdict wakes the work); an Up host that reports it
on means it runs: cancel; (3) pick a target (placement); (4) StartVm; (5) Done only when the target's power report
shows it on. Every step change reads core/workstep.py's table. Failed starts retry after `restart.retry.interval`
up to `max.retries`, then Error with an alert. A VM that does not fit anywhere waits (retried later, no attempt
used) with an event that says why.

At most one active item per VM (a duplicate report only adds an event), at most `ha.workers` items starting at once,
higher `restart_priority` first.
"""

from __future__ import annotations

import heapq
from typing import assert_never

from kvmha.manager.core.actions import Severity, StartVm
from kvmha.manager.core.clearance import Clearance, host_clearance
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.facts import NOT_DELIVERED
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostId,
    HostRecord,
    HostStatus,
    PowerState,
    RequestId,
    VmId,
    VmRecord,
    VmState,
    WorkId,
    WorkStep,
    WorkType,
)
from kvmha.manager.core.routing import StartAttempt, StartConfirmDeadline, WorkDue
from kvmha.manager.core.starttimes import StartTimes
from kvmha.manager.core.targeting import Targeting
from kvmha.manager.core.vmindex import KEEP, Keep
from kvmha.manager.core.vmstate import VmEvent
from kvmha.manager.core.workstep import WorkEvent, next_step

OPERATOR_START = "operator start"
_RESTARTABLE = frozenset({VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING})


def own_death(reason: str) -> bool:
    """Was the item scheduled because the VM itself died? Power-state sync's reasons start with the power state its
    Up host reported (PowerOff, PowerReportMissing); host HA's name the host that went silent, and an operator start
    is neither. Only the VM's own deaths count toward its crash loop (`restart.max.per.window`): a VM that was unlucky
    with its hosts never ends in Error for it."""
    return reason.startswith((PowerState.POWER_OFF.value, PowerState.POWER_REPORT_MISSING.value))


class Scheduler:
    def __init__(self, ctx: Ctx, next_work_id: int = 1) -> None:
        self.ctx = ctx
        self.active_by_vm: dict[int, WorkId] = {}
        self.ready: list[tuple[int, float, WorkId]] = []  # (-priority, created_at, id)
        self.in_progress: set[WorkId] = set()
        self.waiting_on_host: dict[HostId, set[WorkId]] = {}
        self._waits_for: dict[WorkId, HostId] = {}
        self._waiting_why: dict[WorkId, str] = {}
        self.restarts: dict[VmId, list[float]] = {}  # times of completed HA restarts, per VM
        self._next_work_id = next_work_id
        self._batching = False  # while a host's items are released together, so priorities order them
        self.targets = Targeting(ctx)
        self._attempts: dict[WorkId, RequestId] = {}  # the StartVm in flight of each item in progress
        self.start_times = StartTimes()  # StartVm sent -> shown on, for the planner's estimate

    # ------------------------------------------------------------ restore

    def restore(self, work: HaWorkRecord) -> None:
        self.ctx.works[work.id] = work
        self._next_work_id = max(self._next_work_id, work.id + 1)
        if work.step is WorkStep.DONE and work.type is WorkType.HA and own_death(work.reason):
            self.restarts.setdefault(work.vm_id, []).append(work.updated_at)
        if not work.step.active:
            return
        self.active_by_vm[work.vm_id] = work.id
        if work.step is WorkStep.RESTARTING:
            # The StartVm answer died with the old manager: the VM may or may not run on its target. It stays in
            # progress; the target's power report confirms it (Done), or the confirmation deadline treats it as a
            # start of unknown outcome (the VM stays recorded on the target until that host says otherwise).
            vm = self.ctx.vms.get(work.vm_id)
            if vm is not None:
                self.ctx.vms.set_power(vm, PowerState.POWER_UNKNOWN, self.ctx.now)
            self.in_progress.add(work.id)
            self.ctx.timers.schedule(StartConfirmDeadline(work.id), self.ctx.now + self.ctx.config.start_timeout_s)
            return
        self.ctx.timers.schedule(WorkDue(work.id), self.ctx.now)

    # ------------------------------------------------------------ scheduling

    def new_work_id(self) -> WorkId:
        """Work ids are one sequence for every work type (migration items are numbered here too)."""
        work_id = WorkId(self._next_work_id)
        self._next_work_id += 1
        return work_id

    def schedule_for_host(self, host: HostRecord, reason: str) -> None:
        """scheduleRestartForVmsOnHost: one work item per HA VM that should be running there."""
        self._batching = True
        for vm in self.ctx.vms.on_host(host.id):
            if vm.ha_enabled and vm.state in _RESTARTABLE:
                self.schedule_restart(vm, reason)
        self._batching = False
        self.pump()

    def schedule_restart(self, vm: VmRecord, reason: str, *, operator: bool = False) -> WorkId | None:
        ctx = self.ctx
        existing = self.active_by_vm.get(vm.id)
        if existing is not None:
            ctx.event(
                "info",
                f"vm:{vm.id}",
                "work.duplicate",
                f"restart already scheduled (work {existing}); ignoring: {reason}",
            )
            return None
        if not operator and own_death(reason) and self._over_restart_limit(vm):
            return None
        work = HaWorkRecord(
            id=WorkId(self._next_work_id),
            vm_id=vm.id,
            type=WorkType.HA,
            step=WorkStep.SCHEDULED,
            host_id=vm.host_id,
            previous_state=vm.state,
            vm_update_count=vm.update_count,
            time_to_try_at=ctx.now,
            reason=OPERATOR_START if operator else reason,
            created_at=ctx.now,
        )
        self._next_work_id += 1
        ctx.works[work.id] = work
        self.active_by_vm[vm.id] = work.id
        ctx.save_work(work)
        ctx.event(
            "info",
            f"work:{work.id}",
            "work.scheduled",
            f"{'start' if operator else 'restart'} of {vm.name} scheduled ({work.reason})",
        )
        self.evaluate(work)
        return work.id

    def _over_restart_limit(self, vm: VmRecord) -> bool:
        config, now = self.ctx.config, self.ctx.now
        recent = [t for t in self.restarts.get(vm.id, []) if t > now - config.restart_window_s]
        self.restarts[vm.id] = recent
        if len(recent) < config.restart_max_per_window:
            return False
        self.ctx.vms.update(vm, VmEvent.RESTART_LIMIT)
        self.ctx.save_vm(vm)
        self.ctx.event(
            "alert",
            f"vm:{vm.id}",
            "vm.restart.limit",
            f"restarted {len(recent)} times in {config.restart_window_s:.0f} s after dying itself (restarts after "
            "host failures do not count): a crash loop, not restarted again, state Error",
        )
        return True

    # ------------------------------------------------------------ restart(work)

    def evaluate(self, work: HaWorkRecord) -> None:
        """Run the checks of restart(work) and move the item on: cancel, wait, or queue it for a worker."""
        if not work.step.active or work.id in self.in_progress:
            return
        vm = self.ctx.vms.get(work.vm_id)
        problem = self._stale(work, vm)
        if problem is not None or vm is None:
            self.finish(work, WorkEvent.CANCEL, problem or "VM deleted")
            return
        clearance, why = host_clearance(vm, self.ctx)
        match clearance:
            case Clearance.CANCEL:
                self.finish(work, WorkEvent.CANCEL, why)
            case Clearance.WAIT_HOST:
                assert vm.host_id is not None
                self.waiting_on_host.setdefault(vm.host_id, set()).add(work.id)
                self._waits_for[work.id] = vm.host_id
                host = self.ctx.hosts[vm.host_id]
                event = WorkEvent.WAIT_FENCE if host.status is HostStatus.FENCING else WorkEvent.WAIT_VERDICT
                self._wait(work, event, f"waits for a verdict ({why})")
            case Clearance.WAIT_POWER:
                self._wait(work, WorkEvent.WAIT_POWER, f"waits: {why}")
                retry_at = self.ctx.now + self.ctx.config.investigate_retry_interval_s
                self.ctx.timers.schedule(WorkDue(work.id), retry_at)
            case Clearance.SAFE:
                if work.time_to_try_at > self.ctx.now:
                    self.ctx.timers.schedule(WorkDue(work.id), work.time_to_try_at)
                    return
                heapq.heappush(self.ready, (-vm.restart_priority, work.created_at, work.id))
                if not self._batching:
                    self.pump()
            case _:
                assert_never(clearance)

    def _stale(self, work: HaWorkRecord, vm: VmRecord | None) -> str | None:
        if vm is None:
            return "VM deleted"
        if not work.reason.startswith(OPERATOR_START) and not vm.ha_enabled:
            return "HA switched off for the VM"
        if vm.update_count != work.vm_update_count:
            return f"VM changed since scheduled (now {vm.state.value} on {self.ctx.host_name(vm.host_id)})"
        return None

    def pump(self) -> None:
        while self.ready and len(self.in_progress) < self.ctx.config.ha_workers:
            _, _, work_id = heapq.heappop(self.ready)
            work = self.ctx.works.get(work_id)
            if work is not None and work.step.active and work.id not in self.in_progress:
                self._start(work)

    def _start(self, work: HaWorkRecord) -> None:
        ctx = self.ctx
        vm = ctx.vms.get(work.vm_id)
        clearance, why = host_clearance(vm, self.ctx) if vm is not None else (Clearance.CANCEL, "VM deleted")
        if vm is None or clearance is not Clearance.SAFE or self._stale(work, vm):
            self.evaluate(work)  # something changed while it queued
            return
        target, reason = self._place(vm)
        if target is None:
            work.time_to_try_at = ctx.now + ctx.config.restart_retry_interval_s
            self._move(work, WorkEvent.NO_CAPACITY)
            ctx.timers.schedule(WorkDue(work.id), work.time_to_try_at)
            ctx.event(
                "warning",
                f"vm:{vm.id}",
                "vm.no.capacity",
                f"waits: {reason}; retry in {ctx.config.restart_retry_interval_s:.0f} s",
            )
            return
        work.tried += 1
        work.taken_by, work.taken_at = "core", ctx.now
        self._own_update(work, vm, VmEvent.START_SENT, host_id=target.id, power=PowerState.POWER_UNKNOWN)
        ctx.save_vm(vm)
        self._move(work, WorkEvent.START)
        self.in_progress.add(work.id)
        request = StartVm(vm.uuid, vm.domain_xml)
        self._attempts[work.id] = ctx.send(StartAttempt(work.id), target.id, request, ctx.config.start_timeout_s)
        ctx.event(
            "info",
            f"vm:{vm.id}",
            "vm.starting",
            f"starting on {target.name} ({why}; attempt {work.tried}/{ctx.config.max_retries})",
        )

    @property
    def placement_cursor(self) -> int:
        return self.targets.cursor

    def _place(self, vm: VmRecord) -> tuple[HostRecord | None, str]:
        return self.targets.place(vm)  # flapping hosts only when no stable host fits (core/targeting.py)

    # ------------------------------------------------------------ outcomes

    def on_start_result(self, work_id: WorkId, ok: bool, error: str) -> None:
        work = self.ctx.works.get(work_id)
        if work is None or work.step is not WorkStep.RESTARTING:
            return
        self._attempts.pop(work.id, None)
        if ok:
            confirm_by = self.ctx.now + self.ctx.config.start_confirm_timeout_s
            self.ctx.timers.schedule(StartConfirmDeadline(work.id), confirm_by)
        elif error.startswith(NOT_DELIVERED):
            # The command never left the manager: nothing can have started. Another host, at once.
            vm = self.ctx.vms.get(work.vm_id)
            if vm is not None and vm.host_id is not None:
                self.targets.undeliverable(vm.host_id)
            self._attempt_void(work, error)
        else:
            self._start_failed(work, error or "start failed", maybe_running=error.startswith("timed out"))

    def on_confirm_timeout(self, work_id: WorkId) -> None:
        work = self.ctx.works.get(work_id)
        if work is not None and work.step is WorkStep.RESTARTING:
            self._start_failed(work, "no power report showed it on", maybe_running=True)

    def start_reported_off(self, vm: VmRecord) -> bool:
        """The target reported the VM off while we were starting it there: the attempt failed."""
        work = self._active(vm)
        if work is None or work.step is not WorkStep.RESTARTING:
            return False
        self._start_failed(work, "target reports it off", maybe_running=False)
        return True

    def _start_failed(self, work: HaWorkRecord, reason: str, *, maybe_running: bool) -> None:
        ctx = self.ctx
        self._attempts.pop(work.id, None)
        self.in_progress.discard(work.id)
        ctx.timers.cancel(StartConfirmDeadline(work.id))
        vm = ctx.vms.get(work.vm_id)
        if vm is not None and not maybe_running:
            self._own_update(work, vm, VmEvent.START_FAILED, host_id=None, power=PowerState.POWER_OFF)
        # maybe_running: the VM stays recorded on the target with an unknown power state, so the next attempt
        # waits for that host to report it off (or to be proven dead) — a late start can never make a second copy.
        if work.tried >= ctx.config.max_retries:
            if vm is not None:
                self._own_update(work, vm, VmEvent.GAVE_UP)
                ctx.save_vm(vm)
            self.finish(work, WorkEvent.GIVE_UP, f"gave up after {work.tried} attempts: {reason}", "alert")
        else:
            work.time_to_try_at = ctx.now + ctx.config.restart_retry_interval_s
            self._move(work, WorkEvent.START_FAILED)
            if vm is not None:
                ctx.save_vm(vm)
            ctx.event(
                "warning",
                f"work:{work.id}",
                "work.retry",
                f"attempt {work.tried} failed: {reason}; retry in {ctx.config.restart_retry_interval_s:.0f} s",
            )
            self.evaluate(work)
        self.pump()

    def _attempt_void(self, work: HaWorkRecord, reason: str) -> None:
        """The attempt certainly started nothing (never delivered, or its target is proven dead): it does not count
        against `max.retries`, and the VM is placed again at once."""
        ctx = self.ctx
        request_id = self._attempts.pop(work.id, None)
        if request_id is not None:
            ctx.settle(request_id)  # a late answer to it must not be read as the next attempt's
        self.in_progress.discard(work.id)
        ctx.timers.cancel(StartConfirmDeadline(work.id))
        work.tried = max(work.tried - 1, 0)
        work.time_to_try_at = ctx.now
        vm = ctx.vms.get(work.vm_id)
        if vm is not None and vm.state is VmState.STARTING:  # otherwise it moved on: evaluate() cancels the item
            self._own_update(work, vm, VmEvent.START_FAILED, host_id=None, power=PowerState.POWER_OFF)
            ctx.save_vm(vm)
        self._move(work, WorkEvent.START_FAILED)
        ctx.event("warning", f"work:{work.id}", "work.replace", f"attempt void: {reason}; placing it again now")
        self.evaluate(work)
        self.pump()

    def vm_confirmed(self, vm: VmRecord, host_id: HostId) -> bool:
        """A power report from `host_id` shows the VM on: completes a restart that targeted that host."""
        work = self._active(vm)
        if work is None or work.step is not WorkStep.RESTARTING or vm.host_id != host_id:
            return False
        self._own_update(work, vm, VmEvent.CONFIRMED, power=PowerState.POWER_ON)
        self.ctx.save_vm(vm)
        if own_death(work.reason):
            self.restarts.setdefault(vm.id, []).append(self.ctx.now)
        if work.taken_at is not None and self.ctx.now - work.taken_at <= self.ctx.config.start_confirm_timeout_s:
            self.start_times.observe(host_id, self.ctx.now - work.taken_at)
        took_s = self.ctx.now - work.created_at
        where = self.ctx.host_name(host_id)
        self.finish(work, WorkEvent.CONFIRMED, f"{vm.name} runs on {where} ({took_s:.1f} s after scheduling)")
        return True

    def vm_changed(self, vm: VmRecord) -> None:
        """Fresh power information about a VM: an item waiting to learn it can move on."""
        work = self._active(vm)
        if work is not None and work.step is WorkStep.INVESTIGATING and work.id not in self.in_progress:
            self.ctx.timers.cancel(WorkDue(work.id))
            self.evaluate(work)

    def has_active(self, vm_id: VmId) -> bool:
        return vm_id in self.active_by_vm

    def forget_vm(self, vm_id: VmId) -> None:
        """A deleted VM's restart history goes with it: its id may be given to a new VM."""
        self.restarts.pop(vm_id, None)

    def cancel_for_vm(self, vm: VmRecord, reason: str) -> None:
        work = self._active(vm)
        if work is not None:
            self.finish(work, WorkEvent.CANCEL, reason)

    def host_resolved(self, host_id: HostId) -> None:
        host = self.ctx.hosts.get(host_id)
        if host is not None and host.status in (HostStatus.DOWN, HostStatus.FENCED):
            for work_id in sorted(self.in_progress):
                work, vm = self.ctx.works.get(work_id), None
                vm = self.ctx.vms.get(work.vm_id) if work is not None else None
                if work is not None and vm is not None and vm.host_id == host_id and work.step is WorkStep.RESTARTING:
                    # A start of unknown outcome stays tied to its target's verdict: proven dead, nothing of it
                    # runs there, so the VM goes elsewhere now rather than after start.timeout.
                    self._attempt_void(work, f"its target {host.name} is {host.status.value}")
        self._batching = True
        for work_id in sorted(self.waiting_on_host.pop(host_id, ())):
            self._waits_for.pop(work_id, None)
            work = self.ctx.works.get(work_id)
            if work is not None:
                self.evaluate(work)
        self._batching = False
        self.pump()

    def host_fencing(self, host: HostRecord) -> None:
        """The host the items wait for is being fenced: show it on them (step Fencing)."""
        for work_id in sorted(self.waiting_on_host.get(host.id, ())):
            work = self.ctx.works.get(work_id)
            if work is not None and work.step.active:
                self._wait(work, WorkEvent.WAIT_FENCE, f"waits for the fence of {host.name}")

    def finish(self, work: HaWorkRecord, event: WorkEvent, reason: str, severity: Severity = "info") -> None:
        work.step = next_step(work.step, event)
        step = work.step
        work.reason = f"{work.reason}; {step.value}: {reason}"
        if self.active_by_vm.get(work.vm_id) == work.id:
            del self.active_by_vm[work.vm_id]
        self.in_progress.discard(work.id)
        self._attempts.pop(work.id, None)
        self.ctx.timers.cancel(WorkDue(work.id))
        self.ctx.timers.cancel(StartConfirmDeadline(work.id))
        self._waiting_why.pop(work.id, None)
        waited_host = self._waits_for.pop(work.id, None)
        if waited_host is not None:
            self.waiting_on_host.get(waited_host, set()).discard(work.id)
        self.ctx.save_work(work)
        self.ctx.event(severity, f"work:{work.id}", f"work.{step.value.lower()}", f"{step.value}: {reason}")
        self.pump()

    # ------------------------------------------------------------ helpers

    def _active(self, vm: VmRecord) -> HaWorkRecord | None:
        work_id = self.active_by_vm.get(vm.id)
        return None if work_id is None else self.ctx.works.get(work_id)

    def _wait(self, work: HaWorkRecord, event: WorkEvent, why: str) -> None:
        """Park the item; an event tells why whenever what it waits for changes."""
        old = work.step
        work.step = next_step(old, event)
        if work.step is not old or self._waiting_why.get(work.id) != why:
            self.ctx.event("info", f"work:{work.id}", "work.waiting", f"{work.step.value}: {why}")
            self._waiting_why[work.id] = why
        if work.step is not old:
            self.ctx.save_work(work)

    def _move(self, work: HaWorkRecord, event: WorkEvent) -> None:
        """A step change the work makes itself (to Scheduled or Restarting): always saved, it carries new times."""
        work.step = next_step(work.step, event)
        self.ctx.save_work(work)

    def _own_update(
        self,
        work: HaWorkRecord,
        vm: VmRecord,
        event: VmEvent,
        *,
        host_id: HostId | Keep | None = KEEP,
        power: PowerState | None = None,
    ) -> None:
        """A change the work itself makes: the VM moves on, the work stays current with it."""
        self.ctx.vms.update(vm, event, host_id=host_id, power=power, at=self.ctx.now)
        work.vm_update_count = vm.update_count
