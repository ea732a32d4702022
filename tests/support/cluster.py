"""A manager and agents as real processes on 127.0.0.1, for integration tests and benchmarks.

Every process is started by this module and ended by PID (SIGTERM, then SIGKILL) in `Cluster.close()`, which the
fixtures call also when a test fails. Logs go to files in the test's folder and are printed when a wait fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid as uuid_module
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvmha.lab.bmc import BmcConfig, BmcSimulator, find_free_port
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb
from kvmha.proto.v1 import admin_pb2_grpc

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})}
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process dies as a host would, without Goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass
class Cluster:
    workdir: Path
    database_url: str
    core_config: dict[str, str] = field(default_factory=dict)
    agent_port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    manager: Proc | None = None
    agents: dict[str, Proc] = field(default_factory=dict)
    bmcs: dict[str, BmcSimulator] = field(default_factory=dict)
    host_uuids: dict[str, str] = field(default_factory=dict)
    _channel: grpc.Channel | None = None

    @property
    def storage(self) -> Path:
        path = self.workdir / "shared"
        path.mkdir(exist_ok=True)
        return path

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin_port}"

    def start_manager(self) -> Proc:
        config = self.workdir / "manager.toml"
        overrides = "\n".join(f'"{k}" = "{v}"' for k, v in self.core_config.items())
        config.write_text(
            '[manager]\nid = "m1"\n'
            f'listen = "127.0.0.1:{self.agent_port}"\nadmin_listen = "{self.admin_address}"\n'
            f'metrics_listen = "127.0.0.1:{self.metrics_port}"\ndatabase = "{self.database_url}"\n'
            f"[config]\n{overrides}\n"
        )
        self.manager = Proc(
            "manager", [str(BIN / "kvmha-manager"), "--config", str(config)], self.workdir / "manager.log"
        )
        self.manager.start()
        wait_for(
            lambda: self.admin().ListHosts(apb.ListHostsRequest(), timeout=2) is not None,
            30,
            "the manager's admin port",
        )
        return self.manager

    def node_uri(self, name: str, cpus: int = 8, memory_mib: int = 4096) -> str:
        """A libvirt test-driver URI for a host of this size with no domains (test:///default has one, "test",
        with the same uuid in every process: it would look like one VM running on every host)."""
        node = self.workdir / f"node-{name}.xml"
        node.write_text(
            f"<node><cpu><mhz>2000</mhz><model>i686</model><active>{cpus}</active><nodes>1</nodes>"
            f"<sockets>1</sockets><cores>{cpus}</cores><threads>1</threads></cpu>"
            f"<memory>{memory_mib * 1024}</memory></node>"
        )
        return f"test://{node}"

    def start_agent(self, name: str, libvirt_uri: str | None = None, extra: str = "") -> Proc:
        host_uuid = self.host_uuids.setdefault(name, str(uuid_module.uuid4()))
        libvirt_uri = libvirt_uri or self.node_uri(name)
        config = self.workdir / f"agent-{name}.toml"
        config.write_text(
            "[agent]\n"
            f'host_uuid = "{host_uuid}"\nhostname = "{name}"\nmanagement_address = "127.0.0.1"\n'
            f'managers = ["127.0.0.1:{self.agent_port}"]\nlibvirt_uri = "{libvirt_uri}"\n'
            f'storage_paths = ["{self.storage}"]\nheartbeat_interval_s = 1.0\nresync_interval_s = 10.0\n'
            'neighbor_port = 9\nlog_format = "kv"\n' + extra
        )
        agent = Proc(name, [str(BIN / "kvmha-agent"), "--config", str(config)], self.workdir / f"agent-{name}.log")
        agent.start()
        self.agents[name] = agent
        return agent

    def start_powered_agent(self, name: str, libvirt_uri: str | None = None) -> BmcSimulator:
        """An agent whose power is an IPMI BMC simulator: the agent process is the host (power off ends it, the
        BMC reads "off" while it is not running). The manager is told the BMC's address, so it can fence."""
        self.start_agent(name, libvirt_uri)
        self.agents.pop(name).stop()  # only to write the config: the BMC runs the real one
        config, log = self.workdir / f"agent-{name}.toml", self.workdir / f"agent-{name}.log"
        startcmd = f"sh -c 'exec {BIN / 'kvmha-agent'} --config {config} >> {log} 2>&1'"
        bmc = BmcSimulator(
            BmcConfig(name=name, port=find_free_port(), workdir=self.workdir / f"bmc-{name}", startcmd=startcmd)
        )
        bmc.config.workdir.mkdir(exist_ok=True)
        self.bmcs[name] = bmc
        bmc.start()
        return bmc

    def register_bmcs(self) -> None:
        for name, bmc in self.bmcs.items():
            self.admin().SetHostBmc(
                apb.SetHostBmcRequest(
                    host=name,
                    address="127.0.0.1",
                    port=bmc.config.port,
                    user=bmc.config.user,
                    password=bmc.config.password,
                ),
                timeout=10,
            )

    def kill_host(self, name: str) -> None:
        """SIGKILL the host's agent (with its in-process libvirt and VMs): no Goodbye, the BMC now reads off."""
        if name in self.bmcs:
            pid = self.bmcs[name].host_pid
            if pid is None:
                raise RuntimeError(f"host {name} is not powered on")
            os.kill(pid, signal.SIGKILL)
        else:
            self.agents[name].kill()

    def admin(self) -> admin_pb2_grpc.AdminServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.admin_address)
        return admin_pb2_grpc.AdminServiceStub(self._channel)

    def hosts(self) -> dict[str, apb.HostInfo]:
        return {h.name: h for h in self.admin().ListHosts(apb.ListHostsRequest(), timeout=5).hosts}

    def vms(self) -> dict[str, apb.VmInfo]:
        return {v.name: v for v in self.admin().ListVms(apb.ListVmsRequest(), timeout=5).vms}

    def events(self) -> list[apb.EventInfo]:
        return list(self.admin().ListEvents(apb.ListEventsRequest(limit=10_000), timeout=5).events)

    def story(self) -> str:
        """The manager's events, one line each, for failure messages."""
        try:
            events = self.events()
        except grpc.RpcError as error:
            return f"(events unavailable: {error})"
        start = events[0].at if events else 0.0
        lines = [f"{e.at - start:7.2f} {e.severity:7} {e.subject:10} {e.kind:20} {e.message}" for e in events]
        lines += [f"vm {v.name}: {v.state} {v.power_state} on {v.host or '-'} (last {v.last_host or '-'})"
                  for v in self.vms().values()]
        return "\n".join(lines)

    def logs(self) -> str:
        procs = [p for p in [self.manager, *self.agents.values()] if p is not None]
        procs += [Proc(name, [], self.workdir / f"agent-{name}.log") for name in self.bmcs]
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        for proc in [*self.agents.values(), self.manager]:
            if proc is not None:
                proc.stop()
        for bmc in self.bmcs.values():
            bmc.stop()
