"""Placement: which host a VM is restarted on.

Candidates are hosts that are Up, ROUTING and connected (the caller passes their ids in order); one fits when it
is Enabled, not the failed host, not held out for flapping, reaches every disk of the VM on the same storage
(core/vmneeds.py; a storage is known by the identity its hosts report, not by its path), has every network and bridge
the VM attaches to, has the VM's memory free (never overcommitted: capacity - the hypervisor's reserve - what the
manager placed there, capped by the free memory the host reports) and its vCPUs (x cpu.overcommit.ratio), and no other
member of the VM's anti-affinity group holds resources there. Among the first `placement.candidates` fitting hosts
(from a rotating start, so consecutive restarts fan out) the one with the largest share of free memory wins: VMs
spread. When nothing fits, the reason names the hosts that failed each test, grouped, for the event the operator reads.

Operator starts, HA restarts, migrations, admission control and the what-if planner all call `choose_host`: one set of
rules. A host whose agent reports no inventory (an older agent) is not tested for storage and networks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvmha.manager.core.model import HostId, HostRecord, ResourceState, VmRecord
from kvmha.manager.core.vmindex import VmIndex
from kvmha.manager.core.vmneeds import VmNeeds, mount_of, needs_of

NAMED_HOSTS = 4  # hosts named per refusal reason; the rest are counted


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    vm: VmRecord
    exclude: frozenset[HostId]  # the failed host, hosts held out
    group_hosts: frozenset[HostId]  # hosts where the VM's anti-affinity group already runs
    own_host: HostId | None = None  # where the VM's own record still holds resources (they free up when it moves)


def _misfit(
    host: HostRecord, req: PlacementRequest, usage: VmIndex, cpu_ratio: float, reserve_mib: int,
    needs: VmNeeds, wanted: Mapping[str, str | None], reference: HostRecord | None,
) -> str | None:
    """Why `host` cannot take the VM, or None when it fits."""
    if host.id in req.exclude:
        return "excluded (failed or held out)"
    if host.resource_state is not ResourceState.ENABLED:
        return f"{host.resource_state.value}"
    if host.id in req.group_hosts:
        return "anti-affinity group already there"
    missing = _storage_misfit(host, needs, wanted, reference) or _network_misfit(host, needs)
    if missing is not None:
        return missing
    own_memory, own_vcpus = (req.vm.memory_mib, req.vm.vcpus) if host.id == req.own_host else (0, 0)
    if free_memory_mib(host, usage, reserve_mib) + own_memory < req.vm.memory_mib:
        return "not enough free memory"
    free_vcpus = int(host.capacity.cpus * cpu_ratio) - usage.used_vcpus[host.id] + own_vcpus
    if free_vcpus < req.vm.vcpus:
        return "not enough free vCPUs"
    return None


def free_memory_mib(host: HostRecord, usage: VmIndex, default_reserve_mib: int) -> int:
    """Memory a new VM may take: capacity - reserve - placed, capped by what the host reports free."""
    inventory = host.inventory
    reserve = default_reserve_mib if inventory.memory_reserve_mib is None else inventory.memory_reserve_mib
    free = host.capacity.memory_mib - reserve - usage.used_memory_mib[host.id]
    if inventory.free_memory_mib is not None:
        free = min(free, inventory.free_memory_mib)
    return free


def disk_identity(host: HostRecord | None, path: str) -> str | None:
    """The storage a disk path lives on as `host` sees it; None when the host does not say (unreported, not under
    any reported storage)."""
    if host is None or not host.inventory.reported:
        return None
    storage = host.inventory.storage
    mount = mount_of(path, tuple(s.mount for s in storage))
    return next((s.identity for s in storage if s.mount == mount), None)


def wanted_storage(
    needs: VmNeeds, reference: HostRecord | None, hosts: Mapping[HostId, HostRecord]
) -> dict[str, str | None]:
    """Per disk path, the storage it lives on: as the VM's own (or last) host sees it; for a VM that never ran on a
    reporting host, the storage most reporting hosts have at that path (ties: the smallest identity). None: nobody
    reports storage there."""
    wanted: dict[str, str | None] = {}
    for path in needs.disks:
        if reference is not None:
            wanted[path] = disk_identity(reference, path)
            continue
        seen = Counter(disk_identity(host, path) for host in hosts.values() if host.inventory.reported)
        seen.pop(None, None)
        wanted[path] = min(seen, key=lambda identity: (-seen[identity], identity)) if seen else None
    return wanted


def _storage_misfit(
    host: HostRecord, needs: VmNeeds, wanted_at: Mapping[str, str | None], reference: HostRecord | None
) -> str | None:
    """A disk the host cannot reach: no storage at its path, another storage there, or its storage unhealthy."""
    if not host.inventory.reported:
        return None
    storage = host.inventory.storage
    mounts = tuple(s.mount for s in storage)
    for path in needs.disks:
        wanted = wanted_at[path]
        if wanted is None and reference is not None:
            if host is reference:
                continue  # outside any storage its own host reports: a local disk, and this is that host
            return f"lacks storage of {path} (local to {reference.name})"
        mount = mount_of(path, mounts)
        found = next((s for s in storage if s.mount == mount), None)
        if found is None or (wanted is not None and found.identity != wanted):
            return f"lacks storage {wanted or path}"
        if not found.healthy:
            return f"storage {found.identity} unhealthy"
    return None


def _network_misfit(host: HostRecord, needs: VmNeeds) -> str | None:
    if not host.inventory.reported:
        return None
    missing = sorted(needs.networks - host.inventory.networks)
    return f"lacks {', '.join(missing)}" if missing else None


def _score(host: HostRecord, usage: VmIndex) -> tuple[float, int, int]:
    total = max(host.capacity.memory_mib, 1)
    free_share = (host.capacity.memory_mib - usage.used_memory_mib[host.id]) / total
    return (-free_share, usage.placed_count[host.id], host.id)


def reference_host(vm: VmRecord, hosts: Mapping[HostId, HostRecord]) -> HostRecord | None:
    """The host whose view of the storage says where the VM's disks live: its own, else its last."""
    for host_id in (vm.host_id, vm.last_host_id):
        host = hosts.get(host_id) if host_id is not None else None
        if host is not None and host.inventory.reported:
            return host
    return None


def choose_host(
    req: PlacementRequest,
    candidates: Sequence[HostId],
    hosts: Mapping[HostId, HostRecord],
    usage: VmIndex,
    *,
    start: int,
    compare: int,
    cpu_ratio: float,
    reserve_mib: int = 0,
) -> tuple[HostRecord | None, str]:
    """Pick a host for `req.vm` among `candidates`; returns (host, "") or (None, why not)."""
    if not candidates:
        return None, "no Up and Enabled host to place it on"
    needs = needs_of(req.vm.domain_xml)
    reference = reference_host(req.vm, hosts)
    wanted = wanted_storage(needs, reference, hosts)
    fitting: list[HostRecord] = []
    misfits: dict[str, list[str]] = {}
    count = len(candidates)
    for step in range(count):
        host = hosts[candidates[(start + step) % count]]
        why = _misfit(host, req, usage, cpu_ratio, reserve_mib, needs, wanted, reference)
        if why is None:
            fitting.append(host)
            if len(fitting) >= compare:
                break
        else:
            misfits.setdefault(why, []).append(host.name)
    if fitting:
        return min(fitting, key=lambda host: _score(host, usage)), ""
    return None, f"no host fits {req.vm.memory_mib} MiB / {req.vm.vcpus} vCPUs ({refusals(misfits)})"


def count_fitting(
    req: PlacementRequest,
    candidates: Iterable[HostId],
    hosts: Mapping[HostId, HostRecord],
    usage: VmIndex,
    *,
    limit: int,
    cpu_ratio: float,
    reserve_mib: int = 0,
) -> int:
    """How many of `candidates` fit `req.vm` by the same tests as `choose_host`, counting up to `limit`."""
    needs = needs_of(req.vm.domain_xml)
    reference = reference_host(req.vm, hosts)
    wanted = wanted_storage(needs, reference, hosts)
    found = 0
    for host_id in candidates:
        if found >= limit:
            break
        if _misfit(hosts[host_id], req, usage, cpu_ratio, reserve_mib, needs, wanted, reference) is None:
            found += 1
    return found


def refusals(misfits: Mapping[str, list[str]]) -> str:
    """'not enough free memory: h1, h2; lacks bridge:br1: h3 and 4 more': per reason, the hosts refused for it."""
    parts = []
    for why, names in sorted(misfits.items()):
        ordered = sorted(names, key=_natural)
        shown = ", ".join(ordered[:NAMED_HOSTS])
        more = len(ordered) - NAMED_HOSTS
        parts.append(f"{why}: {shown}" + (f" and {more} more" if more > 0 else ""))
    return "; ".join(parts)


def _natural(name: str) -> tuple[str, int, str]:
    """h2 before h10."""
    stem = name.rstrip("0123456789")
    digits = name[len(stem):]
    return (stem, int(digits) if digits else -1, name)
