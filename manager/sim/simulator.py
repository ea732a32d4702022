"""The simulator: an event heap and one seeded RNG driving the real `Core` through simulated hosts.

The loop takes whichever comes first — the next simulated event or the core's `next_deadline()` — so nothing is
polled: a quiet cluster of thousands of hosts costs only its pings. The manager side (this module) feeds facts to
the core, executes its actions against the simulated agents and BMCs (agents.py), keeps the records the core last
saved (a manager restart rebuilds the Core from them), and writes the log that scenario tests diff.
"""

from __future__ import annotations

import copy
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostCapacity,
    HostId,
    HostRecord,
    HostStatus,
    HostUuid,
    VmId,
    VmRecord,
    VmState,
    WorkId,
)
from kvmha.manager.sim.agents import Agents
from kvmha.manager.sim.invariants import Checker
from kvmha.manager.sim.world import SimHost, SimVm, World

LINK_LATENCY_S = 0.05
MANAGER_RESTART_S = 5.0


@dataclass(slots=True)
class Metrics:
    """Timings for storms and the benchmark, in simulated seconds."""

    failed_at: dict[str, float] = field(default_factory=dict)  # vm uuid → when its host failed
    detected_at: dict[HostId, float] = field(default_factory=dict)  # host → when the core started investigating
    failed_host: dict[str, HostId] = field(default_factory=dict)
    failure_to_running_s: list[float] = field(default_factory=list)
    detection_to_running_s: list[float] = field(default_factory=list)
    no_capacity_events: int = 0


class Simulator:
    def __init__(
        self,
        hosts: list[SimHost],
        vms: list[SimVm],
        *,
        seed: int = 0,
        config: CoreConfig | None = None,
        jitter_s: float = 0.0,
        keep_log: bool = True,
    ) -> None:
        self.rng = random.Random(seed)
        self.config = config or CoreConfig()
        self.jitter_s = jitter_s
        self.now = 0.0
        self.world = World(hosts, vms)
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.epoch = 0  # manager incarnation: facts addressed to an older one are lost
        self._stream_last: dict[HostId, float] = {}
        self.keep_log = keep_log
        self.log: list[str] = []
        self.metrics = Metrics()
        self.events_handled = 0
        self.hosts_saved: dict[HostId, HostRecord] = {}
        self.vms_saved: dict[VmId, VmRecord] = {}
        self.works_saved: dict[WorkId, HaWorkRecord] = {}
        self._seed_records()
        self.core = self._new_core()
        self.checker = Checker(self.core_status)
        for host in self.world.hosts.values():
            for uuid in host.running:
                self.checker.running_on.setdefault(uuid, set()).add(host.id)
        self.agents = Agents(self)
        self.agents.boot_all()

    # ------------------------------------------------------------ setup

    def _seed_records(self) -> None:
        """What the database holds when the manager first starts: registered hosts and VMs."""
        for host in self.world.hosts.values():
            self.hosts_saved[host.id] = HostRecord(
                host.id,
                HostUuid(f"uuid-{host.name}"),
                host.name,
                f"10.0.0.{host.id}",
                capacity=HostCapacity(host.cpus, host.memory_mib),
                has_bmc=host.has_bmc,
            )
        for vm in self.world.vms.values():
            placed = self.world.hosts_by_name[vm.host] if vm.host else None
            self.vms_saved[vm.id] = VmRecord(
                vm.id,
                vm.uuid,
                vm.name,
                VmState.RUNNING if placed else VmState.STOPPED,
                host_id=placed.id if placed else None,
                ha_enabled=vm.ha,
                restart_priority=vm.priority,
                anti_affinity_group=vm.group,
                memory_mib=vm.memory_mib,
                vcpus=vm.vcpus,
                domain_xml=f"<domain>{vm.name}</domain>",
            )
            if placed:
                placed.running.add(vm.uuid)

    def _new_core(self) -> Core:
        return Core(
            self.config,
            now=self.now,
            request_prefix=f"m{self.epoch}-",
            hosts=[copy.copy(h) for h in self.hosts_saved.values()],
            vms=[copy.copy(v) for v in self.vms_saved.values()],
            works=[copy.copy(w) for w in self.works_saved.values()],
        )

    def core_status(self, host_id: HostId) -> HostStatus | None:
        """The manager's view of a host; while it is down, what it last saved (what decided commands in flight)."""
        if self.world.manager_running:
            return self.core.host_status(host_id)
        saved = self.hosts_saved.get(host_id)
        return saved.status if saved else None

    # ------------------------------------------------------------ events

    def schedule(self, at: float, handler: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, handler, args))

    def latency(self) -> float:
        return LINK_LATENCY_S + (self.rng.random() * self.jitter_s if self.jitter_s else 0.0)

    def run_until(self, end: float) -> None:
        while True:
            deadline = self.core.next_deadline() if self.world.manager_running else None
            event_at = self._heap[0][0] if self._heap else None
            if deadline is not None and deadline <= end and (event_at is None or deadline <= event_at):
                self.now = max(self.now, deadline)
                self.execute(self.core.tick(self.now))
            elif event_at is not None and event_at <= end:
                at, _, handler, args = heapq.heappop(self._heap)
                self.now = max(self.now, at)
                self.events_handled += 1
                handler(*args)
            else:
                self.now = end
                return

    # ------------------------------------------------------------ manager side

    def to_core(self, fact: f.Fact, delay_s: float | None = None, stream: HostId | None = None) -> None:
        """Deliver a fact to the manager after the link latency; lost if the manager restarts meanwhile. Facts on
        one agent's stream arrive in the order they were sent, as on a real gRPC stream."""
        at = self.now + (self.latency() if delay_s is None else delay_s)
        if stream is not None:
            host = self.world.hosts[stream]
            if host.drop_rate and self.rng.random() < host.drop_rate:
                return  # lost on a lossy link
            at += host.extra_delay_s
            at = max(at, self._stream_last.get(stream, 0.0) + 1e-6)
            self._stream_last[stream] = at
        self.schedule(at, self._deliver, self.epoch, fact)

    def _deliver(self, epoch: int, fact: f.Fact) -> None:
        if epoch == self.epoch and self.world.manager_running:
            self.execute(self.core.handle(fact, self.now))

    def execute(self, actions: list[a.Action]) -> None:
        for action in actions:
            if isinstance(action, a.SaveHost):
                self.hosts_saved[action.host.id] = action.host
            elif isinstance(action, a.SaveVm):
                self.vms_saved[action.vm.id] = action.vm
            elif isinstance(action, a.SaveWork):
                self.works_saved[action.work.id] = action.work
            elif isinstance(action, a.DeleteVmRecord):
                self.vms_saved.pop(action.vm_id, None)
            elif isinstance(action, a.RecordEvent):
                self._record(action)
            else:
                self.agents.carry_out(action, self.epoch)

    def _record(self, event: a.RecordEvent) -> None:
        kind, _, ident = event.subject.partition(":")
        if kind == "host" and event.message.startswith(("Up -> Investigating", "Connecting -> Investigating")):
            self.metrics.detected_at.setdefault(HostId(int(ident)), self.now)
        if event.kind == "vm.no.capacity":
            self.metrics.no_capacity_events += 1
        if self.keep_log:
            self.log.append(f"{event.severity:<7} {event.at:7.1f} {self._subject_name(kind, ident)}: {event.message}")

    def _subject_name(self, kind: str, ident: str) -> str:
        if kind == "host":
            host = self.world.hosts.get(HostId(int(ident)))
            return f"host {host.name if host else ident}"
        if kind == "vm":
            record = self.vms_saved.get(VmId(int(ident)))
            return f"vm {record.name if record else ident}"
        return f"{kind} {ident}".strip()

    def note(self, text: str) -> None:
        if self.keep_log:
            self.log.append(f"{'cmd':<7} {self.now:7.1f} {text}")

    def restart_manager(self) -> None:
        """The manager process dies; a new one starts MANAGER_RESTART_S later from the saved records."""
        self.world.manager_running = False
        self.epoch += 1
        self.agents.manager_lost()
        self.schedule(self.now + MANAGER_RESTART_S, self._manager_started)

    def _manager_started(self) -> None:
        self.world.manager_running = True
        self.core = self._new_core()
        self.note(f"manager started again from {len(self.works_saved)} saved work items")
        self.agents.manager_back()

    # ------------------------------------------------------------ measurements

    def vm_started(self, uuid: str, host_id: HostId) -> None:
        failed_at = self.metrics.failed_at.pop(uuid, None)
        if failed_at is None:
            return
        self.metrics.failure_to_running_s.append(self.now - failed_at)
        detected = self.metrics.detected_at.get(self.metrics.failed_host.pop(uuid, HostId(0)))
        if detected is not None and detected >= failed_at:
            self.metrics.detection_to_running_s.append(self.now - detected)

    def host_failed(self, host: SimHost) -> None:
        """Remember when the HA VMs of a host that just died lost their host (for the timing figures)."""
        self.metrics.detected_at.pop(host.id, None)
        for uuid in host.running:
            vm = self.world.vms.get(uuid)
            if vm is not None and vm.ha:
                self.metrics.failed_at[uuid] = self.now
                self.metrics.failed_host[uuid] = host.id
