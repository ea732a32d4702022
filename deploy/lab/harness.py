"""The real kvmha-manager run as a child process, and the views of it that tests, benchmarks and the demo use.

- `ManagerHarness`: one manager process (its manager.toml written here, started, ended by PID) and the admin calls
  every harness needs (`hosts()`, `vms()`, `events()`, `story()`, `wait_hosts_up()`, `register_bmc()`).
- `LabCluster(ManagerHarness)`: that manager in front of a namespace lab (kvmha.lab.Lab). Used by `make demo`, the
  end-to-end tests (tests/e2e) and bench/failover.py. The manager listens for agents on the lab bridge's address
  and for the CLI on 127.0.0.1, both with mutual TLS (certificates from the lab's CA in <state dir>/pki; the CLI's
  settings in <state dir>/cli.env, read with KVMHA_ENV_FILE); its database is SQLite in the lab's state dir unless
  a URL is given. With `managers=N` (issue 15) it runs N managers instead, m1..mN, each in its lab slot's network
  namespace (agents and admin calls reach it at the slot's address) on the lab's own PostgreSQL; admin calls go to
  the lease holder (`follow_holder()`).
- `kvmha.lab.local.LocalCluster(ManagerHarness)`: the same manager with agents as plain processes on 127.0.0.1
  (libvirt's test driver, simulated BMCs), for the integration tests and bench/manager_load.py.
- `DuplicateWatch`: samples every lab host's QEMUs and remembers any VM seen on two hosts at once.

Every process is started here and ended by PID (SIGTERM, then SIGKILL), also when a start fails half-way. What a VM
does is read from the hosts themselves (`Lab.running_vms()` walks /proc for each host's QEMUs, and `virsh domstate`
asks that host's libvirtd), not from the manager: the manager is what is being tested.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import grpc

from kvmha.lab import proc
from kvmha.lab.bmc import find_free_port
from kvmha.lab.dashboard import LabDashboard
from kvmha.lab.lab import Lab
from kvmha.lab.pki import ENV_FILE, LabPki
from kvmha.lab.state import DEFAULT_STATE_DIR, ManagerSlot, PidRef
from kvmha.lab.wait import wait_for
from kvmha.manager.security.roles import Role
from kvmha.proto.v1 import admin_pb2 as apb
from kvmha.proto.v1 import admin_pb2_grpc

BIN = Path(sys.executable).parent  # the venv's console scripts: kvmha-manager, kvmha-agent, kvmha
MANAGER_AGENT_PORT = 50051
DEFAULT_ADMIN_PORT = 50052
ADMIN_READY_TIMEOUT_S = 30.0


class HarnessError(RuntimeError):
    pass


@dataclass
class ChildProcess:
    """A process this harness started, its output appended to `log_path`; stopped by PID, never by name."""

    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> Self:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env={**os.environ, **(env or {})})
        return self

    @property
    def pid(self) -> int:
        if self.process is None:
            raise HarnessError(f"{self.name} was never started")
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies as a host would, without saying goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`; its exit code (None: never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.wait(timeout_s)

    def log(self) -> str:
        """Everything it wrote so far ("" before it wrote anything)."""
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class ManagerHarness:
    """A kvmha-manager child process and the admin API calls made of it.

    `database` is a SQLAlchemy URL, `core_config` the manager's [config] overrides (name -> value, as in
    `kvmha config set`). The admin channel is opened on first use and closed by `stop_manager()`.
    """

    def __init__(self, workdir: Path, database: str, core_config: Mapping[str, str] | None = None, *,
                 manager_id: str, agent_listen: str, admin_port: int | None = None, metrics_listen: str = "",
                 allow_insecure_plaintext: bool = False, pki_dir: Path | None = None, netns: str = "",
                 admin_host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.netns = netns  # "" = the caller's network namespace; else the manager runs in this one
        self.admin_host = admin_host
        self.database = database
        self.core_config = dict(core_config or {})
        self.manager_id = manager_id
        self.agent_listen = agent_listen
        self.admin_port = admin_port or find_free_port()
        self.metrics_listen = metrics_listen
        self.allow_insecure_plaintext = allow_insecure_plaintext
        # Mutual TLS unless plaintext is explicitly asked for: the manager's certificate covers the agents'
        # address; the harness's own admin calls use a lab admin certificate (kvmha.lab.pki).
        self.pki = LabPki(pki_dir or workdir / "pki")
        self.tls = None if allow_insecure_plaintext else self.pki.manager([split_host(agent_listen)])
        self.manager: ChildProcess | None = None
        self._channel: grpc.Channel | None = None
        self.dashboard_toml = ""  # a [dashboard] table (kvmha.lab.dashboard.LabDashboard.toml()) turns it on
        self.secrets_key = workdir / "secrets.key"  # managers sharing one database share this key (BMC passwords)

    @property
    def admin_address(self) -> str:
        return f"{self.admin_host}:{self.admin_port}"

    @property
    def manager_alive(self) -> bool:
        return self.manager is not None and self.manager.alive

    # ------------------------------------------------------------------ the manager process

    def manager_toml(self) -> str:
        overrides = "\n".join(f'"{key}" = "{value}"' for key, value in self.core_config.items())
        plaintext = "allow_insecure_plaintext = true\n" if self.allow_insecure_plaintext else ""
        tls = self.tls.manager_toml() if self.tls is not None else ""
        # Hosts register on their first Hello: with mutual TLS only hosts holding a certificate of the lab's CA.
        return (f'[manager]\nid = "{self.manager_id}"\nlisten = "{self.agent_listen}"\n'
                f'admin_listen = "{self.admin_address}"\nmetrics_listen = "{self.metrics_listen}"\n'
                f'database = "{self.database}"\nauto_register_hosts = true\n'
                f'secrets_key = "{self.secrets_key}"\n{plaintext}{tls}{self.dashboard_toml}'
                f'[domain_xml]\nallow = {list(LAB_DOMAIN_XML_ALLOW)!r}\n[config]\n{overrides}\n')

    def start_manager(self) -> ChildProcess:
        """Write manager.toml, start the manager and wait until its admin port answers."""
        if self.manager_alive:
            raise HarnessError("the manager is already running")
        config = self.workdir / "manager.toml"
        config.write_text(self.manager_toml())
        argv = [str(BIN / "kvmha-manager"), "--config", str(config)]
        if self.netns:  # `ip netns exec` execs the manager itself: the PID is the manager's
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self.manager = ChildProcess(self.manager_id, argv, self.workdir / "manager.log").start()
        self._manager_started(self.manager)
        wait_for(lambda: self.admin().ListHosts(apb.ListHostsRequest(), timeout=2) is not None,
                 ADMIN_READY_TIMEOUT_S, "the manager's admin port")
        return self.manager

    def _manager_started(self, manager: ChildProcess) -> None:
        """Called right after the manager process started, before it answers (LabCluster records it in the lab)."""

    def kill_manager(self) -> None:
        """SIGKILL the manager (a crash): its HA work stays in the database for the next start."""
        if self.manager is not None:
            self.manager.kill()

    def stop_manager(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the manager (SIGKILL after `timeout_s`) and close the admin channel."""
        if self.manager is not None:
            self.manager.stop(timeout_s)
        self.close_admin()

    def manager_log_tail(self, lines: int = 40) -> str:
        return ChildProcess("manager", [], self.workdir / "manager.log").tail(lines)

    # ------------------------------------------------------------------ the manager's view

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        if self._channel is None:
            self._channel = (grpc.insecure_channel(self.admin_address) if self.tls is None else
                             grpc.secure_channel(self.admin_address, self.pki.operator().channel_credentials()))
        return admin_pb2_grpc.AdminServiceStub(self._channel)

    def cli_env(self, role: Role = Role.ADMIN) -> dict[str, str]:
        """The environment of a `kvmha` CLI process talking to this manager as `role`."""
        tls = {} if self.tls is None else self.pki.operator(role).cli_env()
        return {"KVMHA_MANAGER": self.admin_address, **tls}

    def close_admin(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def hosts(self) -> dict[str, apb.HostInfo]:
        return {h.name: h for h in self.admin().ListHosts(apb.ListHostsRequest(), timeout=5).hosts}

    def vms(self) -> dict[str, apb.VmInfo]:
        return {v.name: v for v in self.admin().ListVms(apb.ListVmsRequest(), timeout=5).vms}

    def events(self, after_id: int = 0) -> list[apb.EventInfo]:
        return list(self.admin().ListEvents(apb.ListEventsRequest(after_id=after_id, limit=10_000), timeout=5).events)

    def host_names(self) -> list[str]:
        """The hosts this harness runs (what `wait_hosts_up()` waits for by default)."""
        return []

    def wait_hosts_up(self, names: list[str] | None = None, timeout_s: float = 60) -> None:
        wanted = names or self.host_names()
        wait_for(lambda: (hosts := self.hosts()) and all(n in hosts and hosts[n].status == "Up" for n in wanted),
                 timeout_s, f"hosts {wanted} Up in the manager")

    def register_bmc(self, host: str, port: int, user: str, password: str, address: str = "127.0.0.1") -> None:
        request = apb.SetHostBmcRequest(host=host, address=address, port=port, user=user, password=password)
        self.admin().SetHostBmc(request, timeout=10)

    def story(self) -> str:
        """The manager's events (seconds from the first) and every VM's state, for failure messages."""
        try:
            events = self.events()
            vms = list(self.vms().values())
        except grpc.RpcError as error:
            return f"(events unavailable: {error})"
        start = events[0].at if events else 0.0
        lines = [f"{e.at - start:7.2f} {e.severity:7} {e.subject:10} {e.kind:22} {e.message}" for e in events]
        lines += [f"vm {v.name}: {v.state} {v.power_state} on {v.host or '-'} (last {v.last_host or '-'})"
                  for v in vms]
        return "\n".join(lines)


def split_host(address: str) -> str:
    return address.rpartition(":")[0].strip("[]")


# Exactly what the lab's VMs need (kvmha.lab.domain: share-rw on a shared raw disk); nothing else of domainpolicy.
LAB_DOMAIN_XML_ALLOW = ("qemu:override",)


CONFIRM_AFTER_S = 0.2  # DuplicateWatch.confirm looks again this much later


@dataclass
class DuplicateWatch:
    """Samples every host's QEMU processes in the background and remembers any VM *running* on two hosts at once.

    A live migration has two QEMUs for a while, which libvirt allows: the incoming copy on the target is paused
    (PAUSED / migration) while the source runs, and at switchover the source pauses before the target resumes. So a
    VM whose QEMU shows on several hosts in one /proc pass is judged by libvirt's state on each of those hosts, read
    at the same moment (one thread per host, released together), not one after the other: it is a duplicate only if
    two or more say `running` — and still do 0.2 s later with their QEMUs still there (`confirm`), since two
    concurrent reads can still straddle the switchover and a host being powered off still shows its QEMU while its
    libvirtd no longer answers. A host whose libvirtd does not answer counts as running (nothing proves its copy
    paused). Such allowed overlaps are counted in `overlaps`."""

    lab: Lab
    interval_s: float = 0.1
    samples: int = 0
    duplicates: list[tuple[float, str, list[str]]] = field(default_factory=list)
    overlaps: int = 0  # samples in which a VM had QEMUs on several hosts but at most one ran (a migration)
    qemus: dict[str, dict[str, int]] = field(default_factory=dict)  # the last sample: host -> {VM: QEMU PID}
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="duplicate-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            at = time.time()
            by_vm: dict[str, list[str]] = {}
            self.qemus = {}
            with contextlib.suppress(Exception):  # a host powering off mid-walk: its /proc entries vanish
                self.qemus = self.lab.running_vms()
                for host, vms in self.qemus.items():
                    for vm in vms:
                        by_vm.setdefault(vm, []).append(host)
            running_by_vm = dict(by_vm)
            for vm, hosts in by_vm.items():
                if len(hosts) > 1:
                    running = self.running_on(vm, hosts)
                    if len(running) > 1:
                        running = self.confirm(vm, running)
                    if len(running) <= 1:
                        self.overlaps += 1
                    running_by_vm[vm] = running
            self.record(at, by_vm, running_by_vm)
            self._stop.wait(self.interval_s)

    def confirm(self, vm: str, hosts: list[str]) -> list[str]:
        """Two hosts seemed to run the VM: look again, a moment later, at the QEMUs and at libvirt. Two reads can
        straddle the switchover (the source read just before it paused, the target just after it resumed), and a
        host being powered off still shows its QEMU while its libvirtd no longer answers."""
        self._stop.wait(CONFIRM_AFTER_S)
        try:
            qemus = self.lab.running_vms()
        except Exception:  # a host powering off mid-walk: judge on what the first look saw
            qemus = {host: {vm: 0} for host in hosts}
        still = [host for host in hosts if vm in qemus.get(host, {})]
        return self.running_on(vm, still) if len(still) > 1 else still

    def running_on(self, vm: str, hosts: list[str]) -> list[str]:
        """The hosts among `hosts` whose libvirt says the VM is running, all read at the same moment."""
        states: dict[str, str] = {}
        start = threading.Barrier(len(hosts))

        def read(host: str) -> None:
            with contextlib.suppress(threading.BrokenBarrierError):
                start.wait(5.0)
            try:
                done = self.lab.exec(host, ["virsh", "-q", "-c", "qemu:///system", "domstate", vm], check=False)
            except Exception:  # a host powering off mid-read: nothing proves its copy paused
                states[host] = "unknown"
                return
            if done.returncode == 0:
                states[host] = done.stdout.strip() or "unknown"
            elif "failed to get domain" in done.stderr or "Domain not found" in done.stderr:
                # libvirt has no such domain there: the QEMU of a migration's source, undefined at its end and
                # being torn down (libvirt tracks every QEMU it runs, also across its own restarts).
                states[host] = "gone"
            else:
                states[host] = "unknown"  # libvirtd does not answer: nothing proves the copy paused

        readers = [threading.Thread(target=read, args=(host,), daemon=True) for host in hosts]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(10.0)
        return sorted(host for host in hosts if states.get(host, "unknown") not in ("paused", "shut off", "gone"))

    def record(self, at: float, by_vm: Mapping[str, list[str]],
               running: Mapping[str, list[str]] | None = None) -> None:
        """One sample taken at `at` (epoch seconds): VM -> the hosts whose /proc ran a QEMU for it, and (when some
        VM had several) VM -> the hosts where libvirt says it runs, which decides duplicates."""
        self.samples += 1
        for vm, hosts in (running if running is not None else by_vm).items():
            if len(hosts) > 1:
                self.duplicates.append((at, vm, sorted(hosts)))


class LabCluster(ManagerHarness):
    """A namespace lab with the real manager in front of it, its hosts' BMCs registered with the manager."""

    def __init__(self, lab: Lab, workdir: Path, database: str, core_config: Mapping[str, str] | None = None, *,
                 admin_port: int | None = None) -> None:
        pki_dir = Path(lab.spec.state_dir) / "pki"
        slots = lab.spec.managers
        if slots:  # several managers: this object is m1, in its slot's namespace; the others are `peers`
            first = slots[0]
            super().__init__(workdir / first.name, database, core_config, manager_id=first.name,
                             agent_listen=f"{first.address}:{MANAGER_AGENT_PORT}", admin_port=DEFAULT_ADMIN_PORT,
                             pki_dir=pki_dir, netns=first.netns, admin_host=first.address)
            self.secrets_key = workdir / "secrets.key"
        else:
            super().__init__(workdir, database, core_config, manager_id="lab-manager",
                             agent_listen=f"{lab.spec.bridge_address}:{MANAGER_AGENT_PORT}", admin_port=admin_port,
                             pki_dir=pki_dir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.lab = lab
        self.dashboard: LabDashboard | None = None
        self.peers: list[LabManager] = [LabManager(lab, slot, workdir, database, self.core_config, self.secrets_key)
                                        for slot in slots[1:]]
        self.acting: ManagerHarness = self  # where admin calls go (the lease holder, see follow_holder)

    @classmethod
    def start(
        cls,
        hosts: int = 3,
        *,
        state_dir: Path = DEFAULT_STATE_DIR,
        prefix: str = "kvmha",
        subnet: str = "10.251.0.0/24",
        database: str | None = None,
        core_config: Mapping[str, str] | None = None,
        agent_settings: Mapping[str, object] | None = None,
        admin_port: int | None = None,
        cache_dir: Path | None = None,
        as_keeper: bool = False,
        watchdog_device_timeout_s: int = 0,  # > 0: a hardware watchdog per host (kvmha.lab.watchdog)
        dashboard_port: int | None = 0,  # the lab's manager serves its dashboard: 0 = on a free port, None = off
        managers: int = 0,
        bmc_subnet: str | None = None,
    ) -> LabCluster:
        """Bring up a lab of `hosts` hosts and the manager, wait until every host is Up, register the BMCs.

        managers > 0: that many managers (m1..mN), each in its own network namespace, on the lab's own PostgreSQL
        (`database` must then be None); m1 starts first and takes the lease, the others are standbys."""
        if managers and database:
            raise HarnessError("several lab managers share the lab's own PostgreSQL: no database URL with them")
        lab = Lab.up(hosts, state_dir=state_dir, prefix=prefix, subnet=subnet, manager="default",
                     agent_settings=agent_settings, cache_dir=cache_dir, as_keeper=as_keeper,
                     watchdog_device_timeout_s=watchdog_device_timeout_s, managers=managers, bmc_subnet=bmc_subnet)
        workdir = Path(lab.spec.state_dir) / "manager"
        workdir.mkdir(exist_ok=True)
        cluster = cls(lab, workdir, lab.spec.database_url or database or f"sqlite:///{workdir / 'manager.sqlite'}",
                      core_config, admin_port=admin_port)
        if dashboard_port is not None and not managers:
            cluster.dashboard = LabDashboard.make(workdir / "dashboard", dashboard_port or find_free_port())
            cluster.dashboard_toml = cluster.dashboard.toml()
        try:
            cluster.start_manager()
            for peer in cluster.peers:
                peer.start_manager()
            if managers:
                cluster.follow_holder()
            cluster.wait_hosts_up()
            cluster.register_bmcs()
            # Every manager, for the CLI to find the holder among them (KVMHA_MANAGER=a,b,c); written last, so
            # that `kvmha-lab up --managers N` returns once it exists (everything before is done).
            cluster.pki.write_cli_env(Path(lab.spec.state_dir) / ENV_FILE,
                                      ",".join(m.admin_address for m in cluster.all_managers))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _manager_started(self, manager: ChildProcess) -> None:
        record_companion(self.lab, "manager" if not self.peers and not self.lab.spec.managers
                         else f"manager-{self.manager_id}", manager)

    def stop(self) -> None:
        """Stop the managers and tear the lab down (namespaces, bridge, mounts, processes, the lab's database)."""
        try:
            for peer in self.peers:
                peer.stop_manager()
            self.stop_manager()
        finally:
            self.lab.down()

    # ------------------------------------------------------------------ several managers (issue 15)

    @property
    def all_managers(self) -> list[ManagerHarness]:
        """m1 (this object) and its peers, in slot order; [self] for a lab with one manager."""
        return [self, *self.peers]

    def manager_named(self, name: str) -> ManagerHarness:
        for manager in self.all_managers:
            if manager.manager_id == name:
                return manager
        raise KeyError(f"no manager {name!r} (managers: {[m.manager_id for m in self.all_managers]})")

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        """The acting manager's admin API (the lease holder once `follow_holder()` found it; m1 before)."""
        if self.acting is not self:
            return self.acting.admin()
        return super().admin()

    def reachable_managers(self) -> list[ManagerHarness]:
        """Managers whose process runs (not stopped by SIGSTOP) and whose namespace is not cut off."""
        found = []
        for manager in self.all_managers:
            if not manager.manager_alive or proc.stopped(manager.manager.pid if manager.manager else 0):
                continue
            if self.lab.spec.managers and self.lab.manager_cut(manager.manager_id):
                continue
            found.append(manager)
        return found

    def lease_view(self) -> apb.ListManagersResponse | None:
        """`kvmha manager list` as the first reachable manager answers it (any manager answers reads)."""
        for manager in self.reachable_managers():
            with contextlib.suppress(grpc.RpcError):
                reply: apb.ListManagersResponse = manager.admin().ListManagers(apb.ListManagersRequest(), timeout=3)
                return reply
        return None

    def follow_holder(self, timeout_s: float = 60.0, *, not_: str = "") -> ManagerHarness:
        """Wait until a reachable manager (other than `not_`) holds the lease and answers, then send admin calls
        there; returns it."""
        def holder() -> ManagerHarness | None:
            view = self.lease_view()
            if view is None or not view.lease_holder or view.lease_holder == not_:
                return None
            found = next((m for m in self.reachable_managers() if m.manager_id == view.lease_holder), None)
            return found

        self.acting = wait_for(holder, timeout_s, "a reachable lease holder" + (f" other than {not_}" if not_ else ""),
                               interval_s=0.25)
        return self.acting

    def manager_logs(self, lines: int = 15) -> str:
        """Every manager's log tail, and each agent's last link events (which manager it talks to), for failures."""
        parts = [f"--- {m.manager_id} log tail\n{m.manager_log_tail(lines)}" for m in self.all_managers]
        for host in self.lab.hosts:
            agent_log = ChildProcess(host.name, [], Path(host.dir) / "log" / "kvmha-agent.log").log().splitlines()
            link = [line for line in agent_log if "event=manager_" in line or "event=reconnect" in line
                    or "event=link" in line]
            parts.append(f"--- {host.name} agent link events\n" + "\n".join(link[-lines:]))
        return "\n".join(parts)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def host_names(self) -> list[str]:
        return [h.name for h in self.lab.hosts]

    def register_bmcs(self) -> None:
        for host in self.lab.hosts:
            address, port, user, password = self.lab.bmc_credentials(host.name)  # on the lab's BMC network
            self.register_bmc(host.name, port, user, password, address)

    # ------------------------------------------------------------------ VMs

    def create_vm(self, name: str, *, ha: bool = True, priority: int = 0, group: str = "", memory_mib: int = 32,
                  start: bool = True) -> apb.VmInfo:
        xml = self.lab.vm_prepare(name, memory_mib=memory_mib)
        return self.admin().CreateVm(apb.CreateVmRequest(domain_xml=xml, ha_enabled=ha, restart_priority=priority,
                                                         anti_affinity_group=group, start=start), timeout=30)

    def where(self) -> dict[str, list[str]]:
        """VM name -> hosts whose PID namespace runs a QEMU for it (the hosts' truth, from /proc)."""
        found: dict[str, list[str]] = {}
        for host, vms in self.lab.running_vms().items():
            for vm in vms:
                found.setdefault(vm, []).append(host)
        return found

    def running_on(self, vm: str, host: str) -> bool:
        """Asked of that host's libvirtd: is the domain running there?"""
        state, _reason = self.lab.domstate(host, vm)
        return state == "running"

    def wait_running(self, names: list[str], timeout_s: float = 60, *, not_on: str | None = None) -> dict[str, str]:
        """Wait until each VM runs on exactly one host (other than `not_on`), confirmed by that host's virsh."""
        def check() -> dict[str, str] | None:
            where = self.where()
            placed: dict[str, str] = {}
            for name in names:
                hosts = where.get(name, [])
                if len(hosts) != 1 or hosts[0] == not_on or not self.running_on(name, hosts[0]):
                    return None
                placed[name] = hosts[0]
            return placed

        return wait_for(check, timeout_s, f"VMs {names} running" + (f" elsewhere than {not_on}" if not_on else ""),
                        interval_s=0.25)


def record_companion(lab: Lab, key: str, manager: ChildProcess) -> None:
    """Record a manager process in the lab's state: `down` from any process ends it too (by PID), even if the
    process that started it is gone by then."""
    started = proc.info(manager.pid)
    if started is not None:
        lab.spec.companions[key] = PidRef(started.pid, started.start_ticks)
        lab.spec.save()


class LabManager(ManagerHarness):
    """Another manager of a lab with several (m2, m3...): in its slot's namespace, on the same database, PKI and
    secrets key as m1."""

    def __init__(self, lab: Lab, slot: ManagerSlot, workdir: Path, database: str, core_config: Mapping[str, str],
                 secrets_key: Path) -> None:
        super().__init__(workdir / slot.name, database, core_config, manager_id=slot.name,
                         agent_listen=f"{slot.address}:{MANAGER_AGENT_PORT}", admin_port=DEFAULT_ADMIN_PORT,
                         pki_dir=Path(lab.spec.state_dir) / "pki", netns=slot.netns, admin_host=slot.address)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secrets_key = secrets_key
        self.lab = lab

    def _manager_started(self, manager: ChildProcess) -> None:
        record_companion(self.lab, f"manager-{self.manager_id}", manager)
