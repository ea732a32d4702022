"""The liveness checker: every HA VM that lost its run is running again within a bound, whenever a host could take it.

The safety checker (sim/invariants.py) proves the manager never makes two copies; a manager that never restarts
anything passes it. This one proves the second promise: an HA VM is running again as soon as some host can run it.

Theory of operation. The world tells the checker when a VM stops running and why (`lost`). From then the VM is *owed*
a restart, with a bound that depends on the cause (`bound_s`, derived from the configuration; the table is in
docs/decisions.md). Every `SAMPLE_S` of simulated time the checker credits each owed VM with the time that passed —
but only while the promise applies:

- the manager runs, its database answers, and the startup grace of a restarted manager is over (an outage is
  counted from its end, plus the driver's longest retry back-off);
- some host could take the VM now (ground truth: powered, its agent connected, the core has it Up and Enabled,
  free memory and vCPUs for the VM beside what really runs there, no member of the VM's anti-affinity group there).

A VM whose credited time exceeds its bound is a violation, reported once in the same list as safety violations.
Outside the promise (the VM is dropped): non-HA VMs, HA switched off, guest shutdowns (unless configured to restart),
VMs destroyed on the manager's order (operator stop), VMs whose host the operator put in Maintenance (or Disabled
with ha.disabled.hosts false: the core leaves those alone and says so in an event), a VM in Error after its *own*
crash loop
(`restart.max.per.window` crashes of the VM itself in `restart.window`), and hosts that can never be proven dead
(no usable BMC and self-fencing switched off).

A host that loses power and is on again before the core proved it dead (a watchdog reset, a quick power cycle)
reads as alive to its BMC and neighbours: only its agent's report can show its VMs gone, so their promise waits for
the agent and then counts as for VMs found off by their host ("host-back"); a verdict of dead meanwhile counts as a
fence.

Cascades: when a host dies that the core had chosen as the owed VM's restart target, the VM's clock starts over with
that host's cause — the restart in flight died with it, and the bound for the new cause applies from then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.investigation import self_fenced_after_s
from kvmha.manager.core.model import HostId, HostStatus, ResourceState, VmRecord, VmState, VmUuid

if TYPE_CHECKING:
    from kvmha.manager.sim.simulator import Simulator
    from kvmha.manager.sim.world import SimHost, SimVm

SAMPLE_S = 1.0
DB_RETRY_MAX_S = 10.0  # the driver's longest back-off (driver.DB_RETRY_MAX_S): its first write after an outage

# Causes: how an HA VM lost its run.
BMC_OFF = "bmc-off"  # its host lost power; the BMC answers and says so
FENCE = "fence"  # its host was fenced (power off confirmed) while the VM ran there
SELF_FENCE = "self-fence"  # no usable BMC (none, dead, failing): proven dead by silence after the self-fence time
CRASH = "crash"  # the VM itself died; its host reports it
HOST_BACK = "host-back"  # its host lost power and came back before proven dead: its agent reports the VM missing
CAUSES = (BMC_OFF, FENCE, SELF_FENCE, CRASH, HOST_BACK)

# How a VM-level stop happened (the world tells): only some of them owe a restart.
WHY_CRASH = "crash"
WHY_GUEST = "guest-shutdown"
WHY_DESTROYED = "destroyed"  # on the manager's order
WHY_ISOLATED = "isolated"  # the agent's isolation response destroyed it

_OUTSIDE = frozenset({ResourceState.MAINTENANCE})  # ErrorInMaintenance hosts keep HA (their VMs could not move)


def bound_s(cause: str, config: CoreConfig, watchdog_timeout_s: float = 20.0) -> float:
    """Seconds within which an HA VM that lost its run for `cause` must run again (inf: never promised).
    `watchdog_timeout_s`: the bound of the watchdog behind the host's agent (self-fence only)."""
    detect_s = config.ping_timeout_s + config.ping_interval_s  # last ping up to one interval before the death
    # One attempt may be lost (its target died or refused): it is answered within start.timeout, and the next attempt
    # comes restart.retry.interval later; then the start itself, confirmed by the target's report.
    start_s = 2 * config.start_timeout_s + config.restart_retry_interval_s
    match cause:
        case "bmc-off":
            return detect_s + config.investigation_timeout_s + start_s
        case "fence":
            return detect_s + config.investigation_timeout_s + config.fence_timeout_s + start_s
        case "self-fence":
            # Silence proves death only after the watchdog-backed self-fence time (isolation.after + the watchdog's
            # bound + margin, and the link slack more of silence), counted from the last ping; the check that sees
            # it comes at most one re-investigation interval later.
            self_fenced_s = self_fenced_after_s(config.isolation_after_s, config.isolation_margin_s, watchdog_timeout_s)
            wait_s = (
                self_fenced_s
                + config.isolation_link_slack_s
                + config.investigate_retry_interval_s
                + config.investigation_timeout_s
            )
            return detect_s + wait_s + start_s
        case "crash" | "host-back":
            return config.ping_interval_s + config.power_report_missing_grace_s + start_s
    raise ValueError(f"unknown cause {cause!r}")


@dataclass(slots=True)
class Owed:
    cause: str
    since: float
    bound_s: float
    credited_s: float = 0.0
    flagged: bool = False
    lost_on: HostId | None = None  # the host it lost its run with
    awaiting_agent: bool = False  # that host is back on, unproven: only its agent's report can tell


@dataclass(slots=True)
class Liveness:
    sim: Simulator
    violations: list[str]  # shared with the safety checker: one list of everything that went wrong
    owed: dict[VmUuid, Owed] = field(default_factory=dict)
    crashes: dict[VmUuid, list[float]] = field(default_factory=dict)  # the VM's own deaths, for its crash loop
    recovered_s: dict[str, list[float]] = field(default_factory=dict)  # cause → seconds from loss to running
    dropped: dict[str, int] = field(default_factory=dict)  # why owed VMs left the promise (for the figures)
    paused_until: float = 0.0
    _last_sample: float = 0.0

    def start(self) -> None:
        self._last_sample = self.sim.now
        self.sim.schedule(self.sim.now + SAMPLE_S, self._sample)

    # ------------------------------------------------------------ what the world tells

    def lost(self, uuid: VmUuid, cause: str | None, host: SimHost | None = None) -> None:
        """The VM stopped running (on `host`); `cause` None: no restart is owed (guest shutdown, manager's order, a
        host that can never be proven dead)."""
        vm = self.sim.world.vms.get(uuid)
        if vm is None or not vm.ha or cause is None:
            self.owed.pop(uuid, None)
            return
        if cause == CRASH:
            self.crashes.setdefault(uuid, []).append(self.sim.now)
        self._owe(uuid, cause)
        self.owed[uuid].lost_on = host.id if host is not None else None

    def host_powered_on(self, host: SimHost) -> None:
        """A host that lost power is on again (a reset, a power cycle) before the core proved it dead: its BMC reads
        on, and nothing but its agent's report can now show that its VMs are gone. Their promise waits for it."""
        if self.sim.core_status(host.id) in (HostStatus.DOWN, HostStatus.FENCED):
            return
        for owed in self.owed.values():
            if owed.lost_on == host.id:
                owed.awaiting_agent = True

    def agent_back(self, host: SimHost) -> None:
        """The agent of a host that came back reports: the VMs lost with it are owed from now, as VMs found off by
        their host (its full report shows them missing)."""
        for owed in self.owed.values():
            if owed.lost_on == host.id and owed.awaiting_agent:
                owed.awaiting_agent, owed.cause, owed.since, owed.credited_s = False, HOST_BACK, self.sim.now, 0.0
                owed.bound_s = self._bound_s(HOST_BACK)

    def host_lost(self, host: SimHost, cause: str | None) -> None:
        """A host died: owed VMs the core was restarting there start their clock over (a cascade)."""
        for uuid, owed in self.owed.items():
            record = self._record(uuid)
            if record is not None and record.host_id == host.id and record.state is VmState.STARTING:
                owed.cause, owed.since, owed.credited_s = cause or "unprovable", self.sim.now, 0.0
                owed.bound_s = self._bound_s(cause) if cause else math.inf

    def started(self, uuid: VmUuid) -> None:
        owed = self.owed.pop(uuid, None)
        if owed is not None:
            self.recovered_s.setdefault(owed.cause, []).append(self.sim.now - owed.since)

    def pause(self, until: float) -> None:
        """The promise is suspended until then (manager down, its startup grace, a database outage)."""
        self.paused_until = max(self.paused_until, until)

    def host_cause(self, host: SimHost) -> str | None:
        """Which bound applies to the VMs of a host that just lost power (None: it can never be proven dead: no
        usable BMC, and no armed watchdog behind its agent or self-fencing switched off)."""
        if host.has_bmc and host.bmc_alive and host.bmc_fail_next == 0:
            return BMC_OFF
        return self.self_fence_cause(host)

    def self_fence_cause(self, host: SimHost) -> str | None:
        return SELF_FENCE if self.sim.config.isolation_self_fence and host.watchdog else None

    def _bound_s(self, cause: str) -> float:
        longest_s = max((h.watchdog_timeout_s for h in self.sim.world.hosts.values()), default=0.0)
        return bound_s(cause, self.sim.config, longest_s)

    def _owe(self, uuid: VmUuid, cause: str) -> None:
        self.owed[uuid] = Owed(cause, self.sim.now, self._bound_s(cause))

    # ------------------------------------------------------------ sampling

    def _sample(self) -> None:
        now = self.sim.now
        elapsed_s, self._last_sample = now - self._last_sample, now
        self.sim.schedule(now + SAMPLE_S, self._sample)
        if self._suspended(now):
            return
        for uuid in list(self.owed):
            self._credit(uuid, self.owed[uuid], elapsed_s)

    def _suspended(self, now: float) -> bool:
        store = self.sim.store
        if store.down or store.stalled_until > now or not self.sim.world.manager_running:
            self.pause(max(now, store.stalled_until) + DB_RETRY_MAX_S)
        return now < self.paused_until

    def _credit(self, uuid: VmUuid, owed: Owed, elapsed_s: float) -> None:
        record = self._record(uuid)
        outside = self._outside(uuid, record)
        if outside is not None:
            self.dropped[outside] = self.dropped.get(outside, 0) + 1
            del self.owed[uuid]
            return
        lost_on = owed.lost_on if owed.awaiting_agent else None
        if lost_on is not None and self.sim.core.host_status(lost_on) in (HostStatus.DOWN, HostStatus.FENCED):
            # proven dead after all (fenced while it booted): the VM is owed from this verdict
            owed.awaiting_agent, owed.cause, owed.since, owed.credited_s = False, FENCE, self.sim.now, 0.0
            owed.bound_s = self._bound_s(FENCE)
        if owed.flagged or owed.awaiting_agent or math.isinf(owed.bound_s) or not self._could_run(uuid):
            return
        owed.credited_s += elapsed_s
        if owed.credited_s > owed.bound_s:
            owed.flagged = True
            assert record is not None
            host = self.sim.core.hosts.get(record.host_id) if record.host_id is not None else None
            where = f"{host.name} ({host.status.value})" if host is not None else "nowhere"
            self.violations.append(
                f"{self.sim.now:.1f}: liveness: {self.sim.world.vms[uuid].name} ({owed.cause} at {owed.since:.1f}) "
                f"not running after {owed.credited_s:.0f} s while a host could take it (bound {owed.bound_s:.0f} s); "
                f"recorded {record.state.value} on {where}"
            )

    def _record(self, uuid: VmUuid) -> VmRecord | None:
        if not self.sim.world.manager_running:
            return None
        return self.sim.core.vm(self.sim.world.vms[uuid].id)

    def _outside(self, uuid: VmUuid, record: VmRecord | None) -> str | None:
        """Why the VM is no longer owed a restart, or None."""
        if record is None:
            return "deleted"
        if not record.ha_enabled:
            return "HA off"
        last = self.sim.checker.last_run.get(uuid)
        host = self.sim.core.hosts.get(last[0]) if last is not None else None
        skips_disabled = not self.sim.config.ha_disabled_hosts and host is not None and (
            host.resource_state is ResourceState.DISABLED
        )
        if host is not None and (host.resource_state in _OUTSIDE or skips_disabled):
            return f"host in {host.resource_state.value}"
        if record.state is VmState.ERROR and self._own_crash_loop(uuid):
            return "own crash loop"
        return None

    def _own_crash_loop(self, uuid: VmUuid) -> bool:
        config, now = self.sim.config, self.sim.now
        recent = [t for t in self.crashes.get(uuid, []) if t > now - config.restart_window_s]
        return len(recent) > config.restart_max_per_window

    def _could_run(self, uuid: VmUuid) -> bool:
        """Ground truth: is there a host, Up and Enabled in the core, connected, with room for the VM right now?"""
        vm = self.sim.world.vms[uuid]
        core, world = self.sim.core, self.sim.world
        group = {v.uuid for v in world.vms.values() if v.group == vm.group and v.uuid != uuid} if vm.group else set()
        for candidate in world.hosts.values():
            if not (candidate.agent_running and candidate.stream_open and world.link_up(candidate)):
                continue  # link_up: powered too
            record = core.hosts.get(candidate.id)
            if record is None or record.status is not HostStatus.UP:
                continue
            if record.resource_state is not ResourceState.ENABLED or not candidate.hypervisor_ok:
                continue
            if group & candidate.running:
                continue
            if _fits(candidate, vm, world.vms, self.sim.config.cpu_overcommit_ratio):
                return True
        return False


def _fits(host: SimHost, vm: SimVm, vms: Mapping[VmUuid, SimVm], cpu_ratio: float) -> bool:
    used_memory_mib = sum(vms[uuid].memory_mib for uuid in host.running)
    used_vcpus = sum(vms[uuid].vcpus for uuid in host.running)
    return host.memory_mib - used_memory_mib >= vm.memory_mib and int(host.cpus * cpu_ratio) - used_vcpus >= vm.vcpus
