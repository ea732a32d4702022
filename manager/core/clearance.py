"""Step 2 of restart(work): may a VM be started elsewhere, judging by the host it last ran on?

A pure reading of the records: the host's status, whether its agent link is open, the VM's power state there, and
whether the VM is inside its PowerReportMissing grace. Safe only on proof: the host is Down or Fenced, or it is Up
and reports the VM off (or the VM is on no host). A host still being investigated or fenced, or that has not sent
its first full report, means wait; an Up host that reports the VM on means it runs: the work is cancelled. A host
removed or disconnected without investigation will never give proof: cancel, never a restart on hope.
"""

from __future__ import annotations

import enum

from kvmha.manager.core.context import Ctx
from kvmha.manager.core.hoststate import DEAD, SILENT
from kvmha.manager.core.model import HostStatus, PowerState, VmRecord


class Clearance(enum.Enum):
    SAFE = "safe"  # the host is dead or reports the VM off: start it elsewhere
    CANCEL = "cancel"  # it still runs there, or no proof ever will come: the work ends
    WAIT_HOST = "wait_host"  # the host is being investigated or fenced: its verdict wakes the work
    WAIT_POWER = "wait_power"  # the host is up but the VM's power state is not known yet: look again later


def host_clearance(vm: VmRecord, ctx: Ctx) -> tuple[Clearance, str]:
    """The clearance and its reason (for the work's event)."""
    migration = ctx.migrations.get(vm.id)
    if migration is not None:
        # It may run on either side until the migration settles (core/migration.py); that settling wakes the work.
        return Clearance.WAIT_POWER, f"its migration to {ctx.host_name(migration.target)} is not settled"
    if vm.host_id is None:
        return Clearance.SAFE, "not on any host"
    host = ctx.hosts.get(vm.host_id)
    if host is None or host.status is HostStatus.REMOVED:
        return Clearance.CANCEL, "its host was removed: not restarted without proof it is off"
    if host.status in DEAD:
        return Clearance.SAFE, f"{host.name} is {host.status.value}"
    if host.status in SILENT or host.status is HostStatus.CONNECTING:
        # Connecting: its first full report (which settles the VM's power state) is still to come.
        return Clearance.WAIT_HOST, f"{host.name} is {host.status.value}"
    if host.status is HostStatus.DISCONNECTED:
        return Clearance.CANCEL, f"{host.name} is disconnected without investigation ({host.resource_state.value})"
    if host.id not in ctx.connected or vm.power_state is PowerState.POWER_UNKNOWN:
        return Clearance.WAIT_POWER, f"power state on {host.name} unknown"
    if vm.id in ctx.absent:
        return Clearance.WAIT_POWER, f"absent from {host.name}'s last full report, inside the grace"
    if vm.power_state is PowerState.POWER_ON:
        return Clearance.CANCEL, f"it runs on {host.name}"
    return Clearance.SAFE, f"{host.name} reports it {vm.power_state.value}"
