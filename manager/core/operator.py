"""Operator facts: registering, starting, stopping, deleting VMs, switching HA, hosts in and out of maintenance.

Invariants: an operator fact about a VM or host the core does not know changes nothing and leaves a warning event;
an Unmanaged VM is only ever adopted (registered), never started, stopped or destroyed by these paths; an operator
stop or delete cancels the VM's HA work first, so no restart races the operator; a deleted VM's domain is destroyed
where it runs and the answer to that DestroyVm is recorded (the record itself is gone by then); a deleted VM's
restart history goes with it (its id may be given to a new VM). The checks an operator gets an error for (unknown
names, running VMs that cannot be deleted, ...) are made before the fact exists, by kvmha.manager.operations.
"""

from __future__ import annotations

import copy
from typing import Protocol

from kvmha.manager.core import capacityplan
from kvmha.manager.core import facts as f
from kvmha.manager.core.actions import DeleteVmRecord, DestroyVm, StopVm
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.hoststate import TransitionError
from kvmha.manager.core.model import HostId, HostRecord, HostStatus, PowerState, VmId, VmRecord, VmState, WorkId
from kvmha.manager.core.routing import OperatorDestroy, OperatorStop
from kvmha.manager.core.vmindex import occupies
from kvmha.manager.core.vmstate import VmEvent, next_vm_state


class OperatorWork(Protocol):
    """What operator facts ask of the HA work scheduler (implemented by Scheduler)."""

    def schedule_restart(self, vm: VmRecord, reason: str, *, operator: bool = False) -> WorkId | None: ...
    def cancel_for_vm(self, vm: VmRecord, reason: str) -> None: ...
    @property
    def placement_cursor(self) -> int: ...
    def forget_vm(self, vm_id: VmId) -> None: ...


class HostOperations(Protocol):
    """What operator facts ask of host HA (implemented by HostFlow)."""

    def remove(self, host: HostRecord) -> None: ...


class LifeCycle(Protocol):
    """What operator facts ask of maintenance (implemented by MaintenanceFlow)."""

    def set_maintenance(self, host: HostRecord, on: bool) -> None: ...
    def set_enabled(self, host: HostRecord, enabled: bool) -> None: ...


class Migrations(Protocol):
    """What operator facts ask of migration (implemented by MigrationFlow)."""

    def request(self, vm: VmRecord, target_id: HostId | None, why: str, *, for_maintenance: bool = False) -> str: ...
    def cancel(self, vm: VmRecord, reason: str) -> None: ...


class OperatorFlow:
    def __init__(
        self, ctx: Ctx, work: OperatorWork, hosts: HostOperations, life: LifeCycle, migration: Migrations
    ) -> None:
        self.ctx = ctx
        self.work = work
        self.hosts = hosts
        self.life = life
        self.migration = migration

    def _vm(self, vm_id: VmId, what: str) -> VmRecord | None:
        vm = self.ctx.vms.get(vm_id)
        if vm is None:
            self.ctx.event("warning", f"vm:{vm_id}", "operator.unknown", f"{what} ignored: no such VM")
        return vm

    def vm_registered(self, fact: f.VmRegistered) -> None:
        vm = copy.copy(fact.vm)
        existing = self.ctx.vms.get(vm.id)
        if existing is not None:
            # Adopting a domain the agents reported: the registration replaces its Unmanaged record.
            adopted = VmEvent.ADOPTED_RUNNING if vm.state is VmState.RUNNING else VmEvent.ADOPTED_STOPPED
            if next_vm_state(existing.state, adopted) is not vm.state:
                raise TransitionError(f"VM {vm.id} cannot be registered as {vm.state.value}")
        self.ctx.vms.add(vm)
        self.ctx.save_vm(vm)
        self.ctx.event(
            "info", f"vm:{vm.id}", "vm.registered", f"registered {vm.name} ({vm.state.value}, HA {vm.ha_enabled})"
        )

    def vm_start(self, fact: f.VmStartRequested) -> None:
        vm = self._vm(fact.vm_id, "start")
        if vm is None:
            return
        if vm.state not in (VmState.STOPPED, VmState.ERROR):
            self.ctx.event("info", f"vm:{vm.id}", "operator.start", f"start ignored: already {vm.state.value}")
            return
        if vm.state is VmState.ERROR:
            # An operator start is the manual clean-up of Error: the work needs the VM's last known power facts.
            self.ctx.vms.update(vm, VmEvent.OPERATOR_RESET)
            self.ctx.save_vm(vm)
        if vm.ha_enabled:
            verdict = capacityplan.admission(capacityplan.world_of(self.ctx, self.work.placement_cursor), vm)
            if not verdict.ok:
                self.ctx.event("warning", f"vm:{vm.id}", "vm.start.refused", f"start refused: {verdict.message}")
                return
        self.work.schedule_restart(vm, "operator start", operator=True)

    def vm_stop(self, fact: f.VmStopRequested) -> None:
        vm = self._vm(fact.vm_id, "stop")
        if vm is None:
            return
        if vm.state is VmState.UNMANAGED:
            self.ctx.event("info", f"vm:{vm.id}", "operator.stop", "stop ignored: the VM is Unmanaged (register it)")
            return
        self.work.cancel_for_vm(vm, "operator stop")
        self.migration.cancel(vm, "operator stop")
        host = self.ctx.hosts.get(vm.host_id) if vm.host_id is not None else None
        if occupies(vm) and host is not None and host.id in self.ctx.connected:
            timeout_s = self.ctx.config.stop_timeout_s
            self.ctx.send(OperatorStop(vm.id), host.id, StopVm(vm.uuid, timeout_s), timeout_s + 30.0)
            self.ctx.vms.update(vm, VmEvent.STOP_REQUESTED)
            self.ctx.event("info", f"vm:{vm.id}", "vm.stopping", f"stopping on {host.name}")
        elif host is None or host.status in (HostStatus.DOWN, HostStatus.FENCED) or not occupies(vm):
            self.ctx.vms.update(vm, VmEvent.OPERATOR_STOPPED, power=PowerState.POWER_OFF, at=self.ctx.now)
            self.ctx.event("info", f"vm:{vm.id}", "vm.stopped", "stopped by the operator (not running anywhere)")
        else:
            # Its host is unreachable: mark it Stopping; the host's next report (or its death) settles it.
            self.ctx.vms.update(vm, VmEvent.STOP_REQUESTED)
            self.ctx.event("warning", f"vm:{vm.id}", "vm.stopping", f"stop requested but {host.name} is unreachable")
        self.ctx.save_vm(vm)

    def stop_result(self, vm_id: VmId, ok: bool, error: str) -> None:
        vm = self.ctx.vms.get(vm_id)
        if vm is None or vm.state is not VmState.STOPPING:
            return
        if ok:
            self.ctx.vms.update(vm, VmEvent.OPERATOR_STOPPED, power=PowerState.POWER_OFF, at=self.ctx.now)
            self.ctx.event("info", f"vm:{vm.id}", "vm.stopped", "stopped by the operator")
        else:
            self.ctx.event("warning", f"vm:{vm.id}", "vm.stop.failed", f"stop failed: {error}; still Stopping")
        self.ctx.save_vm(vm)

    def vm_deleted(self, fact: f.VmDeleted) -> None:
        vm = self._vm(fact.vm_id, "delete")
        if vm is None:
            return
        self.work.cancel_for_vm(vm, "VM deleted")
        self.migration.cancel(vm, "VM deleted")
        # VM ids can be given again to a new VM (the next one above the highest registered): its restart count per
        # window must not start with the deleted VM's restarts.
        self.work.forget_vm(vm.id)
        if occupies(vm) and vm.host_id is not None and vm.host_id in self.ctx.connected:
            owner = OperatorDestroy(vm.id, vm.name)
            self.ctx.send(owner, vm.host_id, DestroyVm(vm.uuid), self.ctx.config.start_timeout_s)
        self.ctx.vms.remove(vm.id)
        self.ctx.out.append(DeleteVmRecord(vm.id))
        self.ctx.event("info", f"vm:{vm.id}", "vm.deleted", f"{vm.name} deleted")

    def destroy_result(self, owner: OperatorDestroy, host_id: HostId, ok: bool, error: str) -> None:
        """The answer to the DestroyVm of a deleted VM: its record is gone, the event says what became of it."""
        where = self.ctx.host_name(host_id)
        if ok:
            self.ctx.event("info", f"vm:{owner.vm_id}", "vm.destroyed", f"{owner.vm_name} destroyed on {where}")
        else:
            self.ctx.event(
                "warning",
                f"vm:{owner.vm_id}",
                "vm.destroy.failed",
                f"destroy of deleted {owner.vm_name} on {where} failed: {error}; "
                "if it still runs there it shows up as Unmanaged",
            )

    def vm_ha(self, fact: f.VmHaChanged) -> None:
        vm = self._vm(fact.vm_id, "HA change")
        if vm is None:
            return
        if fact.enabled and not vm.ha_enabled and occupies(vm):
            # A running VM that becomes HA is like a new HA VM: it needs its place in the failure reserve.
            verdict = capacityplan.admission(capacityplan.world_of(self.ctx, self.work.placement_cursor), vm)
            if not verdict.ok:
                self.ctx.event("warning", f"vm:{vm.id}", "vm.ha.refused", f"HA not enabled: {verdict.message}")
                return
        vm.ha_enabled = fact.enabled
        vm.update_count += 1
        if not fact.enabled:
            self.work.cancel_for_vm(vm, "HA switched off")
        self.ctx.save_vm(vm)
        self.ctx.event("info", f"vm:{vm.id}", "vm.ha", f"HA {'enabled' if fact.enabled else 'disabled'}")

    def host_registered(self, fact: f.HostRegistered) -> None:
        host = copy.copy(fact.host)
        self.ctx.hosts[host.id] = host
        self.ctx.save_host(host)
        self.ctx.event("info", f"host:{host.id}", "host.registered", f"registered {host.name} ({host.address})")

    def host_removed(self, fact: f.HostRemoved) -> None:
        host = self.ctx.hosts.get(fact.host_id)
        if host is not None and host.status is not HostStatus.REMOVED:
            self.hosts.remove(host)

    def host_maintenance(self, fact: f.HostMaintenanceChanged) -> None:
        host = self.ctx.hosts.get(fact.host_id)
        if host is not None:
            before = host.resource_state
            self.life.set_maintenance(host, fact.on)
            if fact.on and before is not host.resource_state:
                self._warn_reserve(host)

    def _warn_reserve(self, host: HostRecord) -> None:
        """Maintenance is allowed even when it eats the failure reserve (issue 16): it is said, not refused."""
        verdict = capacityplan.admission(capacityplan.world_of(self.ctx, self.work.placement_cursor))
        if not verdict.ok:
            self.ctx.event("warning", f"host:{host.id}", "capacity.reserve.used",
                           f"maintenance uses the failure reserve: {verdict.message}")

    def host_enabled(self, fact: f.HostEnabledChanged) -> None:
        host = self.ctx.hosts.get(fact.host_id)
        if host is not None:
            self.life.set_enabled(host, fact.enabled)

    def vm_migrate(self, fact: f.VmMigrateRequested) -> None:
        vm = self._vm(fact.vm_id, "migrate")
        if vm is None:
            return
        why = self.migration.request(vm, fact.target_host_id, "operator migrate")
        if why:
            self.ctx.event("warning", f"vm:{vm.id}", "operator.migrate", f"migrate refused: {why}")

    def host_bmc(self, fact: f.HostBmcChanged) -> None:
        host = self.ctx.hosts.get(fact.host_id)
        if host is not None:
            host.has_bmc = fact.has_bmc
            self.ctx.save_host(host)
            self.ctx.event("info", f"host:{host.id}", "host.bmc", f"BMC {'configured' if fact.has_bmc else 'removed'}")
