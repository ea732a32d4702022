"""Live migration: kvmha's own (MigrateVm through the source's agent) and libvirt's seen from outside, followed.

Theory of operation. A migration has two sides. libvirt's peer-to-peer live migration starts a *paused* copy on the
target (PAUSED / VIR_DOMAIN_PAUSED_MIGRATION) while the guest keeps running on the source; at switchover the
source pauses, the target resumes, and the source's domain shuts off with cause Migrated. A failed or cancelled
migration destroys the target's copy and resumes the source. So, in the reports:

- a copy paused for migration is never a running copy: no "two copies?" alert, nothing restarted;
- the target reporting the VM *running* is decisive at once: the guest lives there now;
- the command's answer is decisive: ok → on the target, failed → on the source (or, if the source lost it too,
  on neither); an answer that never came leaves the reports to decide: the target's copy gone while the source
  runs it → on the source; no copy on either side (each side's report or its host's death) → on neither.

Invariants:
- While a migration is unsettled (`ctx.migrations` holds it) the VM is Migrating, recorded on its source, and no HA
  restart starts (clearance waits): it may be running on either side.
- A VM settled "on neither" is restarted by HA (or Stopped when not HA) only when each side is proven not to hold it:
  that side reported no copy, or its host is Down/Fenced. Never on silence.
- A migration done outside kvmha (libvirt Migrated causes, a paused incoming copy) is followed, never restarted.
- The target's capacity is reserved (VmIndex.reserve) from MigrateVm until the migration settles.
"""

from __future__ import annotations

from typing import Protocol

from kvmha.manager.core import facts as f
from kvmha.manager.core.actions import CancelMigration, MigrateVm
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.hoststate import DEAD, SILENT
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostId,
    HostRecord,
    HostStatus,
    PowerState,
    StopCause,
    VmId,
    VmRecord,
    VmState,
    WorkId,
    WorkStep,
    WorkType,
)
from kvmha.manager.core.placement import PlacementRequest, choose_host
from kvmha.manager.core.routing import MaintenanceDue, MigrationAttempt, MigrationCancel
from kvmha.manager.core.shared import Migration, Side
from kvmha.manager.core.vmstate import VmEvent
from kvmha.manager.core.workstep import WorkEvent, next_step

COMMAND_MARGIN_S = 30.0  # the manager waits this much beyond the agent's own migration timeout
TAIL_S = 30.0  # a paused-for-migration report from the host a VM just left is that migration's tail this long
PROGRESS_EVERY_S = 2.0  # at most one progress event per migration this often (the agent reports every second)
GIB = float(1 << 30)


class MigrationRestarts(Protocol):
    """What migration asks of the HA work scheduler (implemented by Scheduler)."""

    def schedule_restart(self, vm: VmRecord, reason: str) -> WorkId | None: ...
    def has_active(self, vm_id: VmId) -> bool: ...
    def vm_changed(self, vm: VmRecord) -> None: ...
    def new_work_id(self) -> WorkId: ...


class MigrationFlow:
    def __init__(self, ctx: Ctx, restarts: MigrationRestarts) -> None:
        self.ctx = ctx
        self.restarts = restarts

    # ------------------------------------------------------------ starting one

    def request(self, vm: VmRecord, target_id: HostId | None, why: str, *, for_maintenance: bool = False) -> str:
        """Start migrating `vm`; returns "" or the reason it cannot (the caller's event says it)."""
        ctx = self.ctx
        source = ctx.hosts.get(vm.host_id) if vm.host_id is not None else None
        if vm.state is not VmState.RUNNING or source is None or vm.power_state is not PowerState.POWER_ON:
            return f"it is {vm.state.value} ({vm.power_state.value}), not running on a host"
        if source.status is not HostStatus.UP or source.id not in ctx.connected:
            return f"its host {source.name} is {source.status.value}"
        if vm.id in ctx.migrations or self.restarts.has_active(vm.id):
            return "it has HA work or a migration in progress"
        target, problem = self._target(vm, source, target_id)
        if target is None:
            return problem
        work = HaWorkRecord(
            id=self.restarts.new_work_id(),
            vm_id=vm.id,
            type=WorkType.MIGRATION,
            step=WorkStep.SCHEDULED,
            host_id=source.id,
            previous_state=vm.state,
            vm_update_count=vm.update_count,
            reason=f"{why}: {source.name} -> {target.name}",
            created_at=ctx.now,
            target_host_id=target.id,
        )
        ctx.works[work.id] = work
        work.step = next_step(work.step, WorkEvent.MIGRATE)
        work.tried, work.taken_by, work.taken_at = 1, "core", ctx.now
        ctx.save_work(work)
        ctx.vms.update(vm, VmEvent.MIGRATION_STARTED)
        ctx.vms.reserve(vm, target.id)
        ctx.save_vm(vm)
        ctx.migrations.add(Migration(vm.id, source.id, target.id, ctx.now, work.id, for_maintenance=for_maintenance))
        timeout_s = ctx.config.migration_timeout_s
        command = MigrateVm(vm.uuid, target.id, target.uuid, target.address, timeout_s)
        ctx.send(MigrationAttempt(work.id), source.id, command, timeout_s + COMMAND_MARGIN_S)
        ctx.event("info", f"vm:{vm.id}", "vm.migrating", f"migrating from {source.name} to {target.name} ({why})")
        return ""

    def _target(self, vm: VmRecord, source: HostRecord, wanted: HostId | None) -> tuple[HostRecord | None, str]:
        ctx = self.ctx
        candidates = ctx.up.ids if wanted is None else [h for h in ctx.up.ids if h == wanted]
        if wanted is not None and not candidates:
            return None, f"{ctx.host_name(wanted)} is not Up and connected"
        group = vm.anti_affinity_group
        request = PlacementRequest(
            vm, frozenset({source.id}), frozenset(ctx.vms.group_hosts(group, vm.id) if group else ())
        )
        return choose_host(
            request,
            candidates,
            ctx.hosts,
            ctx.vms,
            start=vm.id,
            compare=ctx.config.placement_candidates,
            cpu_ratio=ctx.config.cpu_overcommit_ratio,
            reserve_mib=ctx.config.host_memory_reserve_mib,
        )

    # ------------------------------------------------------------ the command's answer

    def on_result(self, work_id: WorkId, done: f.CommandCompleted) -> None:
        work = self.ctx.works.get(work_id)
        vm = self.ctx.vms.get(work.vm_id) if work is not None else None
        job = self.ctx.migrations.get(vm.id) if vm is not None else None
        if vm is None or job is None or job.work_id != work_id:
            return
        if done.ok:
            self._settle_on_target(vm, job, "libvirt completed the migration")
        elif done.error.startswith(f.NOT_DELIVERED):
            self._settle_on_source(vm, job, f"the command never reached {self.ctx.host_name(job.source)}")
        elif done.error.startswith("timed out"):
            job.outcome_unknown = True
            self.ctx.event(
                "warning",
                f"vm:{vm.id}",
                "vm.migration.unknown",
                f"no answer from {self.ctx.host_name(job.source)} ({done.error}): the reports of both hosts decide "
                "where it runs; not restarted meanwhile",
            )
            self._decide(vm, job)
        elif job.at_target is Side.RUNNING:
            self._settle_on_target(vm, job, "the target runs it")
        else:
            job.at_target = Side.NONE  # libvirt destroys the incoming copy of a failed migration
            self._after_failure(vm, job, f"migration failed: {done.error or 'no detail'}")

    def on_progress(self, fact: f.MigrationProgressed) -> None:
        """The source's libvirt reports how far the copy has come: an event for the operator (and the CLI's bar)."""
        vm = self.ctx.vms.by_uuid(fact.vm_uuid)
        job = self.ctx.migrations.get(vm.id) if vm is not None else None
        if vm is None or job is None or job.source != fact.host_id or job.work_id is None:
            return
        shown = job.progress_shown_at
        if shown is not None and self.ctx.now - shown < PROGRESS_EVERY_S:
            return
        job.progress_shown_at = self.ctx.now
        processed, remaining = fact.data_processed_bytes, fact.data_remaining_bytes
        total = fact.data_total_bytes or processed + remaining
        share = min(99, int(100 * (total - remaining) / total)) if total else 0
        self.ctx.event(
            "info",
            f"vm:{vm.id}",
            "vm.migration.progress",
            f"{share}% of memory copied to {self.ctx.host_name(job.target)} ({processed / GIB:.2f} GiB sent, "
            f"{remaining / GIB:.2f} GiB left, pass {fact.memory_iteration}, {fact.elapsed_s:.0f} s)",
        )

    # ------------------------------------------------------------ reports (called by power-state sync)

    def on_domain(self, host: HostRecord, vm: VmRecord, domain: f.DomainReport) -> bool:
        """A report about a registered VM; True when migration handled it (power sync then does nothing)."""
        job = self.ctx.migrations.get(vm.id)
        if job is None:
            return self._maybe_outside(host, vm, domain)
        if job.target is None and host.id != job.source and domain.power is PowerState.POWER_ON:
            job.target = host.id  # a migration seen from outside shows where it goes
        side = self._side(domain)
        if host.id == job.source:
            job.at_source = side
            self.ctx.vms.set_power(vm, domain.power, self.ctx.now)
        elif host.id == job.target:
            job.at_target = side
        elif side is Side.RUNNING and job.at_source is Side.NONE and job.at_target is not Side.RUNNING:
            job.target, job.at_target = host.id, side  # it left its source and runs here: this was the target
        else:
            return False  # a third host: power sync's duplicate rules apply
        self._decide(vm, job)
        return True

    def full_report(self, host: HostRecord, seen: set[str]) -> None:
        """A full report lists every domain: a migration's side that is not in it holds no copy."""
        for job in self.ctx.migrations.touching(host.id):
            vm = self.ctx.vms.get(job.vm_id)
            if vm is None or vm.uuid in seen:
                continue
            if host.id == job.source:
                job.at_source = Side.NONE
            else:
                job.at_target = Side.NONE
            self._decide(vm, job)

    def link_lost(self, host_id: HostId) -> None:
        """The agent link of a migration's source broke: the MigrateVm answer travels on that link, and an agent
        killed mid-migration never sends it (libvirt may still complete or fail the job without it). Waiting for it
        until the command's timeout would keep the VM Migrating for minutes; the reports of both sides decide
        instead (a late answer still counts). What the source held is unknown from now until it reports again (or
        is proven dead): its last report predates the break."""
        for job in self.ctx.migrations.touching(host_id):
            vm = self.ctx.vms.get(job.vm_id)
            if vm is None or job.source != host_id or job.work_id is None or job.outcome_unknown:
                continue
            job.outcome_unknown, job.at_source = True, Side.UNKNOWN
            self.ctx.event(
                "info",
                f"vm:{vm.id}",
                "vm.migration.unknown",
                f"the agent link of {self.ctx.host_name(host_id)} broke mid-migration: the reports of both hosts "
                "decide where it runs; not restarted meanwhile",
            )
            self._decide(vm, job)

    def host_dead(self, host: HostRecord) -> None:
        """Down or Fenced: nothing of any migration runs there."""
        for job in self.ctx.migrations.touching(host.id):
            vm = self.ctx.vms.get(job.vm_id)
            if vm is None:
                self.ctx.migrations.pop(job.vm_id)
                continue
            if host.id == job.source:
                job.at_source = Side.NONE
            else:
                job.at_target = Side.NONE
            job.outcome_unknown = True  # the command's answer (if any) cannot come from a dead source
            self._decide(vm, job)

    def _side(self, domain: f.DomainReport) -> Side:
        if domain.power is not PowerState.POWER_ON:
            return Side.NONE
        # Only a running guest decides a migration: a copy paused for any reason (an incoming one still starting
        # up, say) may yet be destroyed by libvirt while the source goes on.
        return Side.PAUSED if domain.migrating or domain.paused else Side.RUNNING

    def _maybe_outside(self, host: HostRecord, vm: VmRecord, domain: f.DomainReport) -> bool:
        """A migration kvmha did not start, seen in the reports: follow it."""
        ctx = self.ctx
        if vm.state is not VmState.RUNNING or vm.host_id is None:
            return False
        incoming = host.id != vm.host_id and domain.power is PowerState.POWER_ON and domain.migrating
        left = host.id == vm.host_id and domain.power is PowerState.POWER_OFF and domain.cause is StopCause.MIGRATED
        if not (incoming or left):
            return False
        tail = ctx.migrations.left.get(vm.id)
        if incoming and tail is not None and tail[0] == host.id and ctx.now - tail[1] <= TAIL_S:
            return True  # the old source paused at the switchover just settled: no news, no new migration
        source = vm.host_id
        job = Migration(vm.id, source, host.id if incoming else None, ctx.now)
        job.at_target = Side.PAUSED if incoming else Side.UNKNOWN
        job.at_source = Side.NONE if left else Side.RUNNING
        job.outcome_unknown = True
        ctx.migrations.add(job)
        ctx.vms.update(vm, VmEvent.MIGRATION_STARTED)
        if left:
            ctx.vms.set_power(vm, PowerState.POWER_OFF, ctx.now)
        ctx.save_vm(vm)
        seen = f"an incoming copy on {host.name}" if incoming else f"{host.name} reports it left by migration"
        ctx.event(
            "info",
            f"vm:{vm.id}",
            "vm.migration.seen",
            f"migration not started by kvmha ({seen}): following it, not restarting it",
        )
        return True

    # ------------------------------------------------------------ deciding

    def _decide(self, vm: VmRecord, job: Migration) -> None:
        """Settle the migration when what the two sides hold (and the command's answer, if it counts) decides."""
        if job.at_target is Side.RUNNING:
            self._settle_on_target(vm, job, f"{self.ctx.host_name(job.target)} runs it")
            return
        if job.work_id is not None and not job.outcome_unknown:
            return  # the command's answer decides
        if job.target is None:
            # Where it went is not known: it left its source for a host not seen yet (it runs there; never
            # restarted on that), or the manager restarted mid-migration and the source shows it running.
            if job.at_source is Side.RUNNING:
                self._settle_on_source(vm, job, "it runs on its source and no other host showed a copy")
            return
        target_clear = job.at_target is Side.NONE or self._dead(job.target)
        if job.at_source is Side.RUNNING and target_clear:
            self._settle_on_source(vm, job, "the target holds no copy and the source runs it")
        elif job.at_source is Side.NONE and target_clear:
            self._settle_lost(vm, job, "neither host holds it")

    def _dead(self, host_id: HostId | None) -> bool:
        host = self.ctx.hosts.get(host_id) if host_id is not None else None
        return host is not None and host.status in DEAD

    def _settle_on_target(self, vm: VmRecord, job: Migration, why: str) -> None:
        ctx = self.ctx
        assert job.target is not None
        self._end(vm, job)
        if vm.state is not VmState.MIGRATING:
            return  # it moved on meanwhile (an operator stop): that path settles it
        source_name = ctx.host_name(job.source)
        ctx.vms.update(vm, VmEvent.MIGRATED, host_id=job.target, power=PowerState.POWER_ON, at=ctx.now)
        ctx.migrations.left[vm.id] = (job.source, ctx.now)
        ctx.save_vm(vm)
        took_s = ctx.now - job.started_at
        message = f"migrated from {source_name} to {ctx.host_name(job.target)} in {took_s:.1f} s ({why})"
        ctx.event("info", f"vm:{vm.id}", "vm.migrated", message)
        self._finish_work(job, WorkEvent.MIGRATED, message)
        target = ctx.hosts.get(job.target)
        if target is not None and target.status in SILENT | DEAD and vm.ha_enabled:
            # It moved onto a host that is in question: host HA scheduled that host's VMs before it arrived.
            self.restarts.schedule_restart(vm, f"{target.name} is {target.status.value} since it took it")
        self.restarts.vm_changed(vm)

    def _settle_on_source(self, vm: VmRecord, job: Migration, why: str) -> None:
        ctx = self.ctx
        self._end(vm, job)
        if vm.state is not VmState.MIGRATING:
            return
        ctx.vms.update(vm, VmEvent.MIGRATION_FAILED, power=PowerState.POWER_ON, at=ctx.now)
        ctx.save_vm(vm)
        message = f"stays on {ctx.host_name(job.source)}: {why}"
        ctx.event("warning", f"vm:{vm.id}", "vm.migration.failed", message)
        if job.work_id is not None:
            ctx.migrations.failed[vm.id] = why
        self._finish_work(job, WorkEvent.MIGRATION_FAILED, message)
        self.restarts.vm_changed(vm)

    def _after_failure(self, vm: VmRecord, job: Migration, why: str) -> None:
        if job.at_source is Side.NONE or self._dead(job.source):
            self._settle_lost(vm, job, f"{why}; its source holds no copy either")
        else:
            self._settle_on_source(vm, job, why)

    def _settle_lost(self, vm: VmRecord, job: Migration, why: str) -> None:
        """Neither side holds it: each said so or is proven dead. An HA VM is restarted, another one Stopped."""
        ctx = self.ctx
        self._end(vm, job)
        if vm.state is not VmState.MIGRATING:
            return
        ctx.vms.set_power(vm, PowerState.POWER_OFF, ctx.now)
        message = f"lost during its migration from {ctx.host_name(job.source)} to {ctx.host_name(job.target)}: {why}"
        ctx.migrations.failed[vm.id] = why
        self._finish_work(job, WorkEvent.MIGRATION_FAILED, message)
        if vm.ha_enabled:
            ctx.save_vm(vm)
            ctx.event("warning", f"vm:{vm.id}", "vm.migration.lost", f"{message}: HA restarts it")
            if self.restarts.has_active(vm.id):
                self.restarts.vm_changed(vm)
            else:
                self.restarts.schedule_restart(vm, message)
        else:
            ctx.vms.update(vm, VmEvent.POWERED_OFF)
            ctx.save_vm(vm)
            ctx.event("warning", f"vm:{vm.id}", "vm.stopped", f"{message}: not HA-enabled, Stopped")

    def _end(self, vm: VmRecord, job: Migration) -> None:
        self.ctx.migrations.pop(vm.id)
        self.ctx.vms.release(vm)
        self.ctx.timers.schedule(MaintenanceDue(job.source), self.ctx.now)

    def _finish_work(self, job: Migration, event: WorkEvent, reason: str) -> None:
        work = self.ctx.works.get(job.work_id) if job.work_id is not None else None
        if work is None or not work.step.active:
            return
        work.step = next_step(work.step, event)
        work.reason = f"{work.reason}; {work.step.value}: {reason}"
        self.ctx.save_work(work)

    # ------------------------------------------------------------ operator and restart

    def cancel_requested(self, vm_id: VmId) -> None:
        """The operator cancels a migration kvmha started: its source aborts the libvirt job; the MigrateVm's failed
        answer then settles the VM on the source (the target's copy is destroyed by libvirt)."""
        ctx = self.ctx
        job = ctx.migrations.get(vm_id)
        if job is None or job.work_id is None or job.source not in ctx.connected:
            why = "no migration started by kvmha" if job is None or job.work_id is None else "its source is silent"
            ctx.event("info", f"vm:{vm_id}", "operator.migrate", f"cancel ignored: {why}")
            return
        vm = ctx.vms.get(vm_id)
        assert vm is not None
        ctx.send(MigrationCancel(job.work_id), job.source, CancelMigration(vm.uuid), ctx.config.start_timeout_s)
        ctx.event("info", f"vm:{vm_id}", "vm.migration.cancel", f"cancel asked of {ctx.host_name(job.source)}")

    def on_cancel_answer(self, work_id: WorkId, done: f.CommandCompleted) -> None:
        if not done.ok:
            work = self.ctx.works.get(work_id)
            subject = f"vm:{work.vm_id}" if work is not None else f"work:{work_id}"
            self.ctx.event("warning", subject, "vm.migration.cancel", f"cancel failed: {done.error}")

    def cancel(self, vm: VmRecord, reason: str) -> None:
        """The VM was deleted or stopped by the operator: forget its migration (the stop settles where it runs)."""
        job = self.ctx.migrations.get(vm.id)
        if job is not None:
            self._end(vm, job)
            self._finish_work(job, WorkEvent.CANCEL, reason)

    def restore(self, work: HaWorkRecord) -> None:
        """A Migration item the old manager left in flight: its answer is lost, the reports of its source and of
        its stored target decide (the source still running it proves nothing while the target may hold it)."""
        self.ctx.works[work.id] = work
        vm = self.ctx.vms.get(work.vm_id)
        if not work.step.active or vm is None or work.host_id is None or vm.state is not VmState.MIGRATING:
            return
        target = work.target_host_id if work.target_host_id in self.ctx.hosts else None
        job = Migration(vm.id, work.host_id, target, work.created_at, work.id, Side.UNKNOWN, Side.UNKNOWN, True)
        self.ctx.migrations.add(job)
        if target is not None:
            self.ctx.vms.reserve(vm, target)  # its memory and vCPUs stay booked there until it settles

    def restore_vm(self, vm: VmRecord) -> None:
        """A VM recorded Migrating with no item (a migration seen from outside): the reports decide."""
        if vm.state is VmState.MIGRATING and vm.id not in self.ctx.migrations and vm.host_id is not None:
            self.ctx.migrations.add(Migration(vm.id, vm.host_id, None, self.ctx.now, None, Side.UNKNOWN,
                                              Side.UNKNOWN, True))
