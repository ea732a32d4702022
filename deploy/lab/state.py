"""What a lab is made of, saved as JSON in its state dir so that any process (`kvmha-lab status` in another shell,
`down` after a crash) can find and undo it. Only facts that cannot be read back from the machine are stored: names,
ports, and the PID + start time of the processes the lab itself started (so that a later process signals exactly
those, never a reused PID). Everything else (power, faults, the PIDs inside a host) is read live.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "lab.json"
DEFAULT_STATE_DIR = Path("/run/kvmha-lab")
DAEMONS = ("virtlogd", "virtlockd", "libvirtd")  # as /proc/PID/comm names them
AGENT = "kvmha-agent"
WATCHDOG = "kvmha-watchdog"  # the watchdog daemon, in labs made with a hardware watchdog per host (issue 11)
QEMU_COMM = "qemu-system-x86"  # /proc comm is cut at 15 characters


class LabError(RuntimeError):
    pass


@dataclass(frozen=True)
class HostSpec:
    name: str  # h1, h2, ...
    index: int
    netns: str  # <prefix>-h1
    veth: str  # bridge side of the host's cable, in the root namespace
    address: str  # the host's address on the lab bridge
    bmc_port: int  # UDP port of the host's ipmi_sim (623 on the lab's BMC network)
    host_uuid: str
    dir: str  # the host's own files: its /etc/libvirt, /var/lib/libvirt, logs, BMC workdir
    # Where the BMC answers: its address on the lab's BMC network (kvmha.lab.bmcnet), from its own namespace
    # bmc_netns. The defaults describe a BMC on 127.0.0.1 of the root namespace (labs made before the BMC network).
    bmc_address: str = "127.0.0.1"
    bmc_netns: str = ""


@dataclass(frozen=True)
class ManagerSlot:
    """A manager's place in a lab made with `--managers N` (issue 15): its own network namespace, on the lab bridge
    (where agents reach it and it reaches the lab's database) and on the BMC network (where it reaches the BMCs)."""

    name: str  # m1, m2, ...
    index: int
    netns: str  # <prefix>-m1
    veth: str  # bridge side of its lab cable, in the root namespace (cut to isolate the manager)
    address: str  # its address on the lab bridge: agents connect here, admin calls too
    bmc_veth: str  # bridge side of its BMC-network cable
    bmc_address: str  # its address on the BMC network


@dataclass(frozen=True)
class PidRef:
    pid: int
    start_ticks: int


@dataclass
class LabSpec:
    state_dir: str
    prefix: str
    subnet: str
    bridge: str
    bridge_address: str
    shared_dir: str  # the shared storage, at this same path in every host
    manager: str | None  # "ADDR:PORT" the agents report to; None: no agents
    domain_type: str  # "kvm" when /dev/kvm is usable, else "qemu" (TCG)
    bmc_user: str
    bmc_password: str
    cache_dir: str = ""  # mounted over /var/cache/libvirt in every host (QEMU capability probes); "" = in state dir
    hosts: list[HostSpec] = field(default_factory=list)
    bmcs: dict[str, PidRef] = field(default_factory=dict)  # host name -> its ipmi_sim
    keeper: PidRef | None = None  # the process owning the BMCs when the lab was made by `kvmha-lab up`
    # Processes started next to the lab that `down` must end too (by PID, SIGTERM then SIGKILL): the harness's
    # manager, recorded so that a lab outliving its creator (`make demo`) takes its manager with it.
    companions: dict[str, PidRef] = field(default_factory=dict)
    created_dirs: list[str] = field(default_factory=list)  # machine folders the lab made, removed by down
    netns_mount_created: bool = False  # /run/netns became a mount point because of us
    # > 0: every host has a lab hardware watchdog with this timeout, driven by kvmha-watchdog (kvmha.lab.watchdog).
    watchdog_device_timeout_s: int = 0
    ready: bool = False
    bmc_subnet: str = ""  # the lab's BMC network (kvmha.lab.bmcnet); "" = BMCs on 127.0.0.1 (older labs)
    stack: str = "kvmha"  # what runs on the hosts: "kvmha" (libvirt + agent) or "pacemaker" (kvmha.lab.pacemaker)
    stack_profile: str = ""  # the pacemaker stack's configuration: "defaults" or "tuned" (pacemaker.PROFILES)
    # Several managers (issue 15): one namespace each; the agents list them all ("ADDR:PORT" in `agent_managers`).
    managers: list[ManagerSlot] = field(default_factory=list)
    agent_managers: list[str] = field(default_factory=list)
    # The lab's own PostgreSQL (kvmha.lab.labdb), on the bridge address; "" = none. Ended by `down` after the
    # companions (the managers using it), by the postmaster's PID; its folder removed with it.
    database_url: str = ""
    database_dir: str = ""
    database: PidRef | None = None

    def manager_slot(self, name: str) -> ManagerSlot:
        for slot in self.managers:
            if slot.name == name:
                return slot
        raise KeyError(f"no manager {name!r} in this lab (managers: {', '.join(m.name for m in self.managers) or '-'})")

    def host(self, name: str) -> HostSpec:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(f"no host {name!r} in this lab (hosts: {', '.join(h.name for h in self.hosts)})")

    def save(self) -> None:
        path = Path(self.state_dir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.chmod(tmp, 0o600)  # it holds the BMC password
        tmp.replace(path)

    @staticmethod
    def load(state_dir: Path) -> LabSpec:
        path = state_dir / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no lab state in {state_dir} (is a lab up?)") from None
        raw["hosts"] = [HostSpec(**h) for h in raw["hosts"]]
        raw["bmcs"] = {name: PidRef(**ref) for name, ref in raw["bmcs"].items()}
        raw["keeper"] = PidRef(**raw["keeper"]) if raw.get("keeper") else None
        raw["companions"] = {name: PidRef(**ref) for name, ref in raw.get("companions", {}).items()}
        raw["managers"] = [ManagerSlot(**m) for m in raw.get("managers", [])]
        raw["database"] = PidRef(**raw["database"]) if raw.get("database") else None
        return LabSpec(**raw)
