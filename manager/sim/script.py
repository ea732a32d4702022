"""Scenario files: the initial setup and the timed fault script, and the commands they may use.

setup.txt (one item per line, `#` comments):
    hosts h1-h4 cpus=16 mem=65536 bmc=yes watchdog=yes leases=yes     (or: host h1 ...)
    leases nfs 90       (disk leases with NFSv4 semantics, expiring 90 s after the last renewal; default: posix)
    vm vm1 host=h1 mem=2048 cpus=2 ha=yes priority=0 group=web
    config ping.timeout 7
    seed 3

script.txt (`<simulated seconds> <command>`; the last line is `<t> end`):
    power h3 off|on            network h2 off|on (manager and neighbours)   link h2 off|on (manager only)
    storage h1 off|on          hypervisor h1 off|on              agent h1 stop|crash|freeze|start
    bmc h2 dead|alive|fail N   kill-vm vm7   guest-shutdown vm2   repeat-report h1
    watchdog h1 off|on|kill|broken (not armed / armed / the daemon dies / reports armed, never resets)
    confirm-down h1 (the operator's command)
    drop h2 0.3 (lose 30% of h2's manager-link messages)   delay h2 1.5 (extra seconds)   partition h1 h2 [off]
    maintenance h4 on|off      restart manager   network manager off|on
    disable h2 / enable h2     remove h2 (refused while it runs VMs)
    ha vm3 on|off              start vm3         stop vm3
    migrate vm3 [h2]           (kvmha vm migrate; placement picks when no host is given)   migrate vm3 --cancel
    virsh-migrate vm3 h2       (a live migration an admin runs with virsh, outside kvmha)
    database down|up           database stall 8 (every transaction waits until 8 s from now)
    driver stall 10            (the driver is held 10 s, as by a long batch or a starved CPU: facts keep arriving,
                                stamped, and wait in its inbox; the store stays healthy)

Operator commands (maintenance, ha, start, stop) run as the admin API runs them: an operation over the store in the
driver's order (kvmha.manager.operations), then the operator fact; a refusal is logged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from kvmha.manager import operations as ops
from kvmha.manager.core import facts as f
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.model import HostId, StopCause, VmId, VmUuid
from kvmha.manager.sim import watchdog
from kvmha.manager.sim.simulator import Simulator
from kvmha.manager.sim.world import SimHost, SimVm


class ScriptError(ValueError):
    pass


@dataclass(slots=True)
class Scenario:
    hosts: list[SimHost] = field(default_factory=list)
    vms: list[SimVm] = field(default_factory=list)
    config: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    lease_mode: str = "posix"  # or "nfs" (setup line `leases nfs 90`)
    lease_expiry_s: float = 90.0
    commands: list[tuple[float, str]] = field(default_factory=list)
    end_s: float = 0.0


def _options(words: list[str]) -> dict[str, str]:
    return dict(word.split("=", 1) for word in words)


def _yes(value: str) -> bool:
    return value.lower() in ("yes", "true", "on", "1")


def _host(name: str, opts: dict[str, str]) -> SimHost:
    number = int(name.lstrip("h"))
    return SimHost(
        HostId(number),
        name,
        cpus=int(opts.get("cpus", 16)),
        memory_mib=int(opts.get("mem", 65536)),
        has_bmc=_yes(opts.get("bmc", "yes")),
        watchdog=_yes(opts.get("watchdog", "yes")),
        leases=_yes(opts.get("leases", "yes")),
        storage=_storage(opts["storage"]) if "storage" in opts else None,
        networks=_networks(opts.get("nets", "")),
        free_memory_mib=int(opts["free"]) if "free" in opts else None,
        memory_reserve_mib=int(opts["reserve"]) if "reserve" in opts else None,
    )


def _storage(text: str) -> dict[str, str]:
    """`storage=a,b@other,-`: shared storage a (nfs:nas:/a at /mnt/a), and at /mnt/b another server's export
    (a different mount at the same path); `-` alone: the agent reports storage, and has none."""
    mounts: dict[str, str] = {}
    for item in text.split(","):
        if item and item != "-":
            name, _, server = item.partition("@")
            mounts[name] = f"nfs:{server or 'nas'}:/{name}"
    return mounts


def _networks(text: str) -> tuple[str, ...]:
    """`nets=br0,network:default`: a bare name is a bridge."""
    return tuple(item if ":" in item else f"bridge:{item}" for item in text.split(",") if item)


def parse_setup(text: str, scenario: Scenario) -> None:
    for line in _lines(text):
        kind, *rest = line.split()
        if kind == "host":
            scenario.hosts.append(_host(rest[0], _options(rest[1:])))
        elif kind == "hosts":
            first, last = (int(n) for n in re.findall(r"\d+", rest[0]))
            scenario.hosts.extend(_host(f"h{n}", _options(rest[1:])) for n in range(first, last + 1))
        elif kind == "vm":
            opts = _options(rest[1:])
            scenario.vms.append(
                SimVm(
                    VmId(int(rest[0].lstrip("vm"))),
                    rest[0],
                    VmUuid(f"uuid-{rest[0]}"),
                    int(opts.get("mem", 1024)),
                    int(opts.get("cpus", 1)),
                    _yes(opts.get("ha", "yes")),
                    int(opts.get("priority", 0)),
                    opts.get("group"),
                    opts.get("host"),
                    tuple(name for name in opts.get("disk", "").split(",") if name),
                    _networks(opts.get("net", "")),
                )
            )
        elif kind == "config":
            scenario.config[rest[0]] = rest[1]
        elif kind == "seed":
            scenario.seed = int(rest[0])
        elif kind == "leases":
            scenario.lease_mode = rest[0]
            if len(rest) > 1:
                scenario.lease_expiry_s = float(rest[1])
        else:
            raise ScriptError(f"unknown setup line: {line}")


def parse_script(text: str, scenario: Scenario) -> None:
    for line in _lines(text):
        at_text, _, command = line.partition(" ")
        at = float(at_text)
        if command.strip() == "end":
            scenario.end_s = at
        else:
            scenario.commands.append((at, command.strip()))
    if not scenario.end_s:
        raise ScriptError("the script must end with '<t> end'")


def _lines(text: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def load(folder: Path) -> Scenario:
    scenario = Scenario()
    parse_setup((folder / "setup.txt").read_text(), scenario)
    parse_script((folder / "script.txt").read_text(), scenario)
    return scenario


def run(scenario: Scenario) -> Simulator:
    sim = Simulator(scenario.hosts, scenario.vms, seed=scenario.seed, config=CoreConfig.from_mapping(scenario.config))
    sim.world.lease_mode, sim.world.lease_expiry_s = scenario.lease_mode, scenario.lease_expiry_s
    for at, command in scenario.commands:
        sim.schedule(at, apply, sim, command)
    try:
        sim.run_until(scenario.end_s)
    finally:
        sim.close()
    return sim


def apply(sim: Simulator, command: str) -> None:
    """Carry out one script command at the current simulated time."""
    sim.note(command)
    words = command.split()
    verb, target, arg = words[0], words[1] if len(words) > 1 else "", words[2] if len(words) > 2 else ""
    world, agents = sim.world, sim.agents
    if verb == "restart" and target == "manager":
        sim.restart_manager()
    elif verb == "network" and target == "manager":
        world.manager_net_up = arg == "on"
        if arg == "off":
            for host in world.hosts.values():
                agents.vanished(host)  # every stream dies without a FIN: the keepalive notices
    elif verb in ("kill-vm", "guest-shutdown"):
        uuid = world.vms_by_name[target].uuid
        cause = StopCause.CRASHED if verb == "kill-vm" else StopCause.GUEST_SHUTDOWN
        for host_id in world.where(uuid):
            agents.stop_vm(world.hosts[host_id], uuid, cause)
    elif verb in ("ha", "start", "stop"):
        _operator_vm(sim, verb, target, arg)
    elif verb == "migrate" and arg == "--cancel":
        sim.operate(ops.managed_vm(target), lambda vm_id: [f.VmMigrationCancelRequested(vm_id)])
    elif verb == "migrate":
        sim.operate(*ops.migratable_vm(target, arg or None))
    elif verb == "virsh-migrate":
        uuid = world.vms_by_name[target].uuid
        sources = world.where(uuid)
        if sources:
            agents.migrations.start(world.hosts[sources[0]], uuid, world.hosts_by_name[arg], sim.epoch, None)
    elif verb == "database":
        _database(sim, target, arg)
    elif verb == "driver" and target == "stall":
        sim.stall_driver(float(arg))
    else:
        _host_command(sim, verb, world.hosts_by_name[target], arg, words[3:])


def _operator_vm(sim: Simulator, verb: str, name: str, arg: str) -> None:
    def fact(vm_id: VmId) -> list[f.Fact]:
        if verb == "ha":
            return [f.VmHaChanged(vm_id, arg == "on")]
        return [f.VmStartRequested(vm_id) if verb == "start" else f.VmStopRequested(vm_id)]

    sim.operate(ops.managed_vm(name), fact)


def _database(sim: Simulator, what: str, arg: str) -> None:
    if what in ("down", "up"):
        sim.store.down = what == "down"
    elif what == "stall":
        sim.store.stalled_until = sim.now + float(arg)
    else:
        raise ScriptError(f"unknown database command: {what}")


def _host_command(sim: Simulator, verb: str, host: SimHost, arg: str, more: list[str]) -> None:
    agents, now = sim.agents, sim.now
    if verb == "power":
        agents.power_off(host) if arg == "off" else agents.power_on(host)
    elif verb in ("network", "link"):
        if verb == "network":
            host.net_up = arg == "on"
        else:
            host.manager_link_up = arg == "on"
        if arg == "off" and host.stream_open:
            agents.vanished(host)  # the manager notices through its keepalive
            host.stream_open = False  # the agent notices at once and keeps trying to reconnect
        agents.schedule_connect(host, 2.0)
    elif verb == "drop":
        host.drop_rate = float(arg)
    elif verb == "delay":
        host.extra_delay_s = float(arg)
    elif verb == "partition":
        other = sim.world.hosts_by_name[arg]
        pair = frozenset((host.id, other.id))
        if more and more[0] == "off":
            sim.world.partitions.discard(pair)
        else:
            sim.world.partitions.add(pair)
    elif verb == "storage":
        if arg == "off" and host.renews_leases():
            host.stop_renewing(now, sim.world.lease_expiry_s)
        elif arg == "on":
            host.lease_until.clear()  # renewing again: its running VMs' locks are its own, current ones
        host.storage_ok = arg == "on"
        host.update_heartbeat(now)
    elif verb == "mount":  # mount h2 a off|on: the host's storage a turns unhealthy / healthy again
        (host.storage_down.add if more and more[0] == "off" else host.storage_down.discard)(arg)
        agents.send(host, f.InventoryChanged(host.id, host.inventory()))
    elif verb == "hypervisor":
        host.hypervisor_ok = arg == "on"
        agents.full_report(host)
    elif verb == "agent":
        _agent_command(sim, host, arg)
    elif verb == "bmc":
        host.bmc_alive = arg != "dead"
        host.bmc_fail_next = int(more[0]) if arg == "fail" else 0
    elif verb == "repeat-report":
        report = agents.last_delta.get(host.id)
        if report is not None:
            agents.send(host, report)
    elif verb == "maintenance":
        sim.operate(*ops.maintenance(host.name, arg == "on"))
    elif verb == "confirm-down":
        sim.operate(*ops.confirm_down(host.name, "operator"))
    elif verb == "watchdog":
        if arg == "kill":
            watchdog.daemon_killed(sim, host)
        elif arg == "broken":
            host.wd_broken = True
        else:
            host.watchdog, host.wd_broken = arg == "on", False
    elif verb in ("disable", "enable"):
        sim.operate(*ops.enabled(host.name, verb == "enable"))
    elif verb == "remove":
        sim.operate(*ops.removable_host(host.name))
    else:
        raise ScriptError(f"unknown command: {verb}")


def _agent_command(sim: Simulator, host: SimHost, arg: str) -> None:
    if arg in ("stop", "crash"):
        if host.stream_open:
            sim.agents.send(host, f.AgentDisconnected(host.id, planned=arg == "stop"))
        host.agent_enabled = host.agent_running = host.stream_open = False
        if arg == "stop":
            watchdog.disarm(host)
        else:
            watchdog.crashed(sim, host, "agent crashed")
    elif arg == "freeze":
        # SIGSTOP: the stream stays open but silent (the manager hears nothing, not even a close).
        host.agent_running, host.agent_frozen, host.stream_open = False, True, False
        watchdog.silent(sim, host, "agent frozen")
    elif arg == "start":
        host.agent_enabled = host.agent_running = host.powered
        host.agent_frozen = False
        if host.powered:
            watchdog.pet(sim, host)  # takes the arm over (in time) or too late: the reset comes anyway
        sim.agents.schedule_connect(host, 0.1)
    else:
        raise ScriptError(f"unknown agent command: {arg}")
    host.update_heartbeat(sim.now)
