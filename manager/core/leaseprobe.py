"""Disk-lease evidence (issue 11): before a silent host is declared dead on anything but its power being off, a
healthy neighbour probes the disk lease of every VM that occupies the host (CheckLease: virtlockd's lockspace on the
shared storage, tested with F_GETLK, never taken).

Invariants:
- Probes are asked only when the decision table says CHECK_LEASES (self-fence or operator verdicts); a BMC that reads
  off or a confirmed fence never waits for them.
- One CheckLease per occupying VM, spread round the host's Up neighbours; every probe has a deadline, and an answer
  that never comes counts as UNKNOWN (it never blocks, it never proves).
- A held lease means some QEMU still holds that disk: the host is not declared Down (none of its VMs is started
  elsewhere), one event per such VM says so, and the host is fenced if it can be, else it waits in Alert.
- Nothing here proves death: FREE only says there is no reason to wait (docs/watchdog.md: what a lease proves).
"""

from __future__ import annotations

from kvmha.manager.core.actions import CheckLease
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.investigation import Investigation, Lease, LeaseEvidence
from kvmha.manager.core.model import HostRecord, RequestId, VmId
from kvmha.manager.core.routing import LeaseQuery
from kvmha.manager.core.vmindex import occupies

STATES = {"held": Lease.HELD, "free": Lease.FREE, "unknown": Lease.UNKNOWN}


def start(ctx: Ctx, host: HostRecord, inv: Investigation) -> None:
    """Ask for the leases of the host's VMs; `inv.leases` says what was asked (or, in its note, why nothing was)."""
    config = ctx.config
    evidence = inv.leases = LeaseEvidence()
    vms = [vm for vm in ctx.vms.on_host(host.id) if occupies(vm)]
    neighbors = ctx.up.after(host.id, config.neighbors_per_investigation)
    if not config.lease_probe:
        evidence.note = "lease.probe is off"
    elif not host.lease_manager:
        evidence.note = f"{host.name} runs without disk leases"
    elif not vms:
        evidence.note = "no VM to probe"
    elif not neighbors:
        evidence.note = "no Up neighbour to probe from"
    if evidence.note:
        return
    timeout_s = config.lease_probe_timeout_s
    for index, vm in enumerate(vms):
        # The command's own deadline leaves the agent its whole probe timeout plus the link's round trip.
        command = CheckLease(vm.uuid, vm.domain_xml, timeout_s)
        request_id = ctx.send(LeaseQuery(host.id, vm.id), neighbors[index % len(neighbors)], command, timeout_s + 1.0)
        evidence.asked[request_id] = (vm.id, vm.name)
        inv.pending.add(request_id)
    inv.deadline_at = max(inv.deadline_at, ctx.now + timeout_s + 1.0)


def answer(inv: Investigation, request_id: RequestId, prober: str, state: str, detail: str) -> None:
    assert inv.leases is not None
    lease = STATES.get(state, Lease.UNKNOWN)
    inv.leases.answer(request_id, lease, f"seen from {prober}{': ' + detail if detail else ''}")


def tell_held(ctx: Ctx, host: HostRecord, inv: Investigation, told: set[VmId]) -> None:
    """One event per VM whose lease is held, once per silence of its host (`told`: the VMs already named): it is not
    started elsewhere, and why. The host's status line names every held lease at each verdict anyway."""
    if inv.leases is None:
        return
    for vm_id, held in inv.leases.held:
        if vm_id in told:
            continue
        told.add(vm_id)
        ctx.event(
            "alert",
            f"vm:{vm_id}",
            "vm.lease.held",
            f"{held}: its disk lease is held, some QEMU still holds its disk: not started elsewhere; "
            f"{host.name} may be alive",
        )
