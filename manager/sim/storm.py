"""Seeded fault storms over big simulated clusters, for the invariant tests and the benchmark.

A storm injects faults at random times (a Poisson process from the simulator's one RNG): power losses (some for
good, some back later), network cuts, manager-link cuts, storage loss, full isolation, BMCs dying with their host,
fence failures, VM crashes, guest shutdowns, hypervisor restarts, agent crashes, lossy and slow links, and manager
restarts; and issue 11's compound faults, where the agent itself fails while its host is cut off: the agent dies
(or freezes, or libvirtd hangs) while the host loses its network and storage with its BMC dead, the watchdog daemon
is killed, and a watchdog that reports armed but never fires while the agent dies cut off (only a held disk lease
stands between that host and a second copy). One host in ten runs without a watchdog (`watchdog_share`): its silence
never proves it dead, its VMs wait for a fence or the operator. At most `max_concurrent_share` of the hosts are
faulted at once: the mass-silence guard is not under test.
The manager's own dependencies fail too: the database goes down (the driver decides nothing until it commits again,
then gives every host a fresh silence window) and stalls (every transaction waits), and the driver itself is held
(a backlog of stamped facts builds up: it must never read as silence), while the faults go on.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.model import HostId, VmId, VmUuid
from kvmha.manager.sim.migration_faults import MIGRATION_SEQUENCES, start_migration_sequence
from kvmha.manager.sim.script import apply
from kvmha.manager.sim.sequences import SEQUENCES, start_sequence
from kvmha.manager.sim.simulator import Simulator
from kvmha.manager.sim.world import SimHost, SimVm

# fault name → (weight, seconds until recovery or None for "stays")
FAULTS: dict[str, tuple[int, tuple[float, float] | None]] = {
    "power-loss": (6, None),
    "power-cycle": (4, (30.0, 200.0)),
    "network": (3, (20.0, 150.0)),
    "link": (2, (20.0, 120.0)),
    "storage": (3, (20.0, 150.0)),
    "isolation": (2, None),
    "bmc-dead-power-loss": (2, None),
    "fence-fails": (2, None),
    "kill-vm": (6, None),
    "guest-shutdown": (2, None),
    "hypervisor": (2, (10.0, 60.0)),
    "agent-crash": (2, (10.0, 60.0)),
    "lossy-link": (2, (30.0, 120.0)),
    # A host that vanishes without closing its connections (cable cut, then its power): the keepalive and an early
    # BMC query decide; and the same host coming back later (power and cable).
    "vanish": (2, None),
    "vanish-return": (2, (20.0, 120.0)),
    # Issue 11: the agent fails while its host is cut off and its BMC is dead; the cable and the BMC are repaired
    # (and the agent started) a few minutes later.
    "agent-dies-cut-off": (2, (150.0, 250.0)),
    "agent-frozen-cut-off": (1, (150.0, 250.0)),
    "libvirtd-hung-isolated": (1, (150.0, 250.0)),
    "watchdog-killed": (1, (40.0, 80.0)),
    "watchdog-broken-agent-dies": (1, (150.0, 250.0)),
}
# Issue 16: a host's storage "a" turns unhealthy (its inventory says so at once). Not in FAULTS' default weights, so
# the storms above keep their draws; a storm that wants it passes `weights` with it.
STORAGE_FAULTS: dict[str, tuple[int, tuple[float, float] | None]] = {"mount": (3, (20.0, 150.0))}
# Issue 11's compound faults, and the plain failures they must not be confused with.
ISSUE_11_FAULTS = (
    "agent-dies-cut-off",
    "agent-frozen-cut-off",
    "libvirtd-hung-isolated",
    "watchdog-killed",
    "watchdog-broken-agent-dies",
    "isolation",
    "bmc-dead-power-loss",
    "agent-crash",
)


_CUT_OFF = ("network {h} off", "storage {h} off")
_REPAIRED = ["network {h} on", "storage {h} on", "bmc {h} alive", "agent {h} start"]
DATABASE_OUTAGE_S = (5.0, 30.0)
SEQUENCE_RETRY_S = 30.0
DATABASE_STALL_S = (2.0, 10.0)
DRIVER_STALL_S = (3.0, 15.0)


def build_cluster(
    host_count: int,
    vms_per_host: int,
    rng: random.Random,
    *,
    bmc_share: float = 0.8,
    ha_share: float = 0.9,
    big_vms: int = 0,
    watchdog_share: float = 0.9,
) -> tuple[list[SimHost], list[SimVm]]:
    """Hosts with room for about 2.5x their initial load, so one failure at a time always fits elsewhere. The last
    `big_vms` hosts each hold one big HA VM (90% of a host's memory) instead: it fits only on an empty host."""
    hosts = [
        SimHost(HostId(n), f"h{n}", cpus=32, memory_mib=vms_per_host * 2048 * 5 // 2, has_bmc=rng.random() < bmc_share)
        for n in range(1, host_count + 1)
    ]
    # Drawn from its own generator: the rest of the cluster (and the storms that reuse `rng`) stay as they were.
    watchdogs = random.Random(repr(rng.getstate()[1][:8]))  # a str seed: the same in every process
    for host in hosts:
        host.watchdog = watchdogs.random() < watchdog_share
    vms: list[SimVm] = []
    for index, host in enumerate(hosts):
        if index >= host_count - big_vms:
            n = len(vms) + 1
            vms.append(SimVm(VmId(n), f"vm{n}", VmUuid(f"uuid-vm{n}"), memory_mib=host.memory_mib * 9 // 10, vcpus=4,
                             ha=True, host=host.name))  # fmt: skip
            continue
        for _ in range(vms_per_host):
            n = len(vms) + 1
            vms.append(
                SimVm(
                    VmId(n),
                    f"vm{n}",
                    VmUuid(f"uuid-vm{n}"),
                    memory_mib=rng.choice((1024, 2048, 3072)),
                    vcpus=rng.choice((1, 2, 4)),
                    ha=rng.random() < ha_share,
                    priority=rng.randrange(3),
                    host=host.name,
                )
            )
    return hosts, vms


@dataclass(slots=True)
class Storm:
    sim: Simulator
    rng: random.Random
    rate_per_s: float  # mean faults per simulated second
    until_s: float  # no new faults after this
    max_concurrent_share: float = 0.05
    manager_restarts: int = 1
    database_outages: int = 1  # the database refuses every transaction for DATABASE_OUTAGE_S
    database_stalls: int = 1  # every transaction waits for DATABASE_STALL_S
    compound: int = 0  # how many of each compound sequence (sim/sequences.py) to start
    migrations: int = 0  # how many of each migration-under-fault sequence (sim/migration_faults.py) to start
    big_hosts: list[str] = field(default_factory=list)  # hosts holding one big VM (build_cluster's big_vms)
    driver_stalls: int = 1  # the driver is held DRIVER_STALL_S (a backlog builds; it must never read as silence)
    weights: dict[str, int] = field(default_factory=lambda: {name: weight for name, (weight, _) in FAULTS.items()})
    busy: set[str] = field(default_factory=set)  # hosts with a fault in progress
    dead: set[str] = field(default_factory=set)  # hosts down for good
    injected: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        self._next(self.sim.now)
        for _ in range(self.manager_restarts):
            self.sim.schedule(self.rng.uniform(60.0, self.until_s), self._do, "restart manager", None, "restart")
        for _ in range(self.database_outages):
            down_at = self.rng.uniform(60.0, self.until_s)
            self.sim.schedule(down_at, self._do, "database down", None, "database")
            self.sim.schedule(down_at + self.rng.uniform(*DATABASE_OUTAGE_S), self._do, "database up", None, "db")
        for _ in range(self.database_stalls):
            stall = f"database stall {self.rng.uniform(*DATABASE_STALL_S):.1f}"
            self.sim.schedule(self.rng.uniform(60.0, self.until_s), self._do, stall, None, "database")
        for kind in SEQUENCES:
            for _ in range(self.compound):
                self.sim.schedule(self.rng.uniform(30.0, self.until_s), self._sequence, kind)
        # Drawn from an RNG of their own (seeded from the storm's state, without drawing from it): adding them left
        # every other fault of a seed where it was.
        stalls = random.Random(repr(self.rng.getstate()[1][:8]))
        for _ in range(self.driver_stalls):
            stall = f"driver stall {stalls.uniform(*DRIVER_STALL_S):.1f}"
            self.sim.schedule(stalls.uniform(60.0, self.until_s), self._do, stall, None, "driver")
        for kind in MIGRATION_SEQUENCES:
            for _ in range(self.migrations):
                self.sim.schedule(self.rng.uniform(30.0, self.until_s), start_migration_sequence, self, kind)

    # ------------------------------------------------------------ for the compound sequences

    def _sequence(self, kind: str) -> None:
        """Start a compound sequence; one that found no free host (too many hosts faulted right now) tries again
        SEQUENCE_RETRY_S later while faults are still being injected, rather than silently never happening."""
        taken = len(self.busy) + len(self.dead)
        start_sequence(self, kind)
        if len(self.busy) + len(self.dead) == taken and self.sim.now + SEQUENCE_RETRY_S < self.until_s:
            self.sim.schedule(self.sim.now + SEQUENCE_RETRY_S, self._sequence, kind)

    def room_for(self, count: int) -> bool:
        return len(self.busy) + len(self.dead) + count <= self.max_concurrent_share * len(self.sim.world.hosts)

    def reserved(self, host: str) -> bool:
        return host in self.big_hosts

    def run_command(self, command: str) -> None:
        apply(self.sim, command)

    def release(self, host: str) -> None:
        self.busy.discard(host)

    def _next(self, now: float) -> None:
        at = now + self.rng.expovariate(self.rate_per_s)
        if at < self.until_s:
            self.sim.schedule(at, self._fire)

    def _fire(self) -> None:
        self._next(self.sim.now)
        hosts = [
            name
            for name in self.sim.world.hosts_by_name
            if name not in self.busy and name not in self.dead and not self.reserved(name)
        ]
        limit = self.max_concurrent_share * len(self.sim.world.hosts)
        if not hosts or len(self.busy) + len(self.dead) >= limit:
            return
        names = list(self.weights)
        kind = self.rng.choices(names, weights=[self.weights[n] for n in names])[0]
        host = self.rng.choice(sorted(hosts))
        self._inject(kind, host)

    def _inject(self, kind: str, host: str) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        recovery = (FAULTS | STORAGE_FAULTS)[kind][1]
        later = self.sim.now + self.rng.uniform(*recovery) if recovery else None
        if kind in ("kill-vm", "guest-shutdown"):
            running = sorted(self.sim.world.hosts_by_name[host].running)
            if running:
                vm = self.sim.world.vms[self.rng.choice(running)].name
                apply(self.sim, f"{kind} {vm}")
            return
        commands = {
            "power-loss": (["power {h} off"], []),
            "power-cycle": (["power {h} off"], ["power {h} on"]),
            "network": (["network {h} off"], ["network {h} on"]),
            "link": (["link {h} off"], ["link {h} on"]),
            "storage": (["storage {h} off"], ["storage {h} on"]),
            "mount": (["mount {h} a off"], ["mount {h} a on"]),
            "isolation": (["network {h} off", "storage {h} off"], []),
            "bmc-dead-power-loss": (["bmc {h} dead", "power {h} off"], []),
            "fence-fails": (["bmc {h} fail 2", "network {h} off", "storage {h} off"], []),
            "hypervisor": (["hypervisor {h} off"], ["hypervisor {h} on"]),
            "agent-crash": (["agent {h} crash"], ["agent {h} start"]),
            "lossy-link": (["drop {h} 0.3", "delay {h} 0.5"], ["drop {h} 0", "delay {h} 0"]),
            "vanish": (["network {h} off", "power {h} off"], []),
            "vanish-return": (["network {h} off", "power {h} off"], ["power {h} on", "network {h} on"]),
            "agent-dies-cut-off": (["bmc {h} dead", "agent {h} crash", *_CUT_OFF], _REPAIRED),
            "agent-frozen-cut-off": (["bmc {h} dead", "agent {h} freeze", *_CUT_OFF], _REPAIRED),
            "libvirtd-hung-isolated": (
                ["bmc {h} dead", "hypervisor {h} off", *_CUT_OFF],
                [*_REPAIRED, "hypervisor {h} on"],
            ),
            "watchdog-killed": (["watchdog {h} kill"], []),
            "watchdog-broken-agent-dies": (
                ["watchdog {h} broken", "bmc {h} dead", "agent {h} crash", *_CUT_OFF],
                [*_REPAIRED, "watchdog {h} on"],
            ),
        }[kind]
        for command in commands[0]:
            apply(self.sim, command.format(h=host))
        if later is None:
            self.dead.add(host)
        else:
            self.busy.add(host)
            for command in commands[1]:
                self.sim.schedule(later, self._do, command.format(h=host), host, kind)

    def _do(self, command: str, host: str | None, kind: str) -> None:
        apply(self.sim, command)
        if host is not None:
            self.busy.discard(host)


def storm_simulator(
    host_count: int,
    vms_per_host: int,
    seed: int,
    *,
    config: CoreConfig | None = None,
    keep_log: bool = False,
    big_vms: int = 0,
) -> tuple[Simulator, random.Random]:
    rng = random.Random(seed)
    hosts, vms = build_cluster(host_count, vms_per_host, rng, big_vms=big_vms)
    sim = Simulator(hosts, vms, seed=seed, config=config, jitter_s=0.05, keep_log=keep_log)
    return sim, rng


def dense_storm(seed: int) -> tuple[Simulator, Storm]:
    """A small cluster (12 hosts x 4 VMs) where faults hit the same hosts again and again: up to a third of the
    hosts faulted at once, the compound sequences three times each, for 25 minutes (then 400 s quiet). Here the
    flap window and a VM's restart window fill up — what a 1,000-host storm rarely does."""
    sim, rng = storm_simulator(12, 4, seed)
    storm = Storm(sim, rng, rate_per_s=0.1, until_s=DENSE_FAULTS_S, compound=3, max_concurrent_share=0.34,
                  manager_restarts=0, database_outages=0, database_stalls=0)  # fmt: skip
    storm.start()
    return sim, storm


DENSE_FAULTS_S = 1500.0
DENSE_END_S = 1900.0
def waits_for_the_operator(sim: Simulator, host_id: HostId) -> bool:
    """A silent host without a usable BMC and without an armed watchdog: nothing but the operator can prove it dead."""
    from kvmha.manager.core.hoststate import SILENT

    host = sim.world.hosts.get(host_id)
    if host is None:
        return False
    usable_bmc = host.has_bmc and host.bmc_alive and host.bmc_fail_next == 0
    return sim.core.host_status(host_id) in SILENT and not usable_bmc and not host.watchdog


def never_restarted(sim: Simulator) -> list[str]:
    """HA VMs of failed hosts that never ran again, but those whose host waits for the operator (issue 11)."""
    return sorted(
        uuid
        for uuid in sim.metrics.failed_at
        if not waits_for_the_operator(sim, sim.metrics.failed_host.get(uuid, HostId(0)))
    )


def unexplained_down_vms(sim: Simulator) -> list[str]:
    """HA VMs running nowhere without a reason the operator can read (Stopped by the guest, Error, no capacity)."""
    from kvmha.manager.core.model import VmState

    problems: list[str] = []
    for uuid, vm in sim.world.vms.items():
        if not vm.ha or sim.world.where(VmUuid(uuid)):
            continue
        record = sim.core.vm(vm.id)
        if record is None or record.state in (VmState.STOPPED, VmState.ERROR):
            continue  # guest shutdown (Stopped) or given up (Error): both with an event
        if sim.metrics.no_capacity_events:
            continue
        if record.host_id is not None and waits_for_the_operator(sim, record.host_id):
            continue  # its host can be neither fenced nor proven dead by silence: host.needs.operator told why
        host = sim.core.hosts.get(record.host_id) if record.host_id is not None else None
        where = f"{host.name} ({host.status.value})" if host else "nowhere"
        problems.append(f"{vm.name} recorded {record.state.value} on {where}, running nowhere")
    return problems
