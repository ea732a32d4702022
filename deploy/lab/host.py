"""The files of one lab host (its "disk") and the command its BMC runs to boot it.

Layout under <state-dir>/hosts/<name>/:
  etc-libvirt/   mounted over /etc/libvirt      (qemu.conf, qemu-lockd.conf written here, domain definitions)
  lib-libvirt/   mounted over /var/lib/libvirt  (survives power cycles, like a real host's disk)
  log/           mounted over /var/log/libvirt  (virtlogd/virtlockd/libvirtd/agent logs, QEMU logs in qemu/)
  libvirt-pki/   the host's certificate, key and the lab's CA under libvirt's and QEMU's names (migration over TLS)
  bmc/           the ipmi_sim working dir (lan.conf, emulator file, ipmi_sim.log)
  boot.json      what the init (kvmha.lab.boot) mounts and starts; boot.log its own log
  agent.toml     the kvmha agent's configuration (only when the lab has a manager)
  watchdog/      the host's hardware watchdog (labs with one): device.sock, device.json, resets.log
  run/           mounted over by a tmpfs at every boot (labs with a watchdog): kvmha-watchdog's socket and marker
<state-dir>/cache-libvirt/ (or the lab's cache_dir) is mounted over /var/cache/libvirt in every host: it only holds
QEMU capability probes, and sharing it saves each host a probe of a few seconds of CPU.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from kvmha.lab import agent_config, watchdog
from kvmha.lab.boot import BootConfig, Service
from kvmha.lab.pki import LabPki
from kvmha.lab.state import HostSpec, LabSpec
from kvmha.manager.security import pki

RUN_LIBVIRT = "/run/libvirt"
PRIVATE_MOUNTS = {  # host folder name -> where it is mounted inside the host
    "etc-libvirt": "/etc/libvirt",
    "lib-libvirt": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
}
CACHE_DIR_NAME = "cache-libvirt"
LEASES_DIR_NAME = "leases"
DISKS_DIR_NAME = "disks"

# Each line says why: QEMU as the default libvirt-qemu user cannot open /dev/kvm here, and the machine's device
# permissions are not the lab's to change; the hosts share one kernel, so cgroups and per-domain mount namespaces
# would be shared state between "hosts" (and /sys/fs/cgroup is not even visible under `ip netns exec`).
QEMU_CONF = """# Written by kvmha-lab for lab host {host}.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
# Disk leases through virtlockd: a second start of the same disk anywhere in the lab fails at the hypervisor.
lock_manager = "lockd"
# Live migration between lab hosts: the hosts share the machine's host name, so QEMU's incoming migration listens
# on, and is reached at, the host's own bridge address (libvirt would otherwise hand out the machine's name).
migration_address = "{address}"
migration_host = "{address}"
# VIR_MIGRATE_TLS: QEMU encrypts the migration stream with the host's certificate from the lab's PKI (both ends
# verify the other against the lab's CA; the source checks the target's address is in its certificate).
migrate_tls_x509_cert_dir = "{pki_dir}"
migrate_tls_x509_verify = 1
"""

# Leases are indirect files in one folder of the shared storage (named by the SHA-256 of the disk path), held
# with fcntl locks by each host's virtlockd. The kernel drops a dead host's locks with its virtlockd, so a lease
# never outlives a powered-off host.
QEMU_LOCKD_CONF = """# Written by kvmha-lab for lab host {host}.
auto_disk_leases = 1
require_lease_for_disks = 1
file_lockspace_dir = "{leases_dir}"
"""

# Live migration is peer to peer: the source's libvirtd connects to the target's with libvirt's own TLS
# (qemu+tls, port 16514) on the lab's private bridge, with the hosts' certificates from the lab's PKI (the same
# kvmha.manager.security.pki that signs the agents' certificates; a host certificate carries the host's bridge
# address, which is what the migration URI names, and serves as both TLS server and client). The lab hosts share
# /etc/pki with the machine, so each host's libvirtd is pointed at its own copies (key_file/cert_file/ca_file) and
# the client side of a migration at them through the URI's pkipath. Only host certificates are let in
# (tls_allowed_dn_list): an operator's or the manager's certificate from the same CA opens no libvirtd. Every host
# needs its own host_uuid: the hosts share one machine's SMBIOS/machine-id, and libvirt refuses to migrate a domain
# "to the same host".
LIBVIRTD_CONF = """# Written by kvmha-lab for lab host {host}: the unix socket, and TLS on the lab bridge (migrations).
listen_tls = 1
listen_tcp = 0
listen_addr = "{address}"
key_file = "{pki_dir}/serverkey.pem"
cert_file = "{pki_dir}/servercert.pem"
ca_file = "{pki_dir}/cacert.pem"
tls_allowed_dn_list = ["*OU=host*"]
host_uuid = "{host_uuid}"
"""
LIBVIRT_PKI_DIR_NAME = "libvirt-pki"
# The names libvirt (libvirtd.conf above, a client's pkipath) and QEMU (migrate_tls_x509_cert_dir) look for, and
# which of the host's PKI files each one is.
LIBVIRT_PKI_FILES = {
    "cacert.pem": "ca", "servercert.pem": "cert", "serverkey.pem": "key", "clientcert.pem": "cert",
    "clientkey.pem": "key",
    "ca-cert.pem": "ca", "server-cert.pem": "cert", "server-key.pem": "key", "client-cert.pem": "cert",
    "client-key.pem": "key",
}
MIGRATION_URI = "qemu+tls://{{address}}/system?pkipath={pki_dir}"  # {address}: filled in by the agent


def libvirt_pki_dir(host: HostSpec) -> Path:
    return Path(host.dir) / LIBVIRT_PKI_DIR_NAME


def migration_uri(host: HostSpec, address: str | None = None) -> str:
    """The URI this host's libvirtd migrates to a peer with (its own client certificate through pkipath);
    with `address`, the URI to that peer, else the agent's template with {address} in it."""
    template = MIGRATION_URI.format(pki_dir=libvirt_pki_dir(host))
    return template if address is None else template.format(address=address)


def write_libvirt_pki(lab: LabSpec, host: HostSpec) -> Path:
    """Copy the host's certificate, key and the lab's CA under the names libvirt and QEMU expect (0600 keys)."""
    files = LabPki(Path(lab.state_dir) / "pki").host(host.name, host.host_uuid, host.address)
    directory = libvirt_pki_dir(host)
    directory.mkdir(mode=0o700, exist_ok=True)
    sources = {"ca": files.ca, "cert": files.cert, "key": files.key}
    for name, kind in LIBVIRT_PKI_FILES.items():
        data = sources[kind].read_bytes()
        if kind == "key":
            pki.write_private(directory / name, data)
        else:
            (directory / name).write_bytes(data)
    return directory


def agent_executable() -> Path:
    """The kvmha-agent console script next to the Python running the lab (the project's venv)."""
    return Path(sys.executable).parent / "kvmha-agent"


def agent_toml(lab: LabSpec, host: HostSpec, overrides: Mapping[str, object]) -> str:
    """The agent's configuration (schema: kvmha.agent.config). Keys "isolation.policy" / "isolation.after_s" go
    to [isolation], "watchdog.timeout_s" and the like to [watchdog]; any other override replaces or adds an [agent]
    key."""
    agent: dict[str, object] = {
        "host_uuid": host.host_uuid,
        "hostname": host.name,
        "management_address": host.address,
        "managers": lab.agent_managers or [lab.manager],  # every manager of the lab, in slot order
        "libvirt_uri": "qemu:///system",
        "storage_paths": [lab.shared_dir],
        "heartbeat_interval_s": 1.0,
        "resync_interval_s": 30.0,
        "log_format": "kv",
    }
    # Mutual TLS with a certificate binding this host's uuid, from the lab's CA (the manager's harness uses it too).
    tls = LabPki(Path(lab.state_dir) / "pki").host(host.name, host.host_uuid, host.address).agent_overrides()
    migration = {"uri": migration_uri(host), "tls": True, "unsafe": True}
    return agent_config.agent_toml(agent, {**tls, **overrides}, isolation={"policy": "destroy-vms", "after_s": 30.0},
                                   watchdog=watchdog.agent_section(lab, host),
                                   migration=migration,
                                   comment=f"Written by kvmha-lab for lab host {host.name}.")


def cache_dir(lab: LabSpec) -> str:
    return lab.cache_dir or str(Path(lab.state_dir) / CACHE_DIR_NAME)


def boot_config(lab: LabSpec, host: HostSpec) -> BootConfig:
    host_dir = Path(host.dir)
    binds = [(str(host_dir / name), target) for name, target in PRIVATE_MOUNTS.items()]
    binds.append((cache_dir(lab), "/var/cache/libvirt"))
    # The shared storage onto itself: the same path in every host, but a mount of this host's own that a storage
    # fault can cover without touching the others.
    binds.append((lab.shared_dir, lab.shared_dir))
    services = [
        Service("virtlogd", ["virtlogd", "-p", f"{RUN_LIBVIRT}/virtlogd.pid"], f"{RUN_LIBVIRT}/virtlogd-sock"),
        Service("virtlockd", ["virtlockd", "-p", f"{RUN_LIBVIRT}/virtlockd.pid"], f"{RUN_LIBVIRT}/virtlockd-sock"),
        Service("libvirtd", ["libvirtd", "--listen", "-p", f"{RUN_LIBVIRT}/libvirtd.pid"],
                f"{RUN_LIBVIRT}/libvirt-sock"),
    ]
    if lab.manager:
        services += watchdog.services(lab, host)  # kvmha-watchdog first: the agent arms it at start
        agent_argv = [str(agent_executable()), "--config", str(host_dir / "agent.toml")]
        services.append(Service("kvmha-agent", agent_argv, None))
    return BootConfig(
        host=host.name,
        tmpfs=[RUN_LIBVIRT, *watchdog.tmpfs(lab, host)],
        binds=binds,
        log_dir="/var/log/libvirt",
        boot_log=str(host_dir / "boot.log"),
        services=services,
    )


def prepare(lab: LabSpec, host: HostSpec, agent_overrides: Mapping[str, object]) -> None:
    """Write the host's disk: a private /etc/libvirt made from the machine's *.conf files plus the lab's own."""
    host_dir = Path(host.dir)
    etc = host_dir / "etc-libvirt"
    for name in PRIVATE_MOUNTS:
        (host_dir / name).mkdir(parents=True, exist_ok=True)
    (host_dir / "bmc").mkdir(exist_ok=True)
    # Only the top-level configuration files: the machine's own domain or network definitions stay out.
    for conf in Path("/etc/libvirt").glob("*.conf"):
        shutil.copyfile(conf, etc / conf.name)
    leases_dir = Path(lab.shared_dir) / LEASES_DIR_NAME
    pki_dir = write_libvirt_pki(lab, host)
    (etc / "qemu.conf").write_text(QEMU_CONF.format(host=host.name, address=host.address, pki_dir=pki_dir))
    (etc / "qemu-lockd.conf").write_text(QEMU_LOCKD_CONF.format(host=host.name, leases_dir=leases_dir))
    (etc / "libvirtd.conf").write_text(
        LIBVIRTD_CONF.format(host=host.name, address=host.address, host_uuid=host.host_uuid, pki_dir=pki_dir)
    )
    watchdog.prepare(lab, host)
    if lab.manager:
        (host_dir / "agent.toml").write_text(agent_toml(lab, host, agent_overrides))
    (host_dir / "boot.json").write_text(boot_config(lab, host).dump())


def startcmd(host: HostSpec, lab: LabSpec | None = None) -> str:
    """The BMC's "power": PID 1 of a new PID namespace in the host's network namespace, in a private mount
    namespace, under kvmha.lab.power (which takes the host's interface down when the power goes).
    --kill-child: when unshare is killed (power off), the init and so the whole host die."""
    argv = [
        sys.executable, "-m", "kvmha.lab.power", host.netns, *(watchdog.power_args(lab, host) if lab else []), "--",
        "ip", "netns", "exec", host.netns,
        "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--propagation", "private",
        sys.executable, "-m", "kvmha.lab.boot", str(Path(host.dir) / "boot.json"),
    ]  # fmt: skip
    return shlex.join(argv)
