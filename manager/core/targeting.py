"""Targets for HA restarts: placement (core/placement.py) over the core's live view, with the hosts to avoid.

Invariants:
- Avoiding is a preference wherever the host could still run the VM: held-out (flapping) hosts are tried only when
  no stable host fits, and choosing one leaves a `vm.placed.held` event. A VM left down while a host could run it
  is the worse outcome (issue 12: eight VMs waited seven minutes beside two Up hosts with room).
- Excluded outright are only hosts that cannot take a start now: the VM's own failed host while it is not Up, and a
  host a command could not be delivered to (no open agent stream) for one `ping.timeout` — by then it is either back
  or being investigated, and no longer a candidate anyway.
- `target_for` is the whole choice, over a `PlacementView`: the live core calls it on its own state, the what-if
  planner and admission control (core/capacityplan.py) on copies. One implementation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.model import HostId, HostRecord, HostStatus, VmRecord
from kvmha.manager.core.placement import PlacementRequest, choose_host, count_fitting
from kvmha.manager.core.vmindex import VmIndex, occupies


@dataclass(frozen=True, slots=True)
class PlacementView:
    """What a restart target is chosen from: the core's live state, or a planner's copy of it."""

    hosts: Mapping[HostId, HostRecord]
    usage: VmIndex
    candidates: Sequence[HostId]  # Up, ROUTING, connected, in the core's order
    exclude: frozenset[HostId]
    held: frozenset[HostId]  # flapping: tried only when no stable host fits
    config: CoreConfig


def target_for(vm: VmRecord, view: PlacementView, cursor: int) -> tuple[HostRecord | None, str, bool]:
    """(target, why nothing fits, whether the target is a held-out host)."""
    target, why = _choose(vm, view, view.exclude | view.held, cursor)
    if target is not None or not view.held - view.exclude:
        return target, why, False
    fallback, _ = _choose(vm, view, view.exclude, cursor)
    return fallback, why, fallback is not None


def _request(vm: VmRecord, view: PlacementView, exclude: frozenset[HostId]) -> PlacementRequest:
    group = vm.anti_affinity_group
    return PlacementRequest(
        vm,
        exclude,
        frozenset(view.usage.group_hosts(group, vm.id) if group else ()),
        vm.host_id if occupies(vm) else None,
    )


def fits_on_more_than(vm: VmRecord, view: PlacementView, count: int) -> bool:
    """Whether more than `count` hosts of the view could take the VM now, held-out ones included (`target_for`
    falls back to them): what the planner's shortcut (core/capacityplan.py) asks instead of placing."""
    return count_fitting(
        _request(vm, view, view.exclude),
        view.candidates,
        view.hosts,
        view.usage,
        limit=count + 1,
        cpu_ratio=view.config.cpu_overcommit_ratio,
        reserve_mib=view.config.host_memory_reserve_mib,
    ) > count


def _choose(
    vm: VmRecord, view: PlacementView, exclude: frozenset[HostId], cursor: int
) -> tuple[HostRecord | None, str]:
    request = _request(vm, view, exclude)
    return choose_host(
        request,
        view.candidates,
        view.hosts,
        view.usage,
        start=cursor,
        compare=view.config.placement_candidates,
        cpu_ratio=view.config.cpu_overcommit_ratio,
        reserve_mib=view.config.host_memory_reserve_mib,
    )


class Targeting:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self._cursor = 0  # rotating start: consecutive restarts fan out
        self._undeliverable: dict[HostId, float] = {}  # host -> until when it is not a target

    def undeliverable(self, host_id: HostId) -> None:
        """A command to this host found no open stream: not a target for a ping timeout."""
        self._undeliverable[host_id] = self.ctx.now + self.ctx.config.ping_timeout_s

    def place(self, vm: VmRecord) -> tuple[HostRecord | None, str]:
        """A target for the VM, or None and why nothing fits."""
        ctx = self.ctx
        now = ctx.now
        self._undeliverable = {h: until for h, until in self._undeliverable.items() if until > now}
        exclude = set(self._undeliverable)
        old = ctx.hosts.get(vm.host_id) if vm.host_id is not None else None
        if old is not None and old.status is not HostStatus.UP:
            exclude.add(old.id)
        held = ctx.held.at(now)
        self._cursor += 1
        view = PlacementView(ctx.hosts, ctx.vms, ctx.up.ids, frozenset(exclude), frozenset(held), ctx.config)
        target, why, on_held = target_for(vm, view, self._cursor)
        if on_held and target is not None:
            ctx.event(
                "warning",
                f"vm:{vm.id}",
                "vm.placed.held",
                f"no stable host fits: placed on {target.name}, held out as flapping ({why})",
            )
        return target, why

    @property
    def cursor(self) -> int:
        """The rotating start the next placement uses minus one (the planner continues from it)."""
        return self._cursor
