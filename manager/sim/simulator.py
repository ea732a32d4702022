"""The simulator: the production driver (kvmha.manager.driver) and its core, in a simulated environment, in front of
simulated hosts — pve-ha-manager's "same CRM code, different Env", at thousands of hosts.

The manager side is the real thing: the driver batches facts, records every change in the (in-memory) store before
any command leaves, retries when the store fails, runs operator operations (kvmha.manager.operations) in order
with the facts, and registers agents through the hub. Only the environment is simulated (sim/env.py): a loop on
virtual time (sim/loop.py), the in-memory store (sim/memstore.py), and a transport into the world of simulated
hosts, agents and BMCs (sim/world.py, sim/agents.py). One seeded RNG decides every random thing, and nothing runs
on a thread, so a run is reproducible.

The log that scenario tests diff holds what the store recorded (every event the core wrote, at commit), one line
per driver transaction ("db ... commit ..."), the script's commands and the world's notes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvmha.manager.core import facts as f
from kvmha.manager.core.config import CONFIG_SPECS, CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import HostCapacity, HostId, HostStatus, VmId, VmRecord, VmState
from kvmha.manager.driver import Driver, DriverSettings, ManagerStopped
from kvmha.manager.env import Env
from kvmha.manager.hub import AgentHello, AgentHub
from kvmha.manager.operations import Operation, OperationError
from kvmha.manager.sim.agents import Agents
from kvmha.manager.sim.env import DriverHold, SimClock, SimJournal, SimPersistence, SimTransport
from kvmha.manager.sim.invariants import Checker
from kvmha.manager.sim.liveness import Liveness
from kvmha.manager.sim.loop import VirtualLoop
from kvmha.manager.sim.memstore import MemoryStore
from kvmha.manager.sim.world import SimHost, SimVm, World
from kvmha.manager.store import BmcCredentials, EventRow

T = TypeVar("T")
LINK_LATENCY_S = 0.05
MANAGER_RESTART_S = 5.0
MANAGER_ID = "m1"


@dataclass(slots=True)
class Metrics:
    """Timings for storms and the benchmark, in simulated seconds."""

    failed_at: dict[str, float] = field(default_factory=dict)  # vm uuid → when its host failed
    detected_at: dict[HostId, float] = field(default_factory=dict)  # host → when the core started investigating
    failed_host: dict[str, HostId] = field(default_factory=dict)
    failure_to_running_s: list[float] = field(default_factory=list)
    detection_to_running_s: list[float] = field(default_factory=list)
    no_capacity_events: int = 0
    storage_refusals: int = 0  # starts the simulated hypervisor refused: the host could not reach the VM's disks


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
        self.loop = VirtualLoop()
        self.loop.set_exception_handler(_quiet_when_paused)
        self.clock = SimClock(self.loop)
        self.world = World(hosts, vms)
        self.store = MemoryStore(wall=self.loop.time)
        self.store.event_listeners.append(self._record_events)
        self.journal = SimJournal(self.log_line, self.clock)
        self.epoch = 0  # manager incarnation: facts addressed to an older one are lost
        self._stream_last: dict[HostId, float] = {}
        self._failure: BaseException | None = None
        self.keep_log = keep_log
        self.log: list[str] = []
        self.metrics = Metrics()
        self._seed_store()
        self.checker = Checker(self.core_status)
        for host in self.world.hosts.values():
            for uuid in host.running:
                self.checker.running_on.setdefault(uuid, set()).add(host.id)
        self.liveness = Liveness(self, self.checker.violations)  # one list: safety and liveness violations
        self.agents = Agents(self)
        self.loop.run_until_complete(self._start_manager())
        self.agents.boot_all()
        self.liveness.start()

    # ------------------------------------------------------------ setup

    def _seed_store(self) -> None:
        """What the database holds when the manager first starts: registered hosts and VMs, the configuration."""
        with self.store.unit_of_work() as uow:
            for host in sorted(self.world.hosts.values(), key=lambda h: h.id):
                host_id = uow.hosts.add(f"uuid-{host.name}", host.name, f"10.0.0.{host.id}", 0.0)
                assert host_id == host.id, "simulated hosts are numbered 1..n"
                record = uow.hosts.get(host_id)
                assert record is not None
                record.capacity = HostCapacity(host.cpus, host.memory_mib)
                uow.hosts.save(record, 0.0)
                if host.has_bmc:
                    uow.hosts.set_bmc(host.id, BmcCredentials(f"bmc-{host.name}", 623, "admin", "sim"), 0.0)
            for vm in self.world.vms.values():
                placed = self.world.hosts_by_name[vm.host] if vm.host else None
                uow.vms.add(VmRecord(vm.id, vm.uuid, vm.name, VmState.RUNNING if placed else VmState.STOPPED,
                                     host_id=placed.id if placed else None, ha_enabled=vm.ha,
                                     restart_priority=vm.priority, anti_affinity_group=vm.group,
                                     memory_mib=vm.memory_mib, vcpus=vm.vcpus,
                                     domain_xml=vm.domain_xml()), 0.0)
                if placed:
                    placed.running.add(vm.uuid)
            uow.config.sync_defaults(((s.name, s.default, s.description) for s in CONFIG_SPECS), 0.0)
            defaults = CoreConfig()
            for spec in CONFIG_SPECS:
                value = getattr(self.config, spec.field)
                if value != getattr(defaults, spec.field):
                    uow.config.set(spec.name, _config_text(value), 0.0)
            uow.commit()

    async def _start_manager(self) -> None:
        """A manager process starts: a new driver loads the store (waiting while it is down), then listens."""
        env = Env(self.clock, SimPersistence(self.store, self.clock), SimTransport(self, self.epoch), self.journal)
        driver = Driver(env, DriverSettings(MANAGER_ID, "10.0.0.254:50051", "sim", hearing_period_s=0.0))
        self.driver, self.hub = driver, AgentHub(driver)
        await driver.start()
        driver.task.add_done_callback(self._driver_ended)
        self.world.manager_running = True

    def _driver_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = task.exception()
            self.loop.stop()

    @property
    def core(self) -> Core:
        return self.driver.core

    @property
    def now(self) -> float:
        return self.loop.time()

    @property
    def events_handled(self) -> int:
        return self.loop.agenda_events

    def core_status(self, host_id: HostId) -> HostStatus | None:
        """The manager's view of a host; while it is down, what it last recorded (what decided commands in flight)."""
        if self.world.manager_running:
            return self.core.host_status(host_id)
        stored = self.store.tables.hosts.get(host_id)  # read by the observer, not through a (maybe failing) store
        return stored.record.status if stored else None

    # ------------------------------------------------------------ time

    def schedule(self, at: float, handler: Callable[..., None], *args: Any) -> None:
        self.loop.at(at, handler, *args)

    def latency(self) -> float:
        """The link's latency; the jitter comes in whole milliseconds, so messages sent together that land in the
        same millisecond reach the driver together and are handled as one batch, as a busy manager would."""
        return LINK_LATENCY_S + (round(self.rng.random() * self.jitter_s, 3) if self.jitter_s else 0.0)

    def run_until(self, end: float) -> None:
        """Run the world and the manager up to simulated time `end`; a failure of the driver is raised here."""
        try:
            self.loop.run_until_complete(asyncio.sleep(max(0.0, end - self.now)))
        except RuntimeError:
            if self._failure is None:
                raise
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        self.loop.run_until_complete(self.driver.stop())
        # As asyncio.run does: what is left (a stopped manager's tasks, agents' sends) is cancelled and awaited, so
        # that no task is destroyed pending when the loop goes.
        left = asyncio.all_tasks(self.loop)
        for task in left:
            task.cancel()
        if left:
            self.loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        self.loop.close()

    # ------------------------------------------------------------ the network to the manager

    def to_core(self, item: f.Fact | AgentHello, delay_s: float | None = None, stream: HostId | None = None) -> None:
        """Deliver a fact (or an agent's Hello) to the manager after the link latency; lost if the manager restarts
        meanwhile. Messages on one agent's stream arrive in the order they were sent, as on a real gRPC stream."""
        at = self.now + (self.latency() if delay_s is None else delay_s)
        if stream is not None:
            host = self.world.hosts[stream]
            if host.drop_rate and self.rng.random() < host.drop_rate:
                return  # lost on a lossy link
            at += host.extra_delay_s
            at = max(at, self._stream_last.get(stream, 0.0) + 1e-6)
            self._stream_last[stream] = at
        self.schedule(at, self._deliver, self.epoch, item)

    def _deliver(self, epoch: int, item: f.Fact | AgentHello) -> None:
        if epoch != self.epoch or not self.world.manager_running:
            return
        if isinstance(item, AgentHello):
            self.loop.create_task(self._register(epoch, item))
        else:
            self.driver.submit(item)

    async def _register(self, epoch: int, hello: AgentHello) -> None:
        host = self.world.hosts_by_name[hello.hostname]
        try:
            await self.hub.register_agent(hello, hello.management_address)
        except Exception as error:  # the stream fails: the agent tries again later
            self.note(f"sim: {host.name} could not register ({error})")
            if epoch == self.epoch:
                self.agents.drop_stream(host)

    def stall_driver(self, seconds: float) -> None:
        """Hold the driver `seconds` (sim.env.DriverHold); just before it resumes, note what waited for it."""
        self.operate(DriverHold(seconds))
        self.schedule(self.now + seconds - 0.001, self._note_backlog)

    def _note_backlog(self) -> None:
        driver = self.driver
        self.note(f"driver: {driver.backlog} facts waiting, {driver.coalesced} pings coalesced so far")

    def operate(self, operation: Operation[T], then: Callable[[T], Sequence[f.Fact]] | None = None) -> None:
        """An operator's command, as the admin API runs it (lost while the manager is down)."""
        if self.world.manager_running:
            self._spawn(self._operate(operation, then))

    async def _operate(self, operation: Operation[T], then: Callable[[T], Sequence[f.Fact]] | None) -> None:
        try:
            await self.driver.run(operation, then)
        except OperationError as refused:
            self.note(f"operator: refused: {refused}")
        except ManagerStopped:
            self.note("operator: the manager stopped before it answered")
        except Exception as error:  # the store is down: the admin API would answer with an error too
            self.note(f"operator: failed: {error}")

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self.loop.create_task(coroutine)

    # ------------------------------------------------------------ the log

    def _record_events(self, rows: list[EventRow]) -> None:
        for event in rows:
            kind, _, ident = event.subject.partition(":")
            if kind == "host" and event.message.startswith(("Up -> Investigating", "Connecting -> Investigating")):
                self.metrics.detected_at.setdefault(HostId(int(ident)), self.now)
            if event.kind == "vm.no.capacity":
                self.metrics.no_capacity_events += 1
            if self.keep_log:
                self.log_line(event.severity, event.at, f"{self._subject_name(kind, ident)}: {event.message}")

    def _subject_name(self, kind: str, ident: str) -> str:
        if kind == "host":
            host = self.world.hosts.get(HostId(int(ident)))
            return f"host {host.name if host else ident}"
        if kind == "vm":
            vm = self.store.tables.vms.get(VmId(int(ident)))
            return f"vm {vm.name if vm else ident}"
        return f"{kind} {ident}".strip()

    def log_line(self, kind: str, at: float, text: str) -> None:
        if self.keep_log:
            self.log.append(f"{kind:<7} {at:7.1f} {text}")

    def note(self, text: str) -> None:
        self.log_line("cmd", self.now, text)

    # ------------------------------------------------------------ the manager process

    def restart_manager(self) -> None:
        """The manager process dies; a new one starts MANAGER_RESTART_S later from the store."""
        self.world.manager_running = False
        self.epoch += 1
        self._spawn(self.driver.stop())
        self.agents.manager_lost()
        self.schedule(self.now + MANAGER_RESTART_S, self._manager_started)

    def _manager_started(self) -> None:
        self.note(f"manager started again from {len(self.store.tables.works)} saved work items")
        # Agents reconnect and nothing is fenced during the startup grace: the liveness promise counts from its end.
        self.liveness.pause(self.now + max(self.config.startup_grace_s, self.config.ping_timeout_s))
        self._spawn(self._start_manager())

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


def _config_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _quiet_when_paused(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A simulation that is not run further leaves its manager's tasks pending by design: no warning for those."""
    if str(context.get("message", "")).startswith("Task was destroyed but it is pending"):
        return
    loop.default_exception_handler(context)
