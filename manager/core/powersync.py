"""VM HA: power-state sync (the seed's first path).

Every report updates power_state; then state and power_state are compared. PowerOff / PowerReportMissing while a VM
should run → scheduleRestart(vm) for an HA VM, Stopped (with an event) for the others and for guest shutdowns
(unless guest.shutdown.restart). A VM reported on by a host other than its recorded one is followed, never started a
second time. A host whose hypervisor is unreachable makes its VMs' power Unknown — never "all off" — so a libvirt
restart cannot trigger a restart storm. Domains nobody registered become Unmanaged records: visible, never restarted.
"""

from __future__ import annotations

from typing import Protocol

from kvmha.manager.core import facts as f
from kvmha.manager.core.actions import Severity
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.model import (
    HostId,
    HostRecord,
    HostStatus,
    PowerState,
    ResourceState,
    StopCause,
    VmId,
    VmRecord,
    VmState,
    WorkId,
)
from kvmha.manager.core.routing import AbsenceGraceOver
from kvmha.manager.core.vmindex import occupies
from kvmha.manager.core.vmstate import VmEvent

UNMANAGED_ID_BASE = 1 << 40  # ids the core gives unregistered domains; the service's own ids stay below
_MAINTENANCE = frozenset({ResourceState.MAINTENANCE})  # ErrorInMaintenance hosts keep HA: their VMs could not move
_SHOULD_RUN = frozenset({VmState.RUNNING})
_SETTLING = frozenset({VmState.STARTING, VmState.STOPPING, VmState.MIGRATING})


class Restarts(Protocol):
    """What power-state sync asks of the HA work scheduler (implemented by Scheduler)."""

    def schedule_restart(self, vm: VmRecord, reason: str) -> WorkId | None: ...
    def cancel_for_vm(self, vm: VmRecord, reason: str) -> None: ...
    def has_active(self, vm_id: VmId) -> bool: ...
    def vm_confirmed(self, vm: VmRecord, host_id: HostId) -> bool: ...
    def vm_changed(self, vm: VmRecord) -> None: ...
    def start_reported_off(self, vm: VmRecord) -> bool: ...


class MigrationNews(Protocol):
    """What power-state sync tells migration (implemented by MigrationFlow)."""

    def on_domain(self, host: HostRecord, vm: VmRecord, domain: f.DomainReport) -> bool: ...
    def full_report(self, host: HostRecord, seen: set[str]) -> None: ...
    def host_dead(self, host: HostRecord) -> None: ...
    def cancel(self, vm: VmRecord, reason: str) -> None: ...


class PowerSync:
    def __init__(self, ctx: Ctx, restarts: Restarts, migration: MigrationNews) -> None:
        self.ctx = ctx
        self.restarts = restarts
        self.migration = migration
        self.hypervisor_down: set[HostId] = set()
        self.storage_bad: set[HostId] = set()
        self._next_unmanaged = max(UNMANAGED_ID_BASE, ctx.vms.max_id()) + 1

    # ------------------------------------------------------------ reports

    def on_report(self, host: HostRecord, fact: f.PowerStateReported) -> None:
        if not fact.hypervisor_connected:
            self.hypervisor_lost(host)
            return
        if host.id in self.hypervisor_down:
            self.hypervisor_down.discard(host.id)
            self.ctx.event("info", f"host:{host.id}", "hypervisor", "hypervisor reachable again")
        seen: set[str] = set()
        for domain in fact.domains:
            seen.add(domain.uuid)
            self._apply(host, domain, fact.full)
        if fact.full:
            for vm in self.ctx.vms.on_host(host.id):
                if vm.uuid not in seen and vm.id not in self.ctx.migrations:
                    self._absent(host, vm)
            self.migration.full_report(host, seen)

    def _apply(self, host: HostRecord, domain: f.DomainReport, full: bool) -> None:
        vm = self.ctx.vms.by_uuid(domain.uuid)
        if vm is None:
            if domain.power is PowerState.POWER_ON:
                self._register_unmanaged(host, domain)
            return
        if self.ctx.absent.host_of(vm.id) == host.id:
            self.ctx.absent.pop(vm.id)
            self.ctx.timers.cancel(AbsenceGraceOver(vm.id))
        if vm.state is VmState.UNMANAGED:
            self.ctx.vms.update(vm, host_id=host.id, power=domain.power, at=self.ctx.now)
        elif self.migration.on_domain(host, vm, domain):
            return  # part of a migration: its two sides decide (core/migration.py)
        elif domain.migrating and host.id != vm.host_id:
            # A copy paused for a migration runs no guest code: never a second running copy, never followed.
            self.ctx.event(
                "info",
                f"vm:{vm.id}",
                "vm.power.ignored",
                f"a copy paused for migration on {host.name} ignored: the VM is {vm.state.value} on "
                f"{self.ctx.host_name(vm.host_id)}",
            )
        elif domain.power is PowerState.POWER_ON:
            self._on(host, vm)
        elif vm.host_id == host.id:
            self._off(host, vm, domain.cause, PowerState.POWER_OFF, duplicate_matters=not full)
        elif not full and domain.cause is not StopCause.MIGRATED:  # a migration's old source: expected, no news
            where = self.ctx.host_name(vm.host_id)
            self.ctx.event(
                "info",
                f"vm:{vm.id}",
                "vm.power.ignored",
                f"{domain.power.value} from {host.name} ignored: the VM is recorded on {where}",
            )

    def _absent(self, host: HostRecord, vm: VmRecord) -> None:
        if vm.state is VmState.UNMANAGED:
            if vm.power_state is not PowerState.POWER_OFF:
                self.ctx.vms.set_power(vm, PowerState.POWER_OFF, self.ctx.now)
                self.ctx.save_vm(vm)
            return
        if not occupies(vm) or vm.power_state is PowerState.POWER_REPORT_MISSING or vm.id in self.ctx.absent:
            return
        self.ctx.absent.add(vm.id, host.id)
        grace_s = self.ctx.config.power_report_missing_grace_s
        self.ctx.timers.schedule(AbsenceGraceOver(vm.id), self.ctx.now + grace_s)

    def missing_timeout(self, vm_id: VmId) -> None:
        host_id = self.ctx.absent.pop(vm_id)
        vm = self.ctx.vms.get(vm_id)
        host = self.ctx.hosts.get(host_id) if host_id is not None else None
        if vm is None or host is None or vm.host_id != host.id:
            return
        if host.status is not HostStatus.UP or host.id not in self.ctx.connected:
            return  # the host itself is in question: host HA decides, not a stale absence
        grace_s = self.ctx.config.power_report_missing_grace_s
        self.ctx.event("warning", f"vm:{vm.id}", "vm.power", f"missing from {host.name}'s reports for {grace_s:.0f} s")
        self._off(host, vm, StopCause.OTHER, PowerState.POWER_REPORT_MISSING, duplicate_matters=True)

    # ------------------------------------------------------------ on / off

    def _on(self, host: HostRecord, vm: VmRecord) -> None:
        ctx = self.ctx
        if vm.host_id == host.id and vm.power_state is PowerState.POWER_ON and vm.state is VmState.RUNNING:
            vm.power_state_updated_at = ctx.now  # nothing new: the common case of a periodic full report
            return
        if vm.host_id != host.id:
            self._found_elsewhere(host, vm)
            return
        if self.restarts.vm_confirmed(vm, host.id):
            return
        changed = vm.power_state is not PowerState.POWER_ON
        if vm.state in (VmState.STOPPED, VmState.ERROR, VmState.STARTING):
            severity: Severity = "info" if vm.state is VmState.STARTING else "warning"
            ctx.event(severity, f"vm:{vm.id}", "vm.state", f"runs on {host.name} although {vm.state.value}: Running")
            ctx.vms.update(vm, VmEvent.REPORTED_ON)
            changed = True
        ctx.vms.set_power(vm, PowerState.POWER_ON, ctx.now)
        if changed:
            ctx.save_vm(vm)
            self.restarts.vm_changed(vm)

    def _found_elsewhere(self, host: HostRecord, vm: VmRecord) -> None:
        ctx = self.ctx
        recorded = ctx.hosts.get(vm.host_id) if vm.host_id is not None else None
        where = recorded.name if recorded else "no host"
        if (
            recorded is not None
            and recorded.status is HostStatus.UP
            and recorded.id in ctx.connected
            and vm.power_state is PowerState.POWER_ON
        ):
            ctx.event(
                "alert",
                f"vm:{vm.id}",
                "vm.duplicate",
                f"reported running on {host.name} and on {recorded.name}: two copies? not following",
            )
            return
        ctx.event(
            "warning",
            f"vm:{vm.id}",
            "vm.moved",
            f"found running on {host.name} (recorded on {where}): following it, never starting another copy",
        )
        self.restarts.cancel_for_vm(vm, f"{vm.name} runs on {host.name}")
        self.migration.cancel(vm, f"{vm.name} runs on {host.name}")
        ctx.vms.update(vm, VmEvent.FOLLOWED, host_id=host.id, power=PowerState.POWER_ON, at=ctx.now)
        ctx.save_vm(vm)

    def _off(
        self, host: HostRecord, vm: VmRecord, cause: StopCause, power: PowerState, *, duplicate_matters: bool
    ) -> None:
        ctx = self.ctx
        changed = vm.power_state is not power
        ctx.vms.set_power(vm, power, ctx.now)
        if self.restarts.start_reported_off(vm):
            return
        how = f"{power.value} ({cause.value}) on {host.name}"
        if vm.state in _SHOULD_RUN:
            if cause is StopCause.GUEST_SHUTDOWN and not ctx.config.guest_shutdown_restart:
                self._stopped(vm, f"{how}: the guest shut itself down, not restarted (guest.shutdown.restart=false)")
            elif not vm.ha_enabled:
                self._stopped(vm, f"{how}: not HA-enabled, Stopped")
            elif host.resource_state in _MAINTENANCE:
                # The operator took the host out of HA: a VM found off there stays off, as it would have had the
                # host failed while in maintenance (hostflow skips HA for such hosts too).
                self._stopped(vm, f"{how}: {host.name} is in {host.resource_state.value}, no HA: Stopped")
            elif changed or duplicate_matters:
                if changed:
                    ctx.save_vm(vm)
                self.restarts.schedule_restart(vm, how)
        elif vm.state in _SETTLING and not self.restarts.has_active(vm.id):
            self._stopped(vm, f"{how} while {vm.state.value}: Stopped")
        elif changed:
            ctx.save_vm(vm)
        self.restarts.vm_changed(vm)

    def _stopped(self, vm: VmRecord, message: str) -> None:
        self.ctx.vms.update(vm, VmEvent.POWERED_OFF)
        self.ctx.save_vm(vm)
        self.ctx.event("info", f"vm:{vm.id}", "vm.stopped", message)

    # ------------------------------------------------------------ host-level news

    def host_dead(self, host: HostRecord) -> None:
        """The host is Down or Fenced: nothing runs there any more."""
        self.migration.host_dead(host)  # first: a migration from or to it settles (or waits for the other side)
        for vm in self.ctx.vms.on_host(host.id):
            self.ctx.absent.pop(vm.id)
            self.ctx.timers.cancel(AbsenceGraceOver(vm.id))
            if vm.id in self.ctx.migrations:
                continue  # still unsettled: the other side decides, and HA waits for it
            if vm.state in _SHOULD_RUN | _SETTLING and not vm.ha_enabled:
                self.ctx.vms.set_power(vm, PowerState.POWER_OFF, self.ctx.now)
                self._stopped(vm, f"{host.name} is {host.status.value}: not HA-enabled, Stopped")
            elif vm.power_state is not PowerState.POWER_OFF:
                self.ctx.vms.set_power(vm, PowerState.POWER_OFF, self.ctx.now)
                self.ctx.save_vm(vm)

    def hypervisor_lost(self, host: HostRecord) -> None:
        if host.id in self.hypervisor_down:
            return
        self.hypervisor_down.add(host.id)
        count = 0
        for vm in self.ctx.vms.on_host(host.id):
            self.ctx.absent.pop(vm.id)
            self.ctx.timers.cancel(AbsenceGraceOver(vm.id))
            if vm.power_state is not PowerState.POWER_UNKNOWN:
                self.ctx.vms.set_power(vm, PowerState.POWER_UNKNOWN, self.ctx.now)
                self.ctx.save_vm(vm)
                count += 1
        self.ctx.event(
            "warning",
            f"host:{host.id}",
            "hypervisor",
            f"hypervisor unreachable: power state of {count} VMs unknown (not off, nothing restarted)",
        )

    def storage_status(self, host: HostRecord, ok: bool) -> None:
        if not ok and host.id not in self.storage_bad:
            self.storage_bad.add(host.id)
            self.ctx.event(
                "warning",
                f"host:{host.id}",
                "storage",
                "storage heartbeat failing; host stays Up while its agent link works (no fencing on it)",
            )
        elif ok and host.id in self.storage_bad:
            self.storage_bad.discard(host.id)
            self.ctx.event("info", f"host:{host.id}", "storage", "storage heartbeat ok again")

    def _register_unmanaged(self, host: HostRecord, domain: f.DomainReport) -> None:
        vm = VmRecord(
            id=VmId(self._next_unmanaged),
            uuid=domain.uuid,
            name=domain.name,
            state=VmState.UNMANAGED,
            power_state=PowerState.POWER_ON,
            power_state_updated_at=self.ctx.now,
            host_id=host.id,
        )
        self._next_unmanaged += 1
        self.ctx.vms.add(vm)
        self.ctx.save_vm(vm)
        self.ctx.event(
            "info", f"vm:{vm.id}", "vm.unmanaged", f"unregistered domain {domain.name} on {host.name}: Unmanaged"
        )
