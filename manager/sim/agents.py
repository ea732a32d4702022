"""Simulated agents, hypervisors and BMCs: they connect through the manager's hub, answer the driver's commands
(SimTransport hands them over) and report facts, as the real ones would, but only through the simulated network.
Ping rounds are bucketed by phase so the agenda holds a handful of repeating events, not one per host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.model import HostCapacity, HostId, PowerState, RequestId, StopCause, VmUuid, WatchdogReport
from kvmha.manager.hub import AgentHello
from kvmha.manager.sim import watchdog
from kvmha.manager.sim.invariants import FENCED, HOST_LOST, VM_LEVEL
from kvmha.manager.sim.liveness import CRASH, FENCE
from kvmha.manager.sim.migrations import Migrations
from kvmha.manager.sim.world import SimHost
from kvmha.manager.store import AgentInfo

if TYPE_CHECKING:
    from kvmha.manager.sim.simulator import Simulator

PING_BUCKETS = 4
RECONNECT_S = 2.0
BOOT_S = 20.0
VM_BOOT_S = 1.0
FULL_REPORT_EVERY = 30  # pings: a full resync every minute, as Welcome.resync_interval_s would ask
BMC_QUERY_S = 0.3
BMC_FENCE_S = 1.5
BMC_DEAD_S = 5.0  # an unanswering BMC fails after the fencer's own timeout
# A link that dies without a FIN (power loss, cut cable, the manager's network gone): the manager's HTTP/2
# keepalive pings each agent every 0.5 s and gives it 0.5 s to answer (manager/main.py), so it notices within about
# 1 s. An agent process that dies is noticed at once (its kernel closes the socket): `agent crash`.
KEEPALIVE_NOTICE_S = 1.0


class Agents:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.world = sim.world
        self.buckets: list[list[SimHost]] = [[] for _ in range(PING_BUCKETS)]
        self.last_delta: dict[int, f.PowerStateReported] = {}
        self.migrations = Migrations(sim, self)

    def boot_all(self) -> None:
        interval = self.sim.config.ping_interval_s
        for index, host in enumerate(sorted(self.world.hosts.values(), key=lambda h: h.id)):
            host.bucket = index % PING_BUCKETS
            self.buckets[host.bucket].append(host)
            self.schedule_connect(host, 0.1 + 0.01 * (index % 10))
        for bucket in range(PING_BUCKETS):
            self.sim.schedule(interval * (bucket + 1) / PING_BUCKETS, self._ping_round, bucket)

    # ------------------------------------------------------------ the link

    def schedule_connect(self, host: SimHost, delay_s: float) -> None:
        if not host.connecting:
            host.connecting = True
            self.sim.schedule(self.sim.now + delay_s, self._connect, host)

    def _connect(self, host: SimHost) -> None:
        host.connecting = False
        if not (host.powered and host.agent_running) or host.stream_open:
            return
        if not self.world.link_up(host):
            self.schedule_connect(host, RECONNECT_S)
            return
        host.stream_open = True
        host.stream_no += 1
        agent = AgentInfo("sim", "sim", "sim", f"boot-{host.boot_no}")
        capacity = HostCapacity(host.cpus, host.memory_mib)
        hello = AgentHello(
            f"uuid-{host.name}",
            host.name,
            f"10.0.0.{host.id}",
            capacity,
            agent,
            self.watchdog_report(host),
            "lockd" if host.leases else "",
            host.inventory(),
        )
        self.sim.to_core(hello, stream=host.id)
        self.sim.checker.host_booted(host.id)
        self.sim.liveness.agent_back(host)
        self.full_report(host)

    @staticmethod
    def watchdog_report(host: SimHost) -> WatchdogReport:
        if host.watchdog:
            return WatchdogReport(armed=True, timeout_s=host.watchdog_timeout_s)
        return WatchdogReport(armed=False, detail="kvmha-watchdog not running")

    def drop_stream(self, host: SimHost) -> None:
        host.stream_open = False
        if host.powered and host.agent_running:
            self.schedule_connect(host, RECONNECT_S)

    def vanished(self, host: SimHost) -> None:
        """The host's open stream died without closing (call before clearing `stream_open`): the manager's
        keepalive notices it KEEPALIVE_NOTICE_S later, unless that agent has opened a new stream meanwhile."""
        if host.stream_open:
            self.sim.schedule(self.sim.now + KEEPALIVE_NOTICE_S, self._keepalive_failed, host, host.stream_no)

    def _keepalive_failed(self, host: SimHost, stream_no: int) -> None:
        if host.stream_no == stream_no and self.sim.world.manager_running:
            if host.stream_open:
                self.drop_stream(host)  # the manager closes its end; the agent reconnects when it can
            self.sim.to_core(f.AgentDisconnected(host.id, planned=False), 0.0)

    def send(self, host: SimHost, fact: f.Fact) -> None:
        if host.stream_open and self.world.link_up(host):
            self.sim.to_core(fact, stream=host.id)

    def full_report(self, host: SimHost) -> None:
        domains = tuple(
            f.DomainReport(uuid, self.world.vms[uuid].name, PowerState.POWER_ON) for uuid in sorted(host.running)
        ) + tuple(
            f.DomainReport(uuid, self.world.vms[uuid].name, PowerState.POWER_ON, migrating=True)
            for uuid in sorted(host.incoming)
        )
        hv = host.hypervisor_ok
        self.send(host, f.PowerStateReported(host.id, True, hv, domains if hv else ()))

    def delta(
        self, host: SimHost, uuid: VmUuid, power: PowerState, cause: StopCause, *, migrating: bool = False
    ) -> None:
        if not host.hypervisor_ok:
            return
        domain = f.DomainReport(uuid, self.world.vms[uuid].name, power, cause, migrating)
        report = f.PowerStateReported(host.id, False, True, (domain,))
        self.last_delta[host.id] = report
        self.send(host, report)

    def _ping_round(self, bucket: int) -> None:
        interval = self.sim.config.ping_interval_s
        self.sim.schedule(self.sim.now + interval, self._ping_round, bucket)
        for host in self.buckets[bucket]:
            if not (host.powered and host.agent_running):
                continue
            if host.stream_open and not self.world.link_up(host):
                self.drop_stream(host)
            elif not host.stream_open:
                self.schedule_connect(host, RECONNECT_S)
            if self._isolation_check(host):
                watchdog.pet(self.sim, host)
            if host.stream_open:
                host.ping_seq += 1
                ping = f.HeartbeatReceived(
                    host.id, host.ping_seq, host.hypervisor_ok, host.storage_ok, self.watchdog_report(host)
                )
                self.sim.to_core(ping, stream=host.id)
                if host.ping_seq % FULL_REPORT_EVERY == 0:
                    self.full_report(host)

    def _isolation_check(self, host: SimHost) -> bool:
        """The agent's isolation response (policy destroy-vms): lost the manager AND storage for isolation.after.
        False while the response is due and not complete: the agent withholds its watchdog pets (a hung hypervisor
        cannot destroy the VMs: the watchdog then resets the host)."""
        if host.stream_open or host.storage_ok:
            host.isolated_since = None
            return True
        if host.isolated_since is None:
            host.isolated_since = self.sim.now
        elif self.sim.now - host.isolated_since >= self.sim.config.isolation_after_s and host.running:
            if not host.hypervisor_ok:
                watchdog.silent(self.sim, host, "isolation response cannot complete: hypervisor unreachable")
                return False
            count = len(host.running)
            self.migrations.host_lost(host)
            for uuid in sorted(host.running):
                self.sim.checker.stopped(uuid, host.id, VM_LEVEL)
                # The manager must wait out the watchdog-backed self-fence time (never, without a watchdog).
                self.sim.liveness.lost(uuid, self.sim.liveness.self_fence_cause(host), host)
            host.running.clear()
            self.sim.note(
                f"sim: {host.name} agent isolated for {self.sim.now - host.isolated_since:.1f} s: "
                f"self-fenced (destroyed {count} VMs)"
            )
        return True

    def manager_lost(self) -> None:
        for host in self.world.hosts.values():
            if host.stream_open:
                self.drop_stream(host)

    def manager_back(self) -> None:
        pass  # agents find it on their next reconnect attempt

    # ------------------------------------------------------------ commands from the manager (SimTransport)

    def send_command(self, action: a.SendCommand, epoch: int) -> None:
        host = self.world.hosts[action.host_id]
        if host.stream_open and self.world.link_up(host):
            if host.drop_rate and self.sim.rng.random() < host.drop_rate:
                return  # lost on a lossy link: the core times it out
            at = self.sim.now + self.sim.latency() + host.extra_delay_s
            self.sim.schedule(at, self._execute, epoch, host, action)
        else:
            error = f"{f.NOT_DELIVERED}: agent not connected"
            self.sim.to_core(f.CommandCompleted(action.request_id, False, error), 0.001)

    def disconnect(self, host_id: HostId) -> None:
        host = self.world.hosts[host_id]
        if host.stream_open:
            self.drop_stream(host)

    def reply(self, epoch: int, host: SimHost, fact: f.Fact) -> None:
        if epoch == self.sim.epoch and host.stream_open and self.world.link_up(host):
            self.sim.to_core(fact, stream=host.id)

    def _execute(self, epoch: int, host: SimHost, action: a.SendCommand) -> None:
        if not (host.powered and host.agent_running):
            return  # died with the command in flight: the core times it out
        command, rid, now = action.command, action.request_id, self.sim.now
        if isinstance(command, a.StartVm):
            self._start_vm(epoch, host, rid, command.vm_uuid)
        elif isinstance(command, (a.StopVm, a.DestroyVm)):
            if command.vm_uuid in host.running:
                self.stop_vm(host, command.vm_uuid, StopCause.DESTROYED)
            self.sim.schedule(now + 0.2, self.reply, epoch, host, f.CommandCompleted(rid, True))
        elif isinstance(command, a.CheckLease):
            state, detail = self.world.lease_state(command.vm_uuid, host, now)
            lease = f.LeaseCheck(command.vm_uuid, state, detail)
            self.sim.schedule(now + 0.1, self.reply, epoch, host, f.CommandCompleted(rid, True, "", lease))
        elif isinstance(command, a.MigrateVm):
            target = self.world.hosts[command.target_host_id]
            self.migrations.start(host, command.vm_uuid, target, epoch, rid)
        elif isinstance(command, a.CancelMigration):
            self.migrations.cancel(command.vm_uuid)
            self.sim.schedule(now + 0.05, self.reply, epoch, host, f.CommandCompleted(rid, True))
        elif isinstance(command, a.CheckNeighbor):
            target = self.world.hosts[command.target_host_id]
            reached = self.world.reaches(host, target)
            age = target.heartbeat_age_s(now) if host.storage_ok else None
            answer = f.CommandCompleted(rid, True, "", f.NeighborCheck(target.id, reached, reached, age))
            self.sim.schedule(now + (0.2 if reached else 1.0), self.reply, epoch, host, answer)
        else:
            self.sim.schedule(now + 0.05, self.reply, epoch, host, f.CommandCompleted(rid, True))

    def _start_vm(self, epoch: int, host: SimHost, rid: str, uuid: VmUuid) -> None:
        if not host.hypervisor_ok:
            self.sim.schedule(
                self.sim.now + 0.05,
                self.reply,
                epoch,
                host,
                f.CommandCompleted(RequestId(rid), False, "hypervisor unavailable"),
            )
            return
        if uuid in host.running:
            done = f.CommandCompleted(RequestId(rid), True, "", f.VmStartConfirmed(uuid, True))
            self.sim.schedule(self.sim.now + 0.05, self.reply, epoch, host, done)
            return
        if not host.reaches_disks(self.world.vms[uuid]):  # libvirt: "Cannot access storage file"
            self.sim.metrics.storage_refusals += 1
            failed = f.CommandCompleted(RequestId(rid), False, "cannot access storage file")
            self.sim.schedule(self.sim.now + 0.05, self.reply, epoch, host, failed)
            return
        self.sim.schedule(self.sim.now + VM_BOOT_S, self._vm_booted, epoch, host, rid, uuid)

    def _vm_booted(self, epoch: int, host: SimHost, rid: str, uuid: VmUuid) -> None:
        if not (host.powered and host.hypervisor_ok):
            return
        self.sim.checker.started(uuid, host.id, self.sim.now)
        self.sim.liveness.started(uuid)
        host.running.add(uuid)
        self.sim.vm_started(uuid, host.id)
        self.reply(epoch, host, f.CommandCompleted(RequestId(rid), True, "", f.VmStartConfirmed(uuid, False)))
        self.delta(host, uuid, PowerState.POWER_ON, StopCause.NONE)

    def stop_vm(self, host: SimHost, uuid: VmUuid, cause: StopCause) -> None:
        self.migrations.vm_stopped(host, uuid)
        host.running.discard(uuid)
        self.sim.checker.stopped(uuid, host.id, VM_LEVEL)
        self.sim.liveness.lost(uuid, self._restart_owed(cause), host)
        self.delta(host, uuid, PowerState.POWER_OFF, cause)

    def _restart_owed(self, cause: StopCause) -> str | None:
        """Which liveness bound a VM-level stop starts (None: the VM is not to be restarted)."""
        if cause is StopCause.GUEST_SHUTDOWN:
            return CRASH if self.sim.config.guest_shutdown_restart else None
        return None if cause is StopCause.DESTROYED else CRASH

    # ------------------------------------------------------------ BMC

    def _bmc_answers(self, host: SimHost) -> bool:
        return host.has_bmc and host.bmc_alive and self.world.manager_net_up

    def query_bmc(self, action: a.QueryBmc, epoch: int) -> None:
        host = self.world.hosts[action.host_id]
        if self._bmc_answers(host):
            fact = f.BmcPowerReported(action.request_id, host.id, "on" if host.powered else "off")
            self.sim.to_core(fact, BMC_QUERY_S)
        else:
            self.sim.to_core(f.BmcPowerReported(action.request_id, host.id, "unknown", "no answer"), BMC_DEAD_S)

    def fence(self, action: a.Fence, epoch: int) -> None:
        host = self.world.hosts[action.host_id]
        if not self._bmc_answers(host):
            self.sim.to_core(
                f.FenceCompleted(action.request_id, host.id, False, False, "BMC does not answer"), BMC_DEAD_S
            )
            return
        self.sim.schedule(self.sim.now + BMC_FENCE_S, self._fence_done, epoch, host, action.request_id)

    def _fence_done(self, epoch: int, host: SimHost, rid: str) -> None:
        if host.bmc_fail_next > 0:
            host.bmc_fail_next -= 1
            fact = f.FenceCompleted(RequestId(rid), host.id, False, False, "BMC error: power off not confirmed")
        else:
            already_off = not host.powered
            if host.powered:
                self.power_off(host, FENCED)
            fact = f.FenceCompleted(RequestId(rid), host.id, True, already_off, "")
        if epoch == self.sim.epoch:
            self.sim.to_core(fact, 0.0)

    # ------------------------------------------------------------ power

    def power_off(self, host: SimHost, how: str = HOST_LOST) -> None:
        if not host.powered:
            return
        self.sim.host_failed(host)
        self.vanished(host)
        cause = FENCE if how == FENCED else self.sim.liveness.host_cause(host)
        self.sim.liveness.host_lost(host, cause)
        if host.renews_leases():
            host.stop_renewing(self.sim.now, self.world.lease_expiry_s)
        self.migrations.host_lost(host)
        for uuid in sorted(host.running):
            self.sim.checker.stopped(uuid, host.id, how)
            self.sim.liveness.lost(uuid, cause, host)
        host.running.clear()
        host.powered = host.agent_running = host.stream_open = host.agent_frozen = False
        host.wd_expiring, host.wd_latched_at = False, None
        host.isolated_since = None
        host.update_heartbeat(self.sim.now)

    def power_on(self, host: SimHost) -> None:
        if host.powered:
            return
        host.powered, host.boot_no = True, host.boot_no + 1
        self.sim.liveness.host_powered_on(host)
        self.sim.schedule(self.sim.now + BOOT_S, self._booted, host)

    def _booted(self, host: SimHost) -> None:
        if not host.powered:
            return
        host.booted_at = self.sim.now
        host.agent_running = host.agent_enabled
        host.update_heartbeat(self.sim.now)
        self.schedule_connect(host, 0.1)
