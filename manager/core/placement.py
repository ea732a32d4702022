"""Placement: which host a VM is restarted on.

Candidates are hosts that are Up, ROUTING and connected (the caller passes their ids in order); one fits when it
is Enabled, not the failed host, not held out for flapping, and its reported capacity minus what is already placed there
holds the VM's memory (never overcommitted) and vCPUs (x cpu.overcommit.ratio), and no other member of the VM's
anti-affinity group holds resources there. Among the first `placement.candidates` fitting hosts (from a rotating
start, so consecutive restarts fan out) the one with the largest share of free memory wins: VMs spread.
When nothing fits, the reason names how many hosts failed which test, for the event the operator reads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvmha.manager.core.model import HostId, HostRecord, ResourceState, VmRecord
from kvmha.manager.core.vmindex import VmIndex


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    vm: VmRecord
    exclude: frozenset[HostId]  # the failed host, hosts held out
    group_hosts: frozenset[HostId]  # hosts where the VM's anti-affinity group already runs
    own_host: HostId | None = None  # where the VM's own record still holds resources (they free up when it moves)


def _misfit(host: HostRecord, req: PlacementRequest, usage: VmIndex, cpu_ratio: float) -> str | None:
    """Why `host` cannot take the VM, or None when it fits."""
    if host.id in req.exclude:
        return "excluded (failed or held out)"
    if host.resource_state is not ResourceState.ENABLED:
        return f"{host.resource_state.value}"
    if host.id in req.group_hosts:
        return "anti-affinity group already there"
    own_memory, own_vcpus = (req.vm.memory_mib, req.vm.vcpus) if host.id == req.own_host else (0, 0)
    free_memory = host.capacity.memory_mib - usage.used_memory_mib[host.id] + own_memory
    if free_memory < req.vm.memory_mib:
        return "not enough free memory"
    free_vcpus = int(host.capacity.cpus * cpu_ratio) - usage.used_vcpus[host.id] + own_vcpus
    if free_vcpus < req.vm.vcpus:
        return "not enough free vCPUs"
    return None


def _score(host: HostRecord, usage: VmIndex) -> tuple[float, int, int]:
    total = max(host.capacity.memory_mib, 1)
    free_share = (host.capacity.memory_mib - usage.used_memory_mib[host.id]) / total
    return (-free_share, usage.placed_count[host.id], host.id)


def choose_host(
    req: PlacementRequest,
    candidates: Sequence[HostId],
    hosts: Mapping[HostId, HostRecord],
    usage: VmIndex,
    *,
    start: int,
    compare: int,
    cpu_ratio: float,
) -> tuple[HostRecord | None, str]:
    """Pick a host for `req.vm` among `candidates`; returns (host, "") or (None, why not)."""
    if not candidates:
        return None, "no Up and Enabled host to place it on"
    fitting: list[HostRecord] = []
    misfits: Counter[str] = Counter()
    count = len(candidates)
    for step in range(count):
        host = hosts[candidates[(start + step) % count]]
        why = _misfit(host, req, usage, cpu_ratio)
        if why is None:
            fitting.append(host)
            if len(fitting) >= compare:
                break
        else:
            misfits[why] += 1
    if fitting:
        return min(fitting, key=lambda host: _score(host, usage)), ""
    details = ", ".join(f"{n} {why}" for why, n in sorted(misfits.items()))
    return None, f"no host fits {req.vm.memory_mib} MiB / {req.vm.vcpus} vCPUs ({details})"
