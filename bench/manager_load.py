"""Manager benchmark: how many agents one `kvmha-manager` holds at a 2 s ping interval, on PostgreSQL.

    .venv/bin/python bench/manager_load.py [--steps 100,1000] [--search-from 2000] [--search-step 1500]
                                           [--budget-s 330] [--window-s 30] [--search-window-s 20]
                                           [--domains 3] [--database URL] [--connect-rate 100]
                                           [--out manager_load.json]
    .venv/bin/python bench/manager_load.py --restart-at 2000
    .venv/bin/python bench/manager_load.py --steps 10000 --search-from 0 --budget-s 1800 --stall-s 10 \
                                           --fail-share 0.01 --restart --out manager_load_10k.json

The third form is the fixed 10,000-agent step with its extra phases: a database stall (every kvmha table locked
by another session for 10 s; hosts declared behind are counted, 0 expected), failure injection (1 % of the agents
go silent at once, their streams left open as after a power loss; detection latency = the "Up -> Investigating"
event - the agent's last ping, p50/p99, and any other host leaving Up is a false host-down), and (--restart) a
manager restart under all the agents, as in the second form, reported with the step. It needs the machine to
itself (no lab, bench or test suite beside it) for at least 10 minutes (a 100 s ramp, the wait for all Up, the
window and the phases); no run has completed here yet (bench/results/manager_load_10k_interrupted.json).

The second form measures a manager restart instead of the search: N agents connected, the manager stopped (SIGTERM)
and started again on the same database and ports; it reports how long until all N are back Up and pinging, and
whether any host was declared behind (Investigating) meanwhile. The simulated agents retry every 1-2 s (the real
agent backs off exponentially up to 30 s, which only makes returns later); results in manager_restart.json.

Set-up: a fresh PostgreSQL database (kvmha.lab.testing.databases: a database of its own, dropped afterwards, on the
server of KVMHA_TEST_POSTGRES_URL, by default the machine's PostgreSQL at 127.0.0.1:5432; or --database), one
real `kvmha-manager` process started like the integration tests start it (kvmha.lab.testing.local, manager.toml
with ping.interval = 2, every other setting at its default: ping.timeout 7 s), and ONE separate load process
(this file with --load-process) that runs N simulated agents as grpc.aio clients, each on its own TCP connection (a
local subchannel pool, as N real agents would be). Each simulated agent says Hello, sends a full power report of
`--domains` running domains, then a Ping every 2 s (±5 % jitter, random phase) and a full report every 30 s (the
agent's default resync); it answers CheckNeighbor/GetCapacity commands like a healthy agent.

Steps: N = 100, 1,000 (30 s windows), then a search 2,000, 3,500, 5,000, ... (20 s windows; agents are added,
never restarted) until a step fails or the next one cannot finish within the time budget (~5.5 min, predicted from
the last ramp's rate). Each step ramps up to N: new agents start at --connect-rate per second at most (a fleet's
agents do not all start in the same second), at most 256 waiting for their Welcome (the manager registers the
Hellos that arrive together in one transaction); how late the agents started behind that schedule and how late
the load process's own event loop ran (a 100 ms tick) are reported for the ramp, and hosts that left Up during the
ramp count as false host-downs as well. Then it waits until the manager lists all N hosts Up, and measures over the
window:

* manager CPU (% of one core, utime+stime from /proc/<pid>/stat over the window) and RSS (VmRSS at the end, VmHWM
  peak); for context the load process's own CPU, all postgres processes' CPU and the whole machine's busy share
  (2 cores shared with other work: the figures are what this machine gave, not what the manager needs alone);
* ping latency. The manager does not acknowledge pings, so it is measured from what it records: the gRPC adapter
  stamps each ping with its arrival and the core keeps it as the host's `last_ping_at` (the admin API returns that
  in-memory value, on the wall clock). Since silence is measured from arrivals, this latency no longer shows a slow
  driver: the driver's own lag (arrival -> handled) is read separately from the manager's
  kvmha_driver_lag_seconds histogram over the window (p50/p99 are bucket upper bounds). A few times per window
  the load process calls ListHosts and, for each host, matches `last_ping_at` to the latest ping that agent sent
  before that instant: latency = last_ping_at - send time (same machine, same clock). This covers the whole path: the
  client's write, TCP, gRPC in the manager, the queue to the single driver task and the core's handling. It is exact
  while the latency stays under the ping interval (2 s); a host whose manager-side record is older than a ping sent
  more than 1 s before the snapshot is counted as "lagging", which flags the case where the matching would understate
the latency;
* handled vs offered pings: the manager's kvmha_facts_total{kind="HeartbeatReceived"} rate (metrics port) against
  the pings the load process sent per second;
* the duration of those ListHosts calls (each loads every host and VM row: with thousands of hosts it is real
  work in the manager, done in a worker thread that competes with the event loop for the GIL, so the snapshots
  themselves can delay pings a little; an operator's `kvmha host list` would too);
* false host-downs: every "host.status" event "Up -> ..." of a simulated host (all of them ping all the time),
  counted over the ramp and the window, unless that host's simulated agent itself had sent no ping for
  ping.timeout before the event: then the load process, starved, really fell silent for it and the manager was
  right; those are reported apart ("load-silenced") and fail the step as the load process's limit, not the
  manager's. And the load process's own stream errors, its send lateness (how late it sent pings behind their
  schedule: when the load process itself is starved, that shows here first) and its event loop's lateness.

A step fails on any false host-down, stream error, lagging host, or a latency p99 above the ping interval; the
largest N that passed is the maximum found (when no step failed, the manager's limit lies above it: the budget
ended the search). Prints a table and writes bench/results/manager_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid as uuid_module
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from kvmha.proto.v1 import admin_pb2 as apb
from kvmha.proto.v1 import admin_pb2_grpc, agent_pb2_grpc
from kvmha.proto.v1 import agent_pb2 as pb

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
AgentCall = grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ManagerMessage]
PING_INTERVAL_S = 2.0
RESYNC_S = 30.0
CONNECTS_IN_FLIGHT = 256  # Hellos waiting for their Welcome at most (the manager registers them by group commit)
CONNECT_RATE = 100.0  # new agents per second at most (--connect-rate): a fleet's agents do not all start at once
LOOP_TICK_S = 0.1  # the load process measures its own event loop's lateness at this period
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "manager_load.json"
RESTART_SETTLE_S = 20.0 + 7.0 + 8.0  # startup.grace + ping.timeout (defaults) + margin
RESTART_WAIT_S = 120.0  # all agents back within this, or the restart counts as not recovered
PING_TIMEOUT_S = 7.0  # the manager's default ping.timeout
LIST_PAGE = 1000  # hosts per ListHosts page
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/test"  # the machine's PostgreSQL (the bench makes its own db)
STALLED_TABLES = "mshost, host, vm_instance, op_ha_work, configuration, event"


# ---------------------------------------------------------------------------------------------- /proc


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mib(pid: int) -> dict[str, float]:
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def postgres_cpu_s() -> float:
    """All postgres processes on the machine (the server is shared: this is context, not the manager's cost)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/comm") as fh:
                    if fh.read().strip() != "postgres":
                        continue
                total += cpu_s(int(entry))
    return total


def machine_ticks() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------------------------------------- load process


@dataclass
class SimAgent:
    index: int
    host_uuid: str
    name: str
    domains: list[pb.DomainPower]
    sent: deque[float] = field(default_factory=lambda: deque(maxlen=128))  # wall-clock send times of pings
    connected: bool = False
    silent: bool = False  # failure injection: the host "loses power" (its stream stays open, it says nothing)
    errors: int = 0
    last_error: str = ""
    credentials: grpc.ChannelCredentials | None = None


class Load:
    def __init__(self, link: str, admin: str, metrics: str, manager_pid: int, domains: int, pki_dir: str) -> None:
        from kvmha.lab.pki import LabPki  # the manager runs mutual TLS: every simulated host has its certificate

        self.link, self.metrics, self.manager_pid, self.domains = link, metrics, manager_pid, domains
        self.pki = LabPki(Path(pki_dir))
        self.admin_channel = grpc.aio.secure_channel(admin, self.pki.operator().channel_credentials(),
                                                     options=[("grpc.max_receive_message_length", 1 << 28)])
        self.admin = admin_pb2_grpc.AdminServiceStub(self.admin_channel)
        self.agents: list[SimAgent] = []
        self.by_uuid: dict[str, SimAgent] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.pings_sent = 0
        self.late_s: list[float] = []  # send lateness behind schedule, this window
        self.connect_s: list[float] = []
        self.event_cursor = 0
        self.host_names: dict[str, str] = {}
        self.agent_of: dict[str, SimAgent] = {}  # event subject (host:ID) -> its simulated agent
        self.load_silenced: list[str] = []  # hosts rightly found silent: their simulated agent sent nothing
        self.ramp_rate = 50.0  # new agents per second, as measured by the last ramp
        self.connect_rate = CONNECT_RATE
        self.connect_late_s: list[float] = []  # how late each new agent started behind the ramp's schedule
        self.loop_late_s: list[float] = []  # the load process's own event-loop lateness (its honesty)
        self._ticker: asyncio.Task[None] | None = None
        self.certificates_s = 0.0  # minting the new agents' certificates before the last ramp
        self.list_hosts_s: list[float] = []  # how long the admin ListHosts calls of the windows took

    async def tick(self) -> None:
        """The load process's own lateness: a load generator starved of CPU sends late and reads late, which would
        read as the manager's slowness; every step reports it."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LOOP_TICK_S
            await asyncio.sleep(LOOP_TICK_S)
            self.loop_late_s.append(max(0.0, loop.time() - due))

    # ---- one simulated agent

    async def run_agent(self, agent: SimAgent, ready: asyncio.Event) -> None:
        while True:
            try:
                await self._stream(agent, ready)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                agent.errors += 1
                agent.last_error = f"{type(error).__name__}: {str(error)[:200]}"
            agent.connected = False
            ready.set()
            await asyncio.sleep(1.0 + random.random())

    async def _stream(self, agent: SimAgent, ready: asyncio.Event) -> None:
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.keepalive_time_ms", 60_000)]
        if agent.credentials is None:  # minted once per simulated host, before its first connection
            agent.credentials = self.pki.host(agent.name, agent.host_uuid).channel_credentials()
        async with grpc.aio.secure_channel(self.link, agent.credentials, options=options) as channel:
            call = agent_pb2_grpc.AgentLinkStub(channel).Connect(None)  # None: messages come from write()
            lock = asyncio.Lock()
            started = time.monotonic()
            await call.write(pb.AgentMessage(hello=pb.Hello(
                host_uuid=agent.host_uuid, hostname=agent.name, management_address="127.0.0.1",
                capacity=pb.Capacity(cpus=32, memory_mib=262144, free_memory_mib=200000), libvirt_version="9.0.0",
                qemu_version="7.2.0", agent_version="bench", protocol_version=pb.PROTOCOL_VERSION_CURRENT,
                boot_id=str(uuid_module.uuid4()))))
            first = await call.read()
            if not isinstance(first, pb.ManagerMessage) or first.WhichOneof("msg") != "welcome":  # EOF: ended
                raise RuntimeError(f"no Welcome: {first}")
            self.connect_s.append(time.monotonic() - started)
            sequence = 1
            await call.write(self._report(agent, sequence))
            agent.connected = True
            ready.set()
            reader = asyncio.create_task(self._answer(call, lock))
            try:
                loop = asyncio.get_running_loop()
                next_ping = loop.time() + random.uniform(0, PING_INTERVAL_S)
                next_resync = loop.time() + random.uniform(0, RESYNC_S)
                while not reader.done():
                    await asyncio.sleep(max(0.0, next_ping - loop.time()))
                    self.late_s.append(loop.time() - next_ping)
                    if agent.silent:
                        next_ping += PING_INTERVAL_S
                        continue
                    sequence += 1
                    async with lock:
                        agent.sent.append(time.time())
                        await call.write(pb.AgentMessage(ping=pb.Ping(sequence=sequence, hypervisor_connected=True,
                                                                      domains_running=len(agent.domains),
                                                                      sent_mono_s=time.monotonic())))
                    self.pings_sent += 1
                    next_ping += PING_INTERVAL_S * random.uniform(0.95, 1.05)
                    if loop.time() >= next_resync:
                        sequence += 1
                        async with lock:
                            await call.write(self._report(agent, sequence))
                        next_resync += RESYNC_S
                await reader  # raises the stream's error
                raise RuntimeError("the manager ended the stream")
            finally:
                reader.cancel()

    @staticmethod
    def _report(agent: SimAgent, sequence: int) -> pb.AgentMessage:
        return pb.AgentMessage(power=pb.PowerStateReport(full=True, domains=agent.domains, hypervisor_connected=True,
                                                         sequence=sequence))

    async def _answer(self, call: AgentCall, lock: asyncio.Lock) -> None:
        """Answer commands like a healthy agent (investigations of other hosts ask neighbours)."""
        while True:
            message = await call.read()
            if not isinstance(message, pb.ManagerMessage):  # grpc.aio.EOF: the stream ended
                return
            if message.WhichOneof("msg") != "command":
                continue
            command = message.command
            kind = command.WhichOneof("kind")
            if kind == "check_neighbor":
                result = pb.CommandResult(request_id=command.request_id, ok=True, neighbor=pb.NeighborReport(
                    host_uuid=command.check_neighbor.host_uuid, tcp_reachable=True, icmp_checked=True,
                    icmp_reachable=True, heartbeat_found=True, heartbeat_age_s=1.0))
            elif kind == "get_capacity":
                result = pb.CommandResult(request_id=command.request_id, ok=True,
                                          capacity=pb.Capacity(cpus=32, memory_mib=262144, free_memory_mib=200000))
            else:
                result = pb.CommandResult(request_id=command.request_id, ok=False, code=pb.ERROR_UNKNOWN_COMMAND,
                                          message="the bench agent runs no VMs")
            async with lock:
                await call.write(pb.AgentMessage(result=result))

    # ---- steps

    async def ramp_to(self, count: int) -> None:
        """Start agents up to `count` at `connect_rate` per second at most (and at most CONNECTS_IN_FLIGHT waiting
        for their Welcome); how late each one started behind that schedule is recorded."""
        if self._ticker is None:
            self._ticker = asyncio.create_task(self.tick())
        gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        starting: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        minting = time.monotonic()
        new: list[SimAgent] = []
        for index in range(len(self.agents), count):
            domains = [pb.DomainPower(uuid=str(uuid_module.uuid4()), name=f"bench-{index:05d}-{k}", state=pb.POWER_ON,
                                      cause=pb.CAUSE_BOOTED, libvirt_state=1, libvirt_reason=1, libvirt_event=-1,
                                      libvirt_detail=-1, detail_text="RUNNING_BOOTED")
                       for k in range(self.domains)]
            agent = SimAgent(index, str(uuid_module.uuid4()), f"bench-{index:05d}", domains)
            # Certificates minted before the ramp: minting blocks this event loop (~1 ms each), which would show
            # as the load process's lateness during the ramp.
            agent.credentials = self.pki.host(agent.name, agent.host_uuid).channel_credentials()
            new.append(agent)
        self.certificates_s = time.monotonic() - minting
        await asyncio.sleep(2 * LOOP_TICK_S)  # the tick that the minting held up has run: not the ramp's lateness
        self.loop_late_s = []
        begun = loop.time()
        for offset, agent in enumerate(new):
            due = begun + offset / self.connect_rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            self.agents.append(agent)
            self.by_uuid[agent.host_uuid] = agent

            async def start(agent: SimAgent, due: float) -> None:
                async with gate:
                    self.connect_late_s.append(max(0.0, loop.time() - due))
                    ready = asyncio.Event()
                    self.tasks.append(asyncio.create_task(self.run_agent(agent, ready)))
                    await ready.wait()

            starting.append(asyncio.create_task(start(agent, due)))
        await asyncio.gather(*starting)

    async def hosts(self) -> tuple[float, list[apb.HostInfo]]:
        """Every host, in pages of LIST_PAGE (as the CLI reads them); the time before the first page."""
        before = time.time()
        found: list[apb.HostInfo] = []
        token = ""
        while True:
            started = time.time()
            reply = await self.admin.ListHosts(apb.ListHostsRequest(page_size=LIST_PAGE, page_token=token), timeout=60)
            self.list_hosts_s.append(time.time() - started)
            found += reply.hosts
            token = reply.next_page_token
            if not token:
                return before, found

    async def metric_lines(self) -> list[str]:
        def fetch() -> list[str]:
            with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as reply:
                text: str = reply.read().decode()
            return text.splitlines()

        return await asyncio.to_thread(fetch)

    async def lag_buckets(self) -> dict[float, float]:
        """The driver's lag histogram (a fact's arrival -> handled): upper bound -> cumulative count."""
        buckets: dict[float, float] = {}
        for line in await self.metric_lines():
            if line.startswith("kvmha_driver_lag_seconds_bucket{"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float("inf") if bound == "+Inf" else float(bound)] = float(line.split()[-1])
        return buckets

    async def wait_up(self, count: int, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            _, hosts = await self.hosts()
            if sum(1 for h in hosts if h.status == "Up" and h.uuid in self.by_uuid) >= count:
                return time.monotonic() - started
            await asyncio.sleep(1.0)
        raise TimeoutError(f"not all {count} hosts Up within {timeout_s:.0f} s")

    def latency_sample(self, before: float, hosts: list[apb.HostInfo]) -> tuple[list[float], int]:
        latencies: list[float] = []
        lagging = 0
        for host in hosts:
            agent = self.by_uuid.get(host.uuid)
            if agent is None or not agent.sent:
                continue
            self.host_names[f"host:{host.id}"] = host.name
            self.agent_of[f"host:{host.id}"] = agent
            sent = list(agent.sent)
            matched = [s for s in sent if s <= host.last_ping_at]
            if matched:
                latencies.append(host.last_ping_at - matched[-1])
            if any(host.last_ping_at < s <= before - 1.0 for s in sent):
                lagging += 1
        return latencies, lagging

    async def counters(self) -> tuple[float, float]:
        """Pings sent and the manager's HeartbeatReceived count at (about) the same instant: the scrape can take a
        second under load, so the sent count is the mean of before and after it."""
        before = self.pings_sent
        handled = await self.heartbeats_handled()
        return (before + self.pings_sent) / 2, handled

    async def heartbeats_handled(self) -> float:
        def fetch() -> float:
            with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as reply:
                text = reply.read().decode()
            for line in text.splitlines():
                if line.startswith('kvmha_facts_total{kind="HeartbeatReceived"}'):
                    return float(line.split()[-1])
            return 0.0

        return await asyncio.to_thread(fetch)

    async def streams_metric(self) -> float:
        def fetch() -> float:
            with urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=10) as reply:
                for line in reply.read().decode().splitlines():
                    if line.startswith("kvmha_agent_streams "):
                        return float(line.split()[-1])
            return float("nan")

        return await asyncio.to_thread(fetch)

    async def false_downs(self) -> list[str]:
        """'Up -> ...' status events of simulated hosts since the last call, but for hosts whose simulated agent
        itself sent no ping for ping.timeout before the event: the load process, starved, really fell silent for
        them, and the manager was right (those go to `self.load_silenced`, reported apart)."""
        events: list[apb.EventInfo] = []
        while True:
            reply = await self.admin.ListEvents(apb.ListEventsRequest(after_id=self.event_cursor, limit=10_000),
                                                timeout=60)
            for event in reply.events:
                self.event_cursor = max(self.event_cursor, event.id)
                if event.kind == "host.status" and event.message.startswith("Up ->"):
                    events.append(event)
            if len(reply.events) < 10_000:
                break
        if any(event.subject not in self.agent_of for event in events):
            await self.hosts()  # learns the subjects of hosts added since
        found: list[str] = []
        for event in events:
            text = f"{self.host_names.get(event.subject, event.subject)}: {event.message}"
            agent = self.agent_of.get(event.subject)
            if agent is not None and silent_before(agent, event.at):
                self.load_silenced.append(text)
            else:
                found.append(text)
        return found

    async def step(self, count: int, window_s: float) -> dict[str, Any]:
        errors_before = sum(a.errors for a in self.agents)
        new_agents = count - len(self.agents)
        ramp_started = time.monotonic()
        self.connect_s, self.connect_late_s, self.loop_late_s = [], [], []
        await self.ramp_to(count)
        ramp_s = time.monotonic() - ramp_started - self.certificates_s - 2 * LOOP_TICK_S
        if new_agents >= 100:
            self.ramp_rate = new_agents / ramp_s
        up_s = await self.wait_up(count, timeout_s=120 + count / 50)
        connect, connect_late, ramp_loop_late = list(self.connect_s), self.connect_late_s, self.loop_late_s
        self.load_silenced = []
        ramp_downs = await self.false_downs()  # hosts that left Up during the ramp and the wait for all Up

        self.loop_late_s = []

        self.late_s, self.list_hosts_s = [], []
        pings_before, handled_before = await self.counters()
        lag_before = await self.lag_buckets()
        t0, m0, l0, p0, (busy0, all0) = (time.monotonic(), cpu_s(self.manager_pid), cpu_s(os.getpid()),
                                          postgres_cpu_s(), machine_ticks())
        latencies: list[float] = []
        lagging, samples, not_up = 0, 0, 0
        while time.monotonic() - t0 < window_s:
            await asyncio.sleep(min(window_s / 4, window_s - (time.monotonic() - t0)))
            before, hosts = await self.hosts()
            values, behind = self.latency_sample(before, hosts)
            latencies += values
            lagging = max(lagging, behind)
            samples += 1
            not_up = max(not_up, sum(1 for h in hosts if h.uuid in self.by_uuid and h.status != "Up"))
        elapsed = time.monotonic() - t0
        m1, l1, p1, (busy1, all1) = cpu_s(self.manager_pid), cpu_s(os.getpid()), postgres_cpu_s(), machine_ticks()
        pings_after, handled_after = await self.counters()
        lag = lag_quantiles(lag_before, await self.lag_buckets())
        offered, handled = pings_after - pings_before, handled_after - handled_before
        memory = memory_mib(self.manager_pid)
        window_downs = await self.false_downs()
        downs = ramp_downs + window_downs
        errors = sum(a.errors for a in self.agents) - errors_before
        late, loop_late = self.late_s, self.loop_late_s
        result = {
            "agents": count,
            "ramp_s": round(ramp_s, 1),
            "ramp_agents_per_s": round(new_agents / ramp_s, 1) if ramp_s > 0 else None,
            "all_up_after_ramp_s": round(up_s, 1),
            "connect_p50_ms": round(percentile(connect, 0.5) * 1000, 1),
            "connect_p99_ms": round(percentile(connect, 0.99) * 1000, 1),
            "connect_rate_limit_per_s": self.connect_rate,
            "certificates_minted_s": round(self.certificates_s, 1),
            "ramp_start_late_p99_s": round(percentile(connect_late, 0.99), 2),
            "ramp_start_late_max_s": round(max(connect_late, default=0.0), 2),
            "ramp_load_loop_late_p99_ms": round(percentile(ramp_loop_late, 0.99) * 1000, 1),
            "ramp_load_loop_late_max_ms": round(max(ramp_loop_late, default=0.0) * 1000, 1),
            "ramp_false_host_downs": len(ramp_downs),
            "ramp_false_host_down_examples": ramp_downs[:5],
            "window_s": round(elapsed, 1),
            "manager_cpu_pct": round(100 * (m1 - m0) / elapsed, 1),
            "manager_rss_mib": round(memory.get("VmRSS", 0), 1),
            "manager_peak_rss_mib": round(memory.get("VmHWM", 0), 1),
            "load_process_cpu_pct": round(100 * (l1 - l0) / elapsed, 1),
            "postgres_cpu_pct": round(100 * (p1 - p0) / elapsed, 1),
            "machine_busy_pct": round(100 * (busy1 - busy0) / max(1, all1 - all0), 1),
            "pings_offered_per_s": round(offered / elapsed, 1),
            "pings_handled_per_s": round(handled / elapsed, 1),
            "ping_latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
            "ping_latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
            "ping_latency_max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
            "latency_samples": len(latencies),
            "driver_lag_p50_ms": lag[0],
            "driver_lag_p99_ms": lag[1],
            "driver_lag_max_bucket_ms": lag[2],
            "snapshots": samples,
            "list_hosts_max_s": round(max(self.list_hosts_s, default=0.0), 2),
            "lagging_hosts": lagging,
            "hosts_not_up": not_up,
            "false_host_downs": len(downs),
            "window_false_host_downs": len(window_downs),
            "false_host_down_examples": downs[:5],
            "load_silenced_hosts": len(self.load_silenced),
            "load_silenced_examples": self.load_silenced[:3],
            "stream_errors": errors,
            "stream_error_example": next((a.last_error for a in self.agents if a.last_error), ""),
            "send_late_p99_ms": round(percentile(late, 0.99) * 1000, 1),
            "send_late_max_ms": round(max(late, default=0.0) * 1000, 1),
            "load_loop_late_p99_ms": round(percentile(loop_late, 0.99) * 1000, 1),
            "load_loop_late_max_ms": round(max(loop_late, default=0.0) * 1000, 1),
            "streams_metric": await self.streams_metric(),
        }
        problems = []
        if downs:
            problems.append(f"{len(downs)} false host-downs")
        if self.load_silenced:
            problems.append(f"the load process, starved, sent no ping for ping.timeout for {len(self.load_silenced)} "
                            "hosts (found silent, rightly: the step measures the load process's limit, not the "
                            "manager's)")
        if errors:
            problems.append(f"{errors} stream errors")
        if lagging or not_up:
            problems.append(f"{lagging} hosts lagging more than one ping, {not_up} not Up")
        if not latencies or percentile(latencies, 0.99) > PING_INTERVAL_S:
            problems.append("ping latency p99 above the ping interval")
        if lag[1] > 1000 * PING_INTERVAL_S:
            problems.append("driver lag p99 above the ping interval")
        result["ok"] = not problems
        result["problems"] = problems
        return result


def lag_quantiles(before: dict[float, float], after: dict[float, float]) -> tuple[float, float, float]:
    """p50, p99 and the largest non-empty bucket of the histogram's growth between two scrapes, in ms (each is the
    upper bound of its bucket: a histogram says no more)."""
    bounds = sorted(after)
    growth = [after[b] - before.get(b, 0.0) for b in bounds]
    total = growth[-1] if growth else 0.0
    if total <= 0:
        return float("nan"), float("nan"), float("nan")

    def quantile(share: float) -> float:
        return next(b for b, count in zip(bounds, growth, strict=True) if count >= share * total)

    largest = next(b for b, count in zip(bounds, growth, strict=True) if count >= total)
    return tuple(round(v * 1000, 1) for v in (quantile(0.5), quantile(0.99), largest))  # type: ignore[return-value]


def silent_before(agent: SimAgent, at: float) -> bool:
    """Had the simulated agent sent no ping for ping.timeout before `at` (epoch seconds)? Then its host was silent
    for real. An agent that never pinged yet counts as not silent (the manager's first-ping window is longer)."""
    index = bisect.bisect_right(agent.sent, at)
    return index > 0 and at - agent.sent[index - 1] >= PING_TIMEOUT_S - 0.05


async def failure_phase(load: Load, share: float, settle_s: float) -> dict[str, Any]:
    """A share of the agents goes silent at once (power loss: the stream stays open, nothing more comes); detection
    latency = the 'Up -> Investigating' event's time - the agent's last ping sent. Other hosts must stay Up."""
    await load.false_downs()  # move the cursor past what happened before
    silenced_before = len(load.load_silenced)
    _, hosts = await load.hosts()
    subjects = {f"host:{h.id}": h.uuid for h in hosts if h.uuid in load.by_uuid}
    victims = random.sample([a for a in load.agents if a.connected], max(1, int(share * len(load.agents))))
    for agent in victims:
        agent.silent = True
    silenced = {agent.host_uuid for agent in victims}
    await asyncio.sleep(settle_s)
    detection: list[float] = []
    others: list[str] = []
    while True:
        reply = await load.admin.ListEvents(apb.ListEventsRequest(after_id=load.event_cursor, limit=10_000),
                                            timeout=60)
        for event in reply.events:
            load.event_cursor = max(load.event_cursor, event.id)
            uuid = subjects.get(event.subject)
            if event.kind != "host.status" or not event.message.startswith("Up ->") or uuid is None:
                continue
            if uuid in silenced:
                agent = load.by_uuid[uuid]
                detection.append(event.at - max(agent.sent, default=event.at))
            elif silent_before(load.by_uuid[uuid], event.at):
                load.load_silenced.append(event.message)
            else:
                others.append(event.message)
        if len(reply.events) < 10_000:
            break
    for agent in victims:  # back to life for what follows (they reconnect or ping again)
        agent.silent = False
    return {"failed_agents": len(victims), "detected": len(detection),
            "detection_p50_s": round(percentile(detection, 0.5), 2),
            "detection_p99_s": round(percentile(detection, 0.99), 2),
            "detection_max_s": round(max(detection, default=float("nan")), 2),
            "false_host_downs": len(others), "false_host_down_examples": others[:3],
            "load_silenced_hosts": len(load.load_silenced) - silenced_before}


async def stall_phase(load: Load, stall_s: float, settle_s: float) -> dict[str, Any]:
    """Ask the orchestrator to stall the database `stall_s` (every table locked), then count hosts declared behind."""
    await load.false_downs()
    print(json.dumps({"stall": stall_s}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await asyncio.sleep(settle_s)
    downs = await load.false_downs()
    return {"stall_s": stall_s, "stall_agents": len(load.agents), "declared_behind": len(downs),
            "declared_behind_examples": downs[:3]}


def counts(plan: dict[str, Any]) -> Iterator[int]:
    """The fixed steps, then (unless --search-from 0) the search."""
    yield from plan["steps"]
    count = plan["search_from"]
    while count:
        yield count
        count += plan["search_step"]


async def restart_phase(load: Load, count: int, settle_s: float) -> dict[str, Any]:
    """Ask the orchestrator to restart the manager, then measure how the N agents come back."""
    print(json.dumps({"restart": "please"}), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    _, pid, started_at, stop_s = line.split()
    load.manager_pid, started = int(pid), float(started_at)
    errors_before = sum(a.errors for a in load.agents)
    load.connect_s = []
    back_s = None
    while time.time() - started < RESTART_WAIT_S:
        with contextlib.suppress(grpc.RpcError):
            _, hosts = await load.hosts()
            back = [h for h in hosts if h.uuid in load.by_uuid and h.connected and h.status == "Up"
                    and h.last_ping_at > started]
            if len(back) >= count:
                back_s = time.time() - started
                break
        await asyncio.sleep(1.0)
    # Let every deadline a late agent could have missed pass (startup grace + ping timeout), then read the events.
    await asyncio.sleep(max(0.0, started + settle_s - time.time()))
    changes: list[tuple[str, str]] = []
    while True:
        reply = await load.admin.ListEvents(apb.ListEventsRequest(after_id=load.event_cursor, limit=10_000),
                                            timeout=60)
        for event in reply.events:
            load.event_cursor = max(load.event_cursor, event.id)
            if event.kind == "host.status" and event.at >= started:
                changes.append((event.subject, event.message))
        if len(reply.events) < 10_000:
            break
    behind = [m for _, m in changes if "-> Investigating" in m]
    hosts_behind = {subject for subject, m in changes if "-> Investigating" in m}
    return {
        "restart_agents": count, "manager_stop_s": float(stop_s),
        "all_back_after_start_s": round(back_s, 1) if back_s is not None else None,
        "hello_p50_ms": round(percentile(load.connect_s, 0.5) * 1000, 1),
        "hello_p99_ms": round(percentile(load.connect_s, 0.99) * 1000, 1),
        "hosts_declared_behind": len(hosts_behind), "investigations": len(behind),
        "declared_behind_examples": behind[:3],
        "alerts": sum("-> Alert" in m for _, m in changes),
        "fenced_or_down": sum(("-> Fenc" in m) or ("-> Down" in m) for _, m in changes),
        "stream_errors": sum(a.errors for a in load.agents) - errors_before,
        "stream_error_example": next((a.last_error for a in load.agents if a.last_error), ""),
    }


async def load_main(plan: dict[str, Any]) -> None:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit[1], limit[1]))
    load = Load(plan["link"], plan["admin"], plan["metrics"], plan["manager_pid"], plan["domains"], plan["pki"])
    load.connect_rate = plan["connect_rate"]
    deadline = time.monotonic() + plan["budget_s"]
    if plan["restart_at"]:
        print(json.dumps(await load.step(plan["restart_at"], plan["window_s"])), flush=True)
        print(json.dumps(await restart_phase(load, plan["restart_at"], plan["settle_s"])), flush=True)
        plan["steps"], plan["search_from"] = [], 0
    for count in counts(plan):
        # A step needs its ramp (at the rate the last one had), the wait for Up and the window: skip what cannot
        # finish within the budget.
        window_s = plan["window_s"] if count in plan["steps"] else plan["search_window_s"]
        if time.monotonic() + window_s + 10 + (count - len(load.agents)) / load.ramp_rate > deadline:
            print(json.dumps({"stopped": f"time budget of {plan['budget_s']:.0f} s spent before N={count}"}),
                  flush=True)
            break
        try:
            result = await load.step(count, window_s)
        except (TimeoutError, grpc.RpcError) as error:
            result = {"agents": count, "ok": False, "problems": [f"{type(error).__name__}: {error}"]}
        print(json.dumps(result), flush=True)
        if not result["ok"]:
            break
    if plan["stall_s"] and load.agents:
        print(json.dumps(await stall_phase(load, plan["stall_s"], settle_s=PING_TIMEOUT_S + 8)), flush=True)
    if plan["fail_share"] and load.agents:
        print(json.dumps(await failure_phase(load, plan["fail_share"], settle_s=PING_TIMEOUT_S + 6)), flush=True)
    if plan["restart_after"] and load.agents:
        await asyncio.sleep(PING_TIMEOUT_S)  # the silenced agents are back (they ping again) before the restart
        await load.false_downs()
        print(json.dumps(await restart_phase(load, len(load.agents), plan["settle_s"])), flush=True)
    for task in load.tasks:
        task.cancel()
    await asyncio.gather(*load.tasks, return_exceptions=True)
    await load.admin_channel.close(None)


# ---------------------------------------------------------------------------------------------- orchestrator


COLUMNS = [
    ("agents", "N"), ("ok", "ok"), ("manager_cpu_pct", "mgr CPU%"), ("manager_rss_mib", "mgr RSS MiB"),
    ("ping_latency_p50_ms", "ping p50 ms"), ("ping_latency_p99_ms", "ping p99 ms"), ("pings_offered_per_s", "sent/s"),
    ("pings_handled_per_s", "handled/s"), ("false_host_downs", "false downs"), ("load_process_cpu_pct", "load CPU%"),
    ("postgres_cpu_pct", "pg CPU%"), ("machine_busy_pct", "machine busy%"), ("ramp_s", "ramp s"),
    ("connect_p99_ms", "hello p99 ms"), ("ramp_false_host_downs", "ramp false downs"),
    ("driver_lag_p99_ms", "drv lag p99 ms"), ("load_loop_late_p99_ms", "load late p99 ms"),
]


def table(results: list[dict[str, Any]]) -> str:
    widths = [max(len(title), 6) for _, title in COLUMNS]
    lines = ["  ".join(f"{title:>{w}}" for (_, title), w in zip(COLUMNS, widths, strict=True))]
    for result in results:
        lines.append("  ".join(f"{result.get(key, '-')!s:>{w}}" for (key, _), w in zip(COLUMNS, widths, strict=True)))
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], phases: list[dict[str, Any]], path: Path) -> None:
    """Latency (ping p50/p99, driver lag p99) and manager CPU/RSS against the agent count; the phases in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted((r for r in results if "ping_latency_p99_ms" in r), key=lambda r: r["agents"])
    if not steps:
        return
    agents = [r["agents"] for r in steps]
    figure, (latency, cost) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("ping_latency_p50_ms", "ping latency p50", "o-"),
                              ("ping_latency_p99_ms", "ping latency p99", "s-"),
                              ("driver_lag_p99_ms", "driver lag p99 (bucket bound)", "^--")):
        latency.plot(agents, [r.get(key) for r in steps], style, label=label)
    latency.axhline(50, color="grey", linewidth=0.8, linestyle=":", label="acceptance 50 ms")
    latency.set_xlabel("agents (2 s pings)")
    latency.set_ylabel("ms")
    latency.set_yscale("symlog", linthresh=1)
    latency.legend(fontsize=8)
    cost.plot(agents, [r["manager_cpu_pct"] for r in steps], "o-", label="manager CPU % of one core")
    cost.plot(agents, [r["manager_rss_mib"] for r in steps], "s-", label="manager RSS MiB")
    cost.set_xlabel("agents (2 s pings)")
    cost.legend(fontsize=8)
    notes = []
    for phase in phases:
        if "stall_s" in phase:
            notes.append(f"{phase['stall_s']:.0f} s DB stall: {phase['declared_behind']} declared behind")
        if "failed_agents" in phase:
            notes.append(f"{phase['failed_agents']} silenced: detection p50 {phase['detection_p50_s']} s, "
                         f"p99 {phase['detection_p99_s']} s, {phase['false_host_downs']} false downs")
        if "restart_agents" in phase:
            notes.append(f"restart: stopped in {phase['manager_stop_s']:.1f} s, all back after "
                         f"{phase['all_back_after_start_s']} s, {phase['hosts_declared_behind']} declared behind")
    figure.suptitle("kvmha-manager under simulated agents, PostgreSQL, 2 cores shared with the load\n"
                    + "; ".join(notes), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def stall_database(url: str, seconds: float) -> None:
    """Every kvmha table locked by another session for `seconds`: each of the manager's transactions waits."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"LOCK TABLE {STALLED_TABLES} IN ACCESS EXCLUSIVE MODE"))
            time.sleep(seconds)
    finally:
        engine.dispose()
    print(f"database stalled {seconds:.0f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="100,1000", help="agent counts always measured")
    parser.add_argument("--search-from", type=int, default=2000)
    parser.add_argument("--search-step", type=int, default=1500)
    parser.add_argument("--budget-s", type=float, default=330.0, help="wall time for all steps")
    parser.add_argument("--window-s", type=float, default=30.0, help="measuring window of the --steps")
    parser.add_argument("--search-window-s", type=float, default=20.0, help="measuring window of the search steps")
    parser.add_argument("--domains", type=int, default=3, help="domains in each agent's full report")
    parser.add_argument("--database", default="", help="PostgreSQL URL of an empty database (default: a fresh one)")
    parser.add_argument("--restart-at", type=int, default=0,
                        help="instead of the search: N agents, then restart the manager and measure their return")
    parser.add_argument("--stall-s", type=float, default=0.0,
                        help="after the steps: stall the database this long (every table locked) and count hosts "
                             "declared behind")
    parser.add_argument("--fail-share", type=float, default=0.0,
                        help="after the steps: this share of the agents goes silent; detection latency p50/p99")
    parser.add_argument("--connect-rate", type=float, default=CONNECT_RATE,
                        help="new agents per second at most during a ramp")
    parser.add_argument("--restart", action="store_true",
                        help="after the steps and phases: restart the manager under all the agents (SIGTERM time, "
                             "time until all are back, hosts declared behind)")
    parser.add_argument("--out", default=RESULTS.name, help="results file name in bench/results (PNG alongside)")
    parser.add_argument("--load-process", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load_process:
        asyncio.run(load_main(json.loads(args.load_process)))
        return 0

    # Imported here, not at the top: the load process above needs neither SQLAlchemy nor the lab.
    from kvmha.lab.testing.databases import fresh_database
    from kvmha.lab.testing.local import LocalCluster

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(f"terminated by signal {signum}")  # unwinds the ExitStack: load process, manager, database

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, terminated)  # also when started in the background, which ignores SIGINT
    # As its docstring says: no environment needed. A database of its own on the machine's PostgreSQL, dropped after.
    os.environ.setdefault("KVMHA_TEST_POSTGRES_URL", DEFAULT_SERVER)

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit[1], limit[1]))  # the manager inherits it: one fd per agent
    results: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []  # the stall and failure-injection phases
    restart: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="kvmha-manager-load-") as tmp_name:
        tmp = Path(tmp_name)
        with contextlib.ExitStack() as stack:
            url = args.database or stack.enter_context(fresh_database("postgresql", tmp))
            cluster = LocalCluster(tmp, url, core_config={"ping.interval": str(PING_INTERVAL_S)})
            stack.callback(cluster.close)
            manager = cluster.start_manager()
            assert manager.process is not None
            plan = {"link": f"127.0.0.1:{cluster.agent_port}", "admin": cluster.admin_address,
                    "metrics": f"127.0.0.1:{cluster.metrics_port}", "manager_pid": manager.process.pid,
                    "pki": str(cluster.pki.directory),
                    "domains": args.domains, "steps": [int(s) for s in args.steps.split(",") if s],
                    "search_from": args.search_from, "search_step": args.search_step, "budget_s": args.budget_s,
                    "window_s": args.window_s, "search_window_s": args.search_window_s,
                    "restart_at": args.restart_at, "settle_s": RESTART_SETTLE_S, "stall_s": args.stall_s,
                    "fail_share": args.fail_share, "connect_rate": args.connect_rate,
                    "restart_after": args.restart}
            print(f"manager pid {manager.process.pid} on {url.split('@')[-1]}; ping.interval {PING_INTERVAL_S} s; "
                  f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}", flush=True)
            load = subprocess.Popen([sys.executable, __file__, "--load-process", json.dumps(plan)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

            def stop_load() -> None:
                if load.poll() is None:
                    load.send_signal(signal.SIGTERM)
                    try:
                        load.wait(15)
                    except subprocess.TimeoutExpired:
                        load.kill()
                        load.wait(5)

            stack.callback(stop_load)
            assert load.stdout is not None
            for line in load.stdout:
                result = json.loads(line)
                if "restart" in result:
                    assert load.stdin is not None
                    stopping = time.monotonic()
                    manager.stop(timeout_s=30)
                    stop_s = time.monotonic() - stopping
                    if stop_s > 5:
                        print(f"the manager took {stop_s:.1f} s to stop; its log ends:\n{manager.tail(25)}", flush=True)
                    started = time.time()
                    manager = cluster.start_manager()
                    assert manager.process is not None
                    print(f"manager restarted (stopped in {stop_s:.1f} s), new pid {manager.process.pid}", flush=True)
                    load.stdin.write(f"restarted {manager.process.pid} {started} {stop_s}\n")
                    load.stdin.flush()
                    continue
                if "stall" in result:
                    assert load.stdin is not None
                    stall_database(url, float(result["stall"]))
                    load.stdin.write("stalled\n")
                    load.stdin.flush()
                    continue
                if "stall_agents" in result or "failed_agents" in result:
                    extra.append(result)
                    print(json.dumps(result), flush=True)
                    continue
                if "restart_agents" in result:
                    restart = result
                    print(json.dumps(result), flush=True)
                    continue
                if "stopped" in result:
                    print(f"stopped: {result['stopped']}", flush=True)
                    continue
                results.append(result)
                print(json.dumps(result), flush=True)
            load.wait(60)
            if not manager.alive:
                print(f"the manager died:\n{manager.tail()}")

    passed = [r for r in results if r.get("ok")]
    maximum = max((r["agents"] for r in passed), default=0)
    print()
    print(table(results))
    if not args.restart_at:
        print(f"\nlargest N held (no false host-down, p99 ping latency under {PING_INTERVAL_S:g} s): {maximum}")
    for result in results:
        if not result.get("ok"):
            print(f"N={result['agents']} failed: {'; '.join(result.get('problems', []))}")
    if restart is not None:
        print(f"\nmanager restart with {restart['restart_agents']} agents: "
              f"stopped in {restart['manager_stop_s']:.1f} s, all back and pinging "
              f"{restart['all_back_after_start_s']} s after the new manager listened; "
              f"hosts declared behind: {restart['hosts_declared_behind']} ({restart['investigations']} "
              f"investigations), transitions to Alert: {restart['alerts']}, "
              f"fenced/down: {restart['fenced_or_down']}")
    out = RESULTS.with_name("manager_restart.json") if args.restart_at else RESULTS.with_name(Path(args.out).name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ping_interval_s": PING_INTERVAL_S, "cpus": os.cpu_count(),
                               "max_agents": None if args.restart_at else maximum, "steps": results,
                               "restart": restart, "phases": extra}, indent=2))
    if not args.restart_at:
        plot(results, extra + ([restart] if restart else []), out.with_suffix(".png"))
    print(f"written: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
