"""Targets for HA restarts: placement (core/placement.py) over the core's live view, with the hosts to avoid.

Invariants:
- Avoiding is a preference wherever the host could still run the VM: held-out (flapping) hosts are tried only when
  no stable host fits, and choosing one leaves a `vm.placed.held` event. A VM left down while a host could run it
  is the worse outcome (issue 12: eight VMs waited seven minutes beside two Up hosts with room).
- Excluded outright are only hosts that cannot take a start now: the VM's own failed host while it is not Up, and a
  host a command could not be delivered to (no open agent stream) for one `ping.timeout` — by then it is either back
  or being investigated, and no longer a candidate anyway.
"""

from __future__ import annotations

from kvmha.manager.core.context import Ctx
from kvmha.manager.core.model import HostId, HostRecord, HostStatus, VmRecord
from kvmha.manager.core.placement import PlacementRequest, choose_host
from kvmha.manager.core.vmindex import occupies


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
        target, why = self._choose(vm, exclude | held)
        if target is not None or not held - exclude:
            return target, why
        fallback, _ = self._choose(vm, exclude)
        if fallback is not None:
            ctx.event(
                "warning",
                f"vm:{vm.id}",
                "vm.placed.held",
                f"no stable host fits: placed on {fallback.name}, held out as flapping ({why})",
            )
        return fallback, why

    def _choose(self, vm: VmRecord, exclude: set[HostId]) -> tuple[HostRecord | None, str]:
        ctx, group = self.ctx, vm.anti_affinity_group
        request = PlacementRequest(
            vm,
            frozenset(exclude),
            frozenset(ctx.vms.group_hosts(group, vm.id) if group else ()),
            vm.host_id if occupies(vm) else None,
        )
        return choose_host(
            request,
            ctx.up.ids,
            ctx.hosts,
            ctx.vms,
            start=self._cursor,
            compare=ctx.config.placement_candidates,
            cpu_ratio=ctx.config.cpu_overcommit_ratio,
            reserve_mib=ctx.config.host_memory_reserve_mib,
        )
