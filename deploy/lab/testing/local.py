"""A manager and agents as plain processes on 127.0.0.1, for the integration tests, the agent tests and the benches.

- `LocalCluster`: the real kvmha-manager (kvmha.lab.harness.ManagerHarness) with agents that use libvirt's test
  driver, each optionally powered by an IPMI BMC simulator so that the manager can fence it.
- `AgentProcess`: one real kvmha-agent process with a generated config, for tests that talk to it through a fake
  manager (kvmha.lab.testing.fake_manager).

Every process is started here and ended by PID (SIGTERM, then SIGKILL) in `LocalCluster.close()` /
`AgentProcess.stop()`, which the fixtures call also when a test fails. Logs go to files in the work folder.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

from kvmha.lab.agent_config import agent_toml
from kvmha.lab.bmc import BmcConfig, BmcSimulator, find_free_port
from kvmha.lab.harness import BIN, ChildProcess, HarnessError, ManagerHarness

AGENT_BIN = Path(sys.executable).with_name("kvmha-agent")


class AgentProcess(ChildProcess):
    """A kvmha-agent with its config in `workdir` (fast reconnects, no isolation unless asked); not started yet."""

    def __init__(self, workdir: Path, managers: Sequence[str], libvirt_uri: str = "test:///default",
                 storage_paths: Sequence[str] = (), host_uuid: str | None = None, isolation: str = "none",
                 isolation_after_s: float = 30.0, heartbeat_interval_s: float = 0.5) -> None:
        self.workdir = workdir
        self.host_uuid = host_uuid or str(uuid.uuid4())
        for path in storage_paths:
            if not os.path.exists(path):  # a file there is a test's broken storage: left as it is
                os.makedirs(path)  # the "mounted share"; the agent itself never creates it
        short = self.host_uuid[:8]
        self.config_path = workdir / f"agent-{short}.toml"
        super().__init__(f"agent-{short}", [str(AGENT_BIN), "--config", str(self.config_path)],
                         workdir / f"agent-{short}.log")
        self.config_path.write_text(agent_toml({
            "host_uuid": self.host_uuid, "hostname": f"test-{short}", "management_address": "127.0.0.1",
            "managers": list(managers), "libvirt_uri": libvirt_uri, "storage_paths": list(storage_paths),
            "heartbeat_interval_s": heartbeat_interval_s, "resync_interval_s": 30.0, "reconnect_max_s": 2.0,
        }, {"tls.allow_insecure_plaintext": True},  # its manager is a plaintext fake (kvmha.lab.testing)
            isolation={"policy": isolation, "after_s": isolation_after_s}))

    def start(self, env: Mapping[str, str] | None = None) -> Self:
        return super().start({"PYTHONUNBUFFERED": "1", **(env or {})})


class LocalCluster(ManagerHarness):
    """The manager on free 127.0.0.1 ports (agents, admin, metrics) with the given database URL; agents added by
    `start_agent` / `start_powered_agent`, named like hosts ("h1")."""

    def __init__(self, workdir: Path, database: str, core_config: Mapping[str, str] | None = None, *,
                 allow_insecure_plaintext: bool = False) -> None:
        self.agent_port = find_free_port()
        self.metrics_port = find_free_port()
        super().__init__(workdir, database, core_config, manager_id="m1",
                         agent_listen=f"127.0.0.1:{self.agent_port}", metrics_listen=f"127.0.0.1:{self.metrics_port}",
                         allow_insecure_plaintext=allow_insecure_plaintext)
        self.agents: dict[str, ChildProcess] = {}
        self.bmcs: dict[str, BmcSimulator] = {}
        self.host_uuids: dict[str, str] = {}
        # More managers on the same database (several managers, one lease): `add_manager`; the agents know them all.
        self.more_managers: list[ManagerHarness] = []
        self.agent_settings: dict[str, object] = {}  # [agent] keys every agent config gets (before `settings`)

    def add_manager(self, manager_id: str) -> ManagerHarness:
        """Another manager process on this cluster's database, in its own folder, with the same PKI and secrets key
        (not started yet); agents configured after this call list it after the first manager."""
        workdir = self.workdir / manager_id
        workdir.mkdir(exist_ok=True)
        other = ManagerHarness(workdir, self.database, self.core_config, manager_id=manager_id,
                               agent_listen=f"127.0.0.1:{find_free_port()}",
                               allow_insecure_plaintext=self.allow_insecure_plaintext, pki_dir=self.workdir / "pki")
        other.secrets_key = self.secrets_key
        self.more_managers.append(other)
        return other

    @property
    def storage(self) -> Path:
        path = self.workdir / "shared"
        path.mkdir(exist_ok=True)
        return path

    def host_names(self) -> list[str]:
        return sorted({*self.agents, *self.bmcs})

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

    def write_agent_config(self, name: str, libvirt_uri: str | None = None,
                           settings: Mapping[str, object] | None = None) -> Path:
        """The agent config of host `name` (settings override [agent] keys); its uuid is kept across restarts."""
        config = self.workdir / f"agent-{name}.toml"
        host_uuid = self.host_uuids.setdefault(name, str(uuid.uuid4()))
        tls = (self.pki.host(name, host_uuid, "127.0.0.1").agent_overrides() if self.tls is not None
               else {"tls.allow_insecure_plaintext": True})
        config.write_text(agent_toml({
            "host_uuid": host_uuid, "hostname": name,
            "management_address": "127.0.0.1",
            "managers": [f"127.0.0.1:{self.agent_port}", *(m.agent_listen for m in self.more_managers)],
            "libvirt_uri": libvirt_uri or self.node_uri(name), "storage_paths": [str(self.storage)],
            "heartbeat_interval_s": 1.0, "resync_interval_s": 10.0, "neighbor_port": 9, "log_format": "kv",
            **self.agent_settings,
        }, {**tls, **(settings or {})}))
        return config

    def start_agent(self, name: str, libvirt_uri: str | None = None,
                    settings: Mapping[str, object] | None = None) -> ChildProcess:
        config = self.write_agent_config(name, libvirt_uri, settings)
        agent = ChildProcess(name, [str(BIN / "kvmha-agent"), "--config", str(config)],
                             self.workdir / f"agent-{name}.log").start()
        self.agents[name] = agent
        return agent

    def start_powered_agent(self, name: str, libvirt_uri: str | None = None) -> BmcSimulator:
        """An agent whose power is an IPMI BMC simulator: the agent process is the host (power off ends it, the
        BMC reads "off" while it is not running). `register_bmcs()` tells the manager, so that it can fence."""
        config, log = self.write_agent_config(name, libvirt_uri), self.workdir / f"agent-{name}.log"
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
            self.register_bmc(name, bmc.config.port, bmc.config.user, bmc.config.password)

    def kill_host(self, name: str) -> None:
        """SIGKILL the host's agent (with its in-process libvirt and VMs): no Goodbye, the BMC now reads off."""
        if name in self.bmcs:
            pid = self.bmcs[name].host_pid
            if pid is None:
                raise HarnessError(f"host {name} is not powered on")
            os.kill(pid, signal.SIGKILL)
        else:
            self.agents[name].kill()

    def logs(self) -> str:
        """The tail of every process's log, for failure messages."""
        procs = [p for p in [self.manager, *(m.manager for m in self.more_managers), *self.agents.values()]
                 if p is not None]
        procs += [ChildProcess(name, [], self.workdir / f"agent-{name}.log") for name in self.bmcs]
        return "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)

    def close(self) -> None:
        """End every process this cluster started (agents, manager, BMC simulators with their hosts)."""
        self.close_admin()
        for agent in self.agents.values():
            agent.stop()
        if self.manager is not None:
            self.manager.stop()
        for other in self.more_managers:
            other.close_admin()
            if other.manager is not None:
                other.manager.stop()
        for bmc in self.bmcs.values():
            bmc.stop()
