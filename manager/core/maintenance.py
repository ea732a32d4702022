"""A host's life cycle under the operator: disable / enable, and maintenance that empties the host by live migration.

`host maintenance H on` → PrepareForMaintenance: every VM running on H is migrated off, highest restart priority
first, `maintenance.migrations` at a time, to hosts placement picks (Enabled ones only: H itself takes nothing new).
When no VM holds resources on H any more → Maintenance. A VM that cannot move (no host fits it, its migration
failed, it is an unmanaged domain kvmha cannot migrate) is left where it runs, with an event saying which and why;
once nothing else can move, H goes to ErrorInMaintenance (alert). `off` returns H to service (Enabled) from any of
the three; a second `on` from ErrorInMaintenance tries again.

Invariants: the host keeps full host HA while PrepareForMaintenance or ErrorInMaintenance (its VMs still run there);
a VM in transition (Starting, Stopping, Migrating) is waited for, never migrated; every resource-state change reads
`resourcestate.TRANSITIONS` and leaves an event.
"""

from __future__ import annotations

from typing import Protocol

from kvmha.manager.core.actions import Severity
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.model import HostId, HostRecord, PowerState, ResourceState, VmId, VmRecord, VmState
from kvmha.manager.core.resourcestate import IN_MAINTENANCE, ResourceEvent, next_resource_state
from kvmha.manager.core.routing import MaintenanceDue
from kvmha.manager.core.vmindex import occupies

R = ResourceState
RECHECK_S = 5.0  # a host being emptied is looked at again this often (and whenever one of its migrations settles)


class Migrator(Protocol):
    """What maintenance asks of migration (implemented by MigrationFlow)."""

    def request(self, vm: VmRecord, target_id: HostId | None, why: str, *, for_maintenance: bool = False) -> str: ...


class MaintenanceFlow:
    def __init__(self, ctx: Ctx, migrator: Migrator) -> None:
        self.ctx = ctx
        self.migrator = migrator
        self.stuck: dict[HostId, dict[VmId, str]] = {}  # per host being emptied: VMs that cannot move, and why

    # ------------------------------------------------------------ operator

    def set_maintenance(self, host: HostRecord, on: bool) -> None:
        state = host.resource_state
        if on and state in (R.PREPARE_FOR_MAINTENANCE, R.MAINTENANCE):
            self._note(host, f"maintenance on ignored: already {state.value}")
        elif not on and state not in IN_MAINTENANCE:
            self._note(host, f"maintenance off ignored: {state.value}, not in maintenance")
        elif on:
            self.stuck[host.id] = {}
            for vm in self.ctx.vms.on_host(host.id):
                self.ctx.migrations.failed.pop(vm.id, None)
            self._move(host, ResourceEvent.PREPARE, "maintenance requested: moving its VMs off")
            self.due(host.id)
        else:
            self.stuck.pop(host.id, None)
            self.ctx.timers.cancel(MaintenanceDue(host.id))
            self._move(host, ResourceEvent.LEAVE, "maintenance off: back in service")

    def set_enabled(self, host: HostRecord, enabled: bool) -> None:
        wanted = R.ENABLED if enabled else R.DISABLED
        if host.resource_state is wanted:
            self._note(host, f"{'enable' if enabled else 'disable'} ignored: already {wanted.value}")
        elif host.resource_state in IN_MAINTENANCE:
            self._note(host, f"{'enable' if enabled else 'disable'} ignored: {host.resource_state.value} "
                             "(maintenance off first)")
        else:
            event = ResourceEvent.ENABLE if enabled else ResourceEvent.DISABLE
            self._move(host, event, "enabled by the operator" if enabled else "disabled by the operator: no new VMs")

    def restore(self, host: HostRecord) -> None:
        """A manager restarted while the host was being emptied: carry on."""
        if host.resource_state is R.PREPARE_FOR_MAINTENANCE:
            self.ctx.timers.schedule(MaintenanceDue(host.id), self.ctx.now + RECHECK_S)

    # ------------------------------------------------------------ emptying a host

    def due(self, host_id: HostId) -> None:
        """Look at a host being emptied: start the next migrations, or conclude."""
        host = self.ctx.hosts.get(host_id)
        if host is None or host.resource_state is not R.PREPARE_FOR_MAINTENANCE:
            return
        stuck = self.stuck.setdefault(host.id, {})
        left = [vm for vm in self.ctx.vms.on_host(host.id) if occupies(vm)]
        if not left:
            self._move(host, ResourceEvent.EMPTIED, "no VM left on it")
            self.stuck.pop(host.id, None)
            return
        in_flight = self.ctx.migrations.leaving(host.id)
        waiting = in_flight
        for vm in sorted(left, key=lambda v: (-v.restart_priority, v.id)):
            if vm.id in stuck or vm.id in self.ctx.migrations:
                continue
            why = self._cannot_move(vm)
            if why is None and in_flight >= self.ctx.config.maintenance_migrations:
                waiting += 1
                continue
            if why is None:
                why = self.migrator.request(vm, None, f"{host.name} enters maintenance", for_maintenance=True)
                if not why:
                    in_flight += 1
                    waiting += 1
                    continue
            if why == "wait":
                waiting += 1
                continue
            stuck[vm.id] = why
            self.ctx.event("warning", f"vm:{vm.id}", "maintenance.stuck", f"cannot leave {host.name}: {why}")
        if waiting == 0:
            names = ", ".join(self._name(vm_id) for vm_id in sorted(stuck))
            self._move(host, ResourceEvent.STUCK, f"{len(stuck)} VMs cannot move off: {names}", "alert")
            return
        self.ctx.timers.schedule(MaintenanceDue(host.id), self.ctx.now + RECHECK_S)

    def _cannot_move(self, vm: VmRecord) -> str | None:
        """Why a VM on a host being emptied cannot be migrated; "wait" while it is in transition."""
        failed = self.ctx.migrations.failed.get(vm.id)
        if failed is not None:
            return f"its migration failed: {failed}"
        if vm.state is VmState.UNMANAGED:
            return "an unmanaged domain (register it so kvmha can migrate it)"
        if vm.state is not VmState.RUNNING or vm.power_state is not PowerState.POWER_ON:
            return "wait"
        return None

    def _name(self, vm_id: VmId) -> str:
        vm = self.ctx.vms.get(vm_id)
        return vm.name if vm is not None else f"vm#{vm_id}"

    # ------------------------------------------------------------ helpers

    def _move(self, host: HostRecord, event: ResourceEvent, why: str, severity: Severity = "info") -> None:
        old = host.resource_state
        host.resource_state = next_resource_state(old, event)
        self.ctx.save_host(host)
        new = host.resource_state.value
        self.ctx.event(severity, f"host:{host.id}", "host.resource", f"{old.value} -> {new} ({why})")

    def _note(self, host: HostRecord, message: str) -> None:
        self.ctx.event("info", f"host:{host.id}", "host.resource", message)
