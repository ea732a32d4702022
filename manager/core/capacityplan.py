"""What-if planning and admission control (issue 16): what the core would do if some hosts failed now.

Theory of operation: `plan_failure` copies the core's VM index, marks the failed hosts out, and walks their VMs in
the order the scheduler would take their restarts (higher `restart_priority` first, then by VM id, host by host), each
through `targeting.target_for` — the very function HA restarts use — continuing the live rotating cursor, and books
each placed VM on its target in the copy, as a Starting VM holds its resources in the live core. `admission` asks,
for every set of N Up hosts, whether every HA VM of that set would find a place; N = `admission.host.failures`.
A set whose HA VMs are sure to be placed (`surely_restarted`: a few host tests per VM) is not planned; the others are.

Invariants:
- Pure: nothing here changes the core's state (the index is a copy; host records are read, never written).
- One implementation: placement is `target_for`/`choose_host`; order is the scheduler's heap order; the shortcut
  tests hosts with placement's own tests (`count_fitting`) and never changes an answer, only skips a plan.
- The estimate is an estimate: detection + verdict from the configuration, then restarts in waves of `ha.workers`,
  each wave before a VM's the cluster's measured start time, its own start the one measured on its target
  (core/starttimes.py; 1.1 s until starts were measured).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.model import HostId, HostRecord, ResourceState, VmId, VmRecord, VmState
from kvmha.manager.core.placement import free_memory_mib
from kvmha.manager.core.starttimes import StartEstimate
from kvmha.manager.core.targeting import PlacementView, fits_on_more_than, target_for
from kvmha.manager.core.vmindex import VmIndex, occupies

RESTARTABLE = frozenset({VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING})
EARLY_NOTICE_S = 1.3  # a lost link noticed by keepalive (~1 s) + a BMC query (decisions.md, "Evidence at once")
MAX_FAILURE_SETS = 5000  # admission tries at most this many host sets (N >= 2 on large clusters: the first ones)


@dataclass(frozen=True, slots=True)
class PlannedVm:
    vm_id: VmId
    name: str
    from_host: str
    ha: bool
    target: str | None  # None: not restarted (HA off) or no capacity
    reason: str  # why no target; "" when placed
    order: int  # 1-based restart order among the HA VMs; 0 for VMs that are not restarted
    eta_s: float | None  # seconds after the failure at which it should run again


@dataclass(frozen=True, slots=True)
class World:
    """The part of the core's state a plan reads: hosts, VMs, Up candidates in the core's order, held-out hosts,
    the configuration and the live placement cursor."""

    hosts: Mapping[HostId, HostRecord]
    vms: VmIndex
    up: Sequence[HostId]
    held: frozenset[HostId]
    config: CoreConfig
    cursor: int
    starts: StartEstimate = dataclasses.field(default_factory=StartEstimate)


class PlanIndex(VmIndex):
    """The live index seen through a plan's bookings: usage sums copied (O(hosts), C-level dict copies), records and
    the host/group indexes shared and never changed; a booked VM counts on its target, and for anti-affinity it is
    there. What placement reads (usage sums, group_hosts, on_host) is all it offers: a plan is O(hosts + its VMs),
    not O(VMs), so admission over every host stays affordable on large clusters (bench/capacity_plan.py)."""

    def __init__(self, base: VmIndex) -> None:  # no super().__init__: nothing of the base is copied but the sums
        self._base = base
        self.used_memory_mib = defaultdict(int, base.used_memory_mib)
        self.used_vcpus = defaultdict(int, base.used_vcpus)
        self.placed_count = defaultdict(int, base.placed_count)
        self._booked: dict[VmId, VmRecord] = {}  # copies of booked VMs, Starting on their target

    def book(self, vm: VmRecord, host_id: HostId) -> None:
        """The VM starts on `host_id` (its old host is failed: what it held there no longer matters)."""
        self.used_memory_mib[host_id] += vm.memory_mib
        self.used_vcpus[host_id] += vm.vcpus
        self.placed_count[host_id] += 1
        self._booked[vm.id] = dataclasses.replace(vm, host_id=host_id, state=VmState.STARTING)

    def as_ha(self, vm: VmRecord) -> None:
        """The VM, where it is, counts as an HA VM (HA switched on for a VM that runs: nothing moves)."""
        self._booked[vm.id] = dataclasses.replace(vm, ha_enabled=True)

    def group_hosts(self, group: str, except_vm: VmId) -> set[HostId]:
        hosts = self._base.group_hosts(group, except_vm)
        hosts.update(
            vm.host_id for vm in self._booked.values()
            if vm.anti_affinity_group == group and vm.id != except_vm and vm.host_id is not None
        )
        return hosts

    def on_host(self, host_id: HostId) -> list[VmRecord]:
        here = [vm for vm in self._base.on_host(host_id) if vm.id not in self._booked]
        here.extend(vm for vm in self._booked.values() if vm.host_id == host_id)
        return sorted(here, key=lambda vm: vm.id)

    def get(self, vm_id: VmId) -> VmRecord | None:
        return self._booked.get(vm_id) or self._base.get(vm_id)


def world_of(ctx: Ctx, cursor: int, starts: StartEstimate | None = None) -> World:
    """The live core's state as a plan reads it (not copied: plans copy what they change)."""
    return World(ctx.hosts, ctx.vms, list(ctx.up.ids), frozenset(ctx.held.at(ctx.now)), ctx.config, cursor,
                 starts or StartEstimate())


def restart_order(vms: Iterable[VmRecord]) -> list[VmRecord]:
    """The scheduler's heap order for one batch: (-priority, scheduling order); scheduling goes host by host, VM id
    order within a host."""
    return sorted(vms, key=lambda vm: -vm.restart_priority)  # stable: keeps the scheduling order within a priority


def detection_s(host: HostRecord, config: CoreConfig) -> float:
    """From the failure to the verdict that lets its VMs restart (power loss; decisions.md timelines)."""
    if host.has_bmc:
        return EARLY_NOTICE_S
    if host.watchdog_timeout_s is not None and config.isolation_self_fence:
        return (config.ping_timeout_s + config.isolation_after_s + host.watchdog_timeout_s
                + config.isolation_margin_s + config.isolation_link_slack_s)
    return float("inf")  # waits for an operator's confirm-down


def plan_failure(world: World, failed: Sequence[HostId]) -> list[PlannedVm]:
    """Per VM of the failed hosts, in restart order: its target, or why it has none, and when it should run."""
    lost = frozenset(failed)
    usage = PlanIndex(world.vms)
    candidates = [h for h in world.up if h not in lost]
    view = PlacementView(world.hosts, usage, candidates, lost, world.held - lost, world.config)
    scheduled: list[VmRecord] = []
    plans: list[PlannedVm] = []
    for host_id in failed:
        for vm in usage.on_host(host_id):
            if vm.ha_enabled and vm.state in RESTARTABLE:
                scheduled.append(vm)
            elif vm.state in RESTARTABLE:
                plans.append(PlannedVm(vm.id, vm.name, world.hosts[host_id].name, False, None,
                                       "HA off: stays Stopped", 0, None))
    cursor, workers = world.cursor, max(1, world.config.ha_workers)
    for order, vm in enumerate(restart_order(scheduled), start=1):
        cursor += 1
        source = world.hosts[vm.host_id] if vm.host_id is not None else None
        target, why, _ = target_for(vm, view, cursor)
        detect = detection_s(source, world.config) if source is not None else 0.0
        eta = detect + (order - 1) // workers * world.starts.cluster_s + world.starts.on(target.id if target else None)
        if target is not None:
            usage.book(vm, target.id)
        plans.append(PlannedVm(vm.id, vm.name, source.name if source else "-", True,
                               target.name if target else None, why, order,
                               eta if target is not None and eta != float("inf") else None))
    return plans


@dataclass(frozen=True, slots=True)
class Headroom:
    host: str
    free_memory_mib: int
    reserve_mib: int
    free_vcpus: int
    inventory_reported: bool


def headroom(world: World) -> list[Headroom]:
    """Room left per Up host, as placement counts it."""
    rows = []
    for host_id in world.up:
        host = world.hosts[host_id]
        own = host.inventory.memory_reserve_mib
        reserve = world.config.host_memory_reserve_mib if own is None else own
        vcpus = int(host.capacity.cpus * world.config.cpu_overcommit_ratio) - world.vms.used_vcpus[host_id]
        rows.append(Headroom(host.name, free_memory_mib(host, world.vms, world.config.host_memory_reserve_mib),
                             reserve, vcpus, host.inventory.reported))
    return rows


@dataclass(frozen=True, slots=True)
class Admission:
    ok: bool
    failures: tuple[str, ...] = ()  # the host set that breaks the reserve (names)
    stranded: tuple[str, ...] = ()  # HA VMs that would not be restarted after it
    message: str = ""


def failure_sets(world: World, count: int) -> Iterable[tuple[HostId, ...]]:
    # a host without an HA VM to restart strands nothing when it fails alone
    enabled = [h for h in world.up if world.hosts[h].resource_state is ResourceState.ENABLED
               and (count > 1 or any(vm.ha_enabled for vm in world.vms.on_host(h)))]
    return itertools.islice(itertools.combinations(enabled, min(count, len(enabled))), MAX_FAILURE_SETS)


def surely_restarted(world: World, failed: Sequence[HostId]) -> bool:
    """True when every HA VM of `failed` is sure to be placed, without planning: the k-th of them in restart order
    (from 0) fits on more than k of the other hosts now. Each restart planned before it books room on one host and,
    for anti-affinity, rules out at most that same host, so at least one host still fits it, and placement returns a
    host whenever one fits (held-out hosts included, as a fallback). Sufficient, not necessary: when it says False the
    plan is made. It scans a few hosts per VM where a plan compares `placement.candidates` of them, so admission over
    a roomy cluster costs a fraction of a plan per host (bench/capacity_plan.py)."""
    lost = frozenset(failed)
    view = PlacementView(world.hosts, world.vms, world.up, lost, frozenset(), world.config)
    order = restart_order(vm for host_id in failed for vm in world.vms.on_host(host_id)
                          if vm.ha_enabled and vm.state in RESTARTABLE)
    return all(fits_on_more_than(vm, view, before) for before, vm in enumerate(order))


def worst_failure(world: World, count: int) -> tuple[tuple[HostId, ...], list[PlannedVm]]:
    """The set of `count` hosts whose loss strands the most HA VMs (the first such set), and the plan for it; when
    none strands any, the first set. A set whose HA VMs are surely restarted (`surely_restarted`) strands none and is
    not planned: the answer is the one planning every set gives."""
    worst: tuple[tuple[HostId, ...], list[PlannedVm]] | None = None
    worst_stranded = 0
    first: tuple[HostId, ...] | None = None
    for failed in failure_sets(world, count):
        first = failed if first is None else first
        if surely_restarted(world, failed):
            continue
        plan = plan_failure(world, failed)
        stranded = sum(1 for p in plan if p.ha and p.target is None)
        if stranded > worst_stranded:
            worst, worst_stranded = (failed, plan), stranded
    if worst is not None:
        return worst
    return ((), []) if first is None else (first, plan_failure(world, first))


def admission(world: World, vm: VmRecord | None = None) -> Admission:
    """Would every HA VM still be restarted after the worst `admission.host.failures` hosts fail, with `vm` counted
    as an HA VM: one about to start placed where a start would put it now, one that runs (HA switched on) where it
    is? HA restarts never ask this."""
    count = world.config.admission_host_failures
    enabled = [h for h in world.up if world.hosts[h].resource_state is ResourceState.ENABLED]
    if count <= 0 or len(enabled) <= count:
        return Admission(True)  # off, or too few hosts to survive N failures at all: nothing to keep in reserve
    if vm is not None:
        usage = PlanIndex(world.vms)
        if occupies(vm):
            usage.as_ha(vm)
        else:
            view = PlacementView(world.hosts, world.vms, world.up, frozenset(), world.held, world.config)
            target, _, _ = target_for(vm, view, world.cursor + 1)
            if target is None:
                return Admission(True)  # it fits nowhere now: the start waits with its own reason
            usage.book(dataclasses.replace(vm, ha_enabled=True), target.id)
        world = dataclasses.replace(world, vms=usage)
    failed, plan = worst_failure(world, count)
    if not failed:
        return Admission(True)
    stranded = tuple(p.name for p in plan if p.ha and p.target is None)
    if not stranded:
        return Admission(True)
    names = tuple(world.hosts[h].name for h in failed)
    return Admission(
        False, names, stranded,
        f"admission control (admission.host.failures = {count}): if {', '.join(names)} failed, "
        f"{len(stranded)} HA VM(s) could not be restarted ({', '.join(stranded[:5])}"
        f"{' ...' if len(stranded) > 5 else ''})",
    )
