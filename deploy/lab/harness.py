"""A lab with its manager: the real kvmha-manager outside the hosts, the agents inside them, BMCs registered.

Used by `make demo`, the end-to-end tests (tests/e2e) and bench/failover.py. The manager listens for agents on the
lab bridge's address (plaintext, allowed on the lab's own isolated network) and for the CLI on 127.0.0.1; its
database is SQLite in the lab's state dir unless a URL is given. Every process is started here and ended by PID.

What a VM does is read from the hosts themselves (`Lab.running_vms()` walks /proc for each host's QEMUs, and
`virsh domstate` asks that host's libvirtd), not from the manager: the manager is what is being tested.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvmha.lab import proc
from kvmha.lab.bmc import find_free_port
from kvmha.lab.lab import Lab
from kvmha.lab.state import DEFAULT_STATE_DIR, PidRef
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb
from kvmha.proto.v1 import admin_pb2_grpc

BIN = Path(sys.executable).parent
MANAGER_AGENT_PORT = 50051
DEFAULT_ADMIN_PORT = 50052


class HarnessError(RuntimeError):
    pass


@dataclass
class DuplicateWatch:
    """Samples every host's QEMU processes in the background and remembers any VM seen on two hosts at once."""

    lab: Lab
    interval_s: float = 0.1
    samples: int = 0
    duplicates: list[tuple[float, str, list[str]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> DuplicateWatch:
        self._thread = threading.Thread(target=self._run, name="duplicate-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            seen: dict[str, list[str]] = {}
            with contextlib.suppress(Exception):  # a host powering off mid-walk: its /proc entries vanish
                for host, vms in self.lab.running_vms().items():
                    for vm in vms:
                        seen.setdefault(vm, []).append(host)
            self.samples += 1
            for vm, hosts in seen.items():
                if len(hosts) > 1:
                    self.duplicates.append((time.time(), vm, sorted(hosts)))
            self._stop.wait(self.interval_s)


@dataclass
class LabCluster:
    lab: Lab
    workdir: Path
    admin_port: int
    database: str
    core_config: dict[str, str]
    manager: subprocess.Popen[bytes] | None = None
    _channel: grpc.Channel | None = None

    # ------------------------------------------------------------------ life cycle

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
    ) -> LabCluster:
        lab = Lab.up(hosts, state_dir=state_dir, prefix=prefix, subnet=subnet, manager="default",
                     agent_settings=agent_settings, cache_dir=cache_dir, as_keeper=as_keeper)
        workdir = Path(lab.spec.state_dir) / "manager"
        workdir.mkdir(exist_ok=True)
        cluster = cls(lab=lab, workdir=workdir, admin_port=admin_port or find_free_port(),
                      database=database or f"sqlite:///{workdir / 'manager.sqlite'}",
                      core_config=dict(core_config or {}))
        try:
            cluster.start_manager()
            cluster.wait_hosts_up()
            cluster.register_bmcs()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def start_manager(self) -> None:
        if self.manager is not None and self.manager.poll() is None:
            raise HarnessError("the manager is already running")
        config = self.workdir / "manager.toml"
        overrides = "\n".join(f'"{k}" = "{v}"' for k, v in self.core_config.items())
        config.write_text(
            "[manager]\nid = \"lab-manager\"\n"
            f"listen = \"{self.lab.spec.bridge_address}:{MANAGER_AGENT_PORT}\"\n"
            f"admin_listen = \"{self.admin_address}\"\nmetrics_listen = \"\"\n"
            f"database = \"{self.database}\"\nallow_insecure_plaintext = true\n"
            f"[config]\n{overrides}\n")
        with (self.workdir / "manager.log").open("ab") as log:
            self.manager = subprocess.Popen([str(BIN / "kvmha-manager"), "--config", str(config)], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        started = proc.info(self.manager.pid)
        if started is not None:  # `down` from any process ends it too, even if this one is gone by then
            self.lab.spec.companions["manager"] = PidRef(started.pid, started.start_ticks)
            self.lab.spec.save()
        wait_for(lambda: self.admin().ListHosts(apb.ListHostsRequest(), timeout=2) is not None, 30,
                 "the manager's admin port")

    def kill_manager(self) -> None:
        """SIGKILL the manager (a crash): its HA work stays in the database for the next start."""
        if self.manager is not None and self.manager.poll() is None:
            self.manager.kill()
            self.manager.wait(10)

    def stop_manager(self) -> None:
        if self.manager is not None and self.manager.poll() is None:
            self.manager.send_signal(signal.SIGTERM)
            try:
                self.manager.wait(15)
            except subprocess.TimeoutExpired:
                self.kill_manager()
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def stop(self) -> None:
        """Stop the manager and tear the lab down (namespaces, bridge, mounts, processes)."""
        try:
            self.stop_manager()
        finally:
            self.lab.down()

    def __enter__(self) -> LabCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ the manager's view

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.admin_address)
        return admin_pb2_grpc.AdminServiceStub(self._channel)

    def hosts(self) -> dict[str, apb.HostInfo]:
        return {h.name: h for h in self.admin().ListHosts(apb.ListHostsRequest(), timeout=5).hosts}

    def vms(self) -> dict[str, apb.VmInfo]:
        return {v.name: v for v in self.admin().ListVms(apb.ListVmsRequest(), timeout=5).vms}

    def events(self, after_id: int = 0) -> list[apb.EventInfo]:
        return list(self.admin().ListEvents(apb.ListEventsRequest(after_id=after_id, limit=10_000), timeout=5).events)

    def wait_hosts_up(self, names: list[str] | None = None, timeout_s: float = 60) -> None:
        wanted = names or [h.name for h in self.lab.hosts]
        wait_for(lambda: (hosts := self.hosts()) and all(n in hosts and hosts[n].status == "Up" for n in wanted),
                 timeout_s, f"hosts {wanted} Up in the manager")

    def register_bmcs(self) -> None:
        spec = self.lab.spec
        for host in spec.hosts:
            self.admin().SetHostBmc(apb.SetHostBmcRequest(host=host.name, address="127.0.0.1", port=host.bmc_port,
                                                          user=spec.bmc_user, password=spec.bmc_password),
                                    timeout=10)

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

    def story(self) -> str:
        events = self.events()
        start = events[0].at if events else 0.0
        return "\n".join(f"{e.at - start:7.2f} {e.severity:7} {e.subject:10} {e.kind:22} {e.message}"
                         for e in events)

    def manager_log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.workdir / "manager.log").read_text(errors="replace").splitlines()[-lines:])
        return ""


@contextlib.contextmanager
def lab_cluster(**kwargs: object) -> Iterator[LabCluster]:
    cluster = LabCluster.start(**kwargs)  # type: ignore[arg-type]
    try:
        yield cluster
    finally:
        cluster.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
