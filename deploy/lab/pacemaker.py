"""The peer stack: Pacemaker + corosync on the lab's hosts instead of kvmha's agents (`kvmha-lab up --stack pacemaker`).

Each host runs, under its own init (kvmha.lab.boot), virtlogd, virtlockd and libvirtd as in every lab, then corosync
(knet over the lab bridge, eth0) and pacemakerd with its subsidiary daemons. Stonith is `fence_ipmilan` to the same
ipmi_sim BMCs, over the lab's BMC network (eth1, kvmha.lab.bmcnet); VMs are `ocf:heartbeat:VirtualDomain` resources
defined by the same XML on the same shared storage, so the same virtlockd leases guard their disks.

What several corosync/Pacemaker nodes on one kernel need (found out here; docs/lab.md has the table):
- a private /run (tmpfs): corosync locks /run/corosync.pid, pacemakerd makes /run/crm, pacemaker-execd keeps the
  resource agents' state in /run/resource-agents (VirtualDomain's emulator file); shared, the second node would
  refuse to start or read the first one's state. The shared storage is kept visible through it (BootConfig.keep).
- a private /dev/shm (tmpfs): libqb's IPC ring buffers are files there named after PIDs, and PIDs in one host's
  PID namespace repeat in the next one's. (libqb's sockets are abstract, so the network namespace separates those.)
- private /etc/corosync, /var/lib/corosync, /var/lib/pacemaker (the CIB, kept across power cycles like a disk) and
  /var/log/pacemaker (pacemaker.log and corosync.log), bound from the host's folder.
- no syslog (PCMK_logfacility=none, corosync to_syslog: no) and no watchdog (corosync watchdog_device: off): the
  machine's /dev/log and /dev/watchdog are not the lab's.

Two profiles, written down here and nowhere else: "defaults" is what a cluster gets out of the box (corosync's and
Pacemaker's defaults; VirtualDomain's operations as `pcs resource create` takes them from the agent's metadata: monitor
10 s / 30 s, start and stop 90 s; one fence_ipmilan device per node, monitored every 60 s); "tuned" is each lever the
projects' documentation offers for a faster failover (see PROFILES). Both need `cipher=3` and `lanplus=1` for ipmi_sim,
as kvmha's own IPMI client does (`ipmitool -C 3`): that is the BMC's requirement, not tuning.
"""

from __future__ import annotations

import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvmha.lab import host as hostfs
from kvmha.lab.boot import BootConfig, Service
from kvmha.lab.state import HostSpec, LabError, LabSpec

if TYPE_CHECKING:
    from kvmha.lab.lab import Lab

STACK = "pacemaker"
DAEMONS = ("corosync", "pacemakerd")  # as /proc/PID/comm names them; pacemakerd starts the others
CLUSTER_NAME = "kvmhalab"
NEEDED = ("corosync", "pacemakerd", "crm_mon", "cibadmin", "crm_attribute", "fence_ipmilan", "ipmitool")
VIRTUAL_DOMAIN = Path("/usr/lib/ocf/resource.d/heartbeat/VirtualDomain")
PRIVATE_MOUNTS = {  # host folder name -> where it is mounted inside the host
    "etc-corosync": "/etc/corosync",
    "lib-corosync": "/var/lib/corosync",
    "lib-pacemaker": "/var/lib/pacemaker",
    "log-pacemaker": "/var/log/pacemaker",
}
HACLUSTER_DIRS = ("lib-pacemaker/cib", "lib-pacemaker/pengine", "lib-pacemaker/blackbox", "lib-pacemaker/cores",
                  "log-pacemaker")  # fmt: skip
FORM_TIMEOUT_S = 120.0
LOAD_THRESHOLD = "1000%"


@dataclass(frozen=True)
class Profile:
    """One configuration of the peer. None = the software's own default (nothing written)."""

    token_ms: int | None  # corosync totem.token (default 3000, + token_coefficient 650 per node beyond two)
    stonith_action: str | None  # Pacemaker's stonith-action (default "reboot")
    vm_monitor: tuple[int, int]  # VirtualDomain monitor interval, timeout (s)
    fence_power_wait_s: int | None  # fence_ipmilan power_wait: sleep after the power command (default 2)
    fence_monitor_s: int = 60  # the stonith device's own monitor (a status call to the BMC)


PROFILES: dict[str, Profile] = {
    "defaults": Profile(token_ms=None, stonith_action=None, vm_monitor=(10, 30), fence_power_wait_s=None),
    # corosync.conf(5): token is the lever for detection (consensus follows as 1.2 x token); 1000 ms keeps knet's
    # pings at 250 ms. Pacemaker Explained: stonith-action=off skips the power-on half of a reboot. fence_ipmilan's
    # power_wait=0: status polling (every 1 s) starts at once. A 2 s monitor is the shortest Pacemaker's whole-second
    # intervals allow for a VM crash to be noticed without a monitor running back to back.
    "tuned": Profile(token_ms=1000, stonith_action="off", vm_monitor=(2, 10), fence_power_wait_s=0),
}


def check_installed() -> None:
    missing = [b for b in NEEDED if shutil.which(b) is None]
    if not VIRTUAL_DOMAIN.exists():
        missing.append(str(VIRTUAL_DOMAIN))
    if missing:
        raise LabError(f"the pacemaker stack needs Debian's pacemaker, corosync, fence-agents, resource-agents "
                       f"(missing: {', '.join(missing)}; `make setup` installs them)")


def profile_of(spec: LabSpec) -> Profile:
    try:
        return PROFILES[spec.stack_profile or "defaults"]
    except KeyError:
        raise LabError(f"unknown pacemaker profile {spec.stack_profile!r} (one of {', '.join(PROFILES)})") from None


# ----- a host's files and its boot ------------------------------------------------------------------------------


def corosync_conf(spec: LabSpec) -> str:
    profile = profile_of(spec)
    token = f"    token: {profile.token_ms}\n" if profile.token_ms is not None else ""
    nodes = "".join(f"    node {{\n        ring0_addr: {h.address}\n        name: {h.name}\n        nodeid: {h.index}\n"
                    "    }\n" for h in spec.hosts)
    two_node = "    two_node: 1\n" if len(spec.hosts) == 2 else ""
    return (f"# Written by kvmha-lab (profile {spec.stack_profile or 'defaults'}).\n"
            f"totem {{\n    version: 2\n    cluster_name: {CLUSTER_NAME}\n    transport: knet\n"
            f"    crypto_cipher: none\n    crypto_hash: none\n{token}}}\n"
            f"nodelist {{\n{nodes}}}\n"
            f"quorum {{\n    provider: corosync_votequorum\n{two_node}}}\n"
            "logging {\n    to_logfile: yes\n    logfile: /var/log/pacemaker/corosync.log\n    to_syslog: no\n"
            "    to_stderr: no\n    timestamp: hires\n}\n"
            "resources {\n    watchdog_device: off\n}\n")


def prepare(spec: LabSpec, host: HostSpec) -> None:
    """Write the host's cluster files and replace its boot plan: libvirt's daemons, then corosync and pacemakerd
    (no kvmha agent). Called after kvmha.lab.host.prepare, once every host of the lab is in the spec."""
    host_dir = Path(host.dir)
    for name in PRIVATE_MOUNTS:
        (host_dir / name).mkdir(parents=True, exist_ok=True)
    for name in HACLUSTER_DIRS:
        path = host_dir / name
        path.mkdir(parents=True, exist_ok=True)
        shutil.chown(path, "hacluster", "haclient")
        path.chmod(0o770 if name.startswith("log") else 0o750)
    (host_dir / "etc-corosync" / "corosync.conf").write_text(corosync_conf(spec))
    base = hostfs.boot_config(spec, host)
    binds = base.binds + [(str(host_dir / name), target) for name, target in PRIVATE_MOUNTS.items()]
    pacemakerd = ("until corosync-cfgtool -s >/dev/null 2>&1; do sleep 0.2; done; "  # pacemakerd needs corosync
                  "exec env PCMK_logfile=/var/log/pacemaker/pacemaker.log PCMK_logfacility=none pacemakerd")
    services = [s for s in base.services if s.name != "kvmha-agent"] + [
        Service("corosync", ["corosync", "-f"], None),
        Service("pacemakerd", ["sh", "-c", pacemakerd], None),
    ]
    boot = BootConfig(host=base.host, tmpfs=["/run", hostfs.RUN_LIBVIRT, "/dev/shm"], binds=binds,
                      log_dir=base.log_dir, boot_log=base.boot_log, services=services, keep=[spec.shared_dir])
    (host_dir / "boot.json").write_text(boot.dump())


# ----- talking to the cluster (from inside a host) ---------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """What crm_mon says, asked on one host."""

    online: tuple[str, ...]
    dc: str | None
    resources: dict[str, list[str]]  # resource id -> nodes where it is active
    failed: tuple[str, ...]  # resource ids with a failed or pending role somewhere
    quorate: bool


def view(lab: Lab, on: str) -> ClusterView:
    out = lab.exec(on, ["crm_mon", "-1", "--output-as=xml"], timeout_s=30).stdout
    root = ET.fromstring(out)
    summary_dc = root.find("summary/current_dc")
    dc = summary_dc.get("name") if summary_dc is not None and summary_dc.get("present") == "true" else None
    quorate = summary_dc is not None and summary_dc.get("with_quorum") == "true"
    online = tuple(n.get("name", "") for n in root.iter("node") if n.get("online") == "true" and n.get("id"))
    resources: dict[str, list[str]] = {}
    failed: list[str] = []
    for res in root.iter("resource"):
        rid = res.get("id", "")
        nodes = [n.get("name", "") for n in res.findall("node")]
        resources[rid] = nodes if res.get("active") == "true" else []
        if res.get("failed") == "true" or res.get("role") not in ("Started", "Stopped"):
            failed.append(rid)
    return ClusterView(online, dc, resources, tuple(failed), quorate)


def any_view(lab: Lab) -> ClusterView:
    """crm_mon from the first powered-on host that answers."""
    errors = []
    for host in lab.hosts:
        if lab.init(host.name) is None:
            continue
        try:
            return view(lab, host.name)
        except (LabError, ET.ParseError) as error:
            errors.append(f"{host.name}: {error}")
    raise LabError("no host answers crm_mon: " + "; ".join(errors))


def wait_formed(lab: Lab, nodes: list[str] | None = None, timeout_s: float = FORM_TIMEOUT_S) -> ClusterView:
    """Wait until every given node (default: all) is online, with a DC and quorum."""
    wanted = set(nodes or [h.name for h in lab.hosts])
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            seen = any_view(lab)
            if wanted <= set(seen.online) and seen.dc and seen.quorate:
                return seen
            last = f"online {seen.online}, dc {seen.dc}, quorate {seen.quorate}"
        except LabError as error:
            last = str(error)
        time.sleep(0.5)
    raise LabError(f"the Pacemaker cluster did not form within {timeout_s:.0f} s ({last})")


def wait_settled(lab: Lab, timeout_s: float = 180.0) -> None:
    """Wait until the cluster has nothing left to do (crm_resource --wait: no pending transition)."""
    on = next(h.name for h in lab.hosts if lab.init(h.name) is not None)
    lab.exec(on, ["crm_resource", "--wait", f"--timeout={int(timeout_s)}s"], timeout_s=timeout_s + 10)


def cib_create(lab: Lab, on: str, section: str, xml: str) -> None:
    lab.exec(on, ["cibadmin", "--create", "-o", section, "-X", xml], timeout_s=60)


def set_property(lab: Lab, on: str, name: str, value: str) -> None:
    lab.exec(on, ["crm_attribute", "--type", "crm_config", "--name", name, "--update", value], timeout_s=60)


def _nvpairs(owner: str, values: dict[str, str]) -> str:
    return "".join(f'<nvpair id="{owner}-{k}" name="{k}" value="{v}"/>' for k, v in values.items())


def fence_device_xml(lab: Lab, host: HostSpec) -> str:
    profile = profile_of(lab.spec)
    address, port, user, password = lab.bmc_credentials(host.name)
    rid = f"fence-{host.name}"
    attrs = {"ip": address, "ipport": str(port), "username": user, "password": password, "lanplus": "1",
             "cipher": "3", "pcmk_host_list": host.name}
    if profile.fence_power_wait_s is not None:
        attrs["power_wait"] = str(profile.fence_power_wait_s)
    return (f'<primitive id="{rid}" class="stonith" type="fence_ipmilan">'
            f'<instance_attributes id="{rid}-ia">{_nvpairs(rid, attrs)}</instance_attributes>'
            f'<operations><op id="{rid}-monitor" name="monitor" interval="{profile.fence_monitor_s}s"/></operations>'
            "</primitive>")


def configure(lab: Lab) -> None:
    """After every host booted: wait for the cluster, then write the cluster options and one fence device per host
    (kept off the host it fences, the usual recipe)."""
    wait_formed(lab)
    profile = profile_of(lab.spec)
    on = lab.hosts[0].name
    set_property(lab, on, "stonith-enabled", "true")
    # A lab correction, in both profiles: each node throttles its recovery on the load average it reads, and in the
    # lab every node reads the whole machine's (all hosts on one kernel, other work beside them). Over the default
    # load-threshold (80 %) the DC ran one action at a time cluster-wide (VM starts on different nodes one after
    # the other: "High CPU load detected" in pacemaker.log). Real nodes read their own load.
    set_property(lab, on, "load-threshold", LOAD_THRESHOLD)
    if profile.stonith_action is not None:
        set_property(lab, on, "stonith-action", profile.stonith_action)
    for host in lab.hosts:
        cib_create(lab, on, "resources", fence_device_xml(lab, host))
        cib_create(lab, on, "constraints", f'<rsc_location id="fence-{host.name}-not-self" rsc="fence-{host.name}" '
                                           f'node="{host.name}" score="-INFINITY"/>')
    wait_settled(lab)


def vm_xml(lab: Lab, name: str, config_path: str) -> str:
    interval, timeout = profile_of(lab.spec).vm_monitor
    # force_stop: the lab's guest (a hand-made boot sector) ignores the ACPI power button, so a graceful `virsh
    # shutdown` would only end when the stop timeout (90 s) runs out. Stops are never on the failover path measured
    # here (a dead host's VMs are not stopped; a crashed VM's stop finds it gone); they happen when Pacemaker moves a
    # VM back to a node that rejoined (resource-stickiness 0 by default).
    attrs = {"config": config_path, "hypervisor": "qemu:///system", "force_stop": "true"}
    return (f'<primitive id="{name}" class="ocf" provider="heartbeat" type="VirtualDomain">'
            f'<instance_attributes id="{name}-ia">{_nvpairs(name, attrs)}</instance_attributes>'
            f'<operations><op id="{name}-start" name="start" interval="0s" timeout="90s"/>'
            f'<op id="{name}-stop" name="stop" interval="0s" timeout="90s"/>'
            f'<op id="{name}-monitor" name="monitor" interval="{interval}s" timeout="{timeout}s"/></operations>'
            "</primitive>")


def add_vm(lab: Lab, name: str, memory_mib: int = 32) -> None:
    """Write the VM's disk and XML on the shared storage (as for kvmha) and make it a VirtualDomain resource;
    Pacemaker places and starts it."""
    xml_path = Path(lab.spec.shared_dir) / "vms" / f"{name}.xml"
    lab.vm_prepare(name, memory_mib=memory_mib)
    on = next(h.name for h in lab.hosts if lab.init(h.name) is not None)
    cib_create(lab, on, "resources", vm_xml(lab, name, str(xml_path)))


def log_paths(lab: Lab) -> dict[str, Path]:
    """Host -> its pacemaker.log (read from the machine: the host's folder, also when it is powered off)."""
    return {h.name: Path(h.dir) / "log-pacemaker" / "pacemaker.log" for h in lab.hosts}


def describe(spec: LabSpec) -> str:
    """The profile as one line (for bench output and docs)."""
    p = profile_of(spec)
    return (f"corosync token {p.token_ms or 'default (3000)'} ms; stonith-action {p.stonith_action or 'reboot'}; "
            f"VirtualDomain monitor {p.vm_monitor[0]} s (timeout {p.vm_monitor[1]} s); fence_ipmilan power_wait "
            f"{p.fence_power_wait_s if p.fence_power_wait_s is not None else 'default (2)'} s")
