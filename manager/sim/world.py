"""The simulated hardware and ground truth: hosts (power, agent, network, storage, hypervisor, BMC) and where each VM
really runs. The core never sees this directly — only through the facts the simulated agents and BMCs report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvmha.manager.core.model import HostId, HostInventory, StorageReach, VmId, VmUuid

HEARTBEAT_INTERVAL_S = 2.0  # the agent writes its storage heartbeat this often


@dataclass(slots=True)
class SimVm:
    id: VmId
    name: str
    uuid: VmUuid
    memory_mib: int = 1024
    vcpus: int = 1
    ha: bool = True
    priority: int = 0
    group: str | None = None
    host: str | None = None  # where it runs at the start (None: registered Stopped)
    disks: tuple[str, ...] = ()  # storage names ("a": a disk in /mnt/a) its disks live on
    networks: tuple[str, ...] = ()  # "bridge:br0" / "network:default" it attaches to

    def domain_xml(self) -> str:
        """The domain XML the manager registers: its disks and interfaces are what placement reads."""
        devices = "".join(
            f"<disk type='file'><source file='/mnt/{name}/{self.name}.qcow2'/></disk>" for name in self.disks
        ) + "".join(
            f"<interface type='{kind}'><source {kind}='{name}'/></interface>"
            for kind, _, name in (net.partition(":") for net in self.networks)
        )
        return f"<domain><name>{self.name}</name><devices>{devices}</devices></domain>" if devices else (
            f"<domain>{self.name}</domain>"
        )


@dataclass(slots=True)
class SimHost:
    id: HostId
    name: str
    cpus: int = 16
    memory_mib: int = 65536
    has_bmc: bool = True
    bmc_alive: bool = True
    bmc_fail_next: int = 0  # the next N fence attempts fail although the BMC answers
    powered: bool = True
    agent_enabled: bool = True  # the agent service is installed and enabled (faults switch it off)
    agent_running: bool = True  # the agent process runs now (not while the host boots)
    net_up: bool = True  # the management network (manager and neighbours)
    manager_link_up: bool = True  # only the manager <-> host path (neighbours may still reach the host)
    drop_rate: float = 0.0  # share of messages lost on the manager <-> host link
    extra_delay_s: float = 0.0  # added to every message on that link
    storage_ok: bool = True
    hypervisor_ok: bool = True
    stream_open: bool = False  # the agent's link to the manager
    stream_no: int = 0  # counts the streams opened: a keepalive failure concerns one stream, not a later one
    connecting: bool = False  # a connection attempt is scheduled
    boot_no: int = 1
    bucket: int = 0  # ping phase
    ping_seq: int = 0
    running: set[VmUuid] = field(default_factory=set)
    incoming: set[VmUuid] = field(default_factory=set)  # paused copies of VMs migrating here (sim/migrations.py)
    hb_stopped_at: float | None = None  # None: the heartbeat is being written
    isolated_since: float | None = None  # lost the manager and its storage heartbeat since
    booted_at: float = 0.0
    # kvmha-watchdog (docs/watchdog.md): armed by the agent when `watchdog`; T = watchdog_timeout_s bounds the reset
    # after the agent's last pet, D = watchdog_device_s after a crash (a restart within D takes the arm over).
    watchdog: bool = True
    watchdog_timeout_s: float = 20.0
    watchdog_device_s: float = 10.0
    agent_frozen: bool = False  # SIGSTOP: the process exists (no restart by its init), it does nothing
    wd_generation: int = 0  # bumped whenever the agent pets again: an expiry armed before it is void
    wd_latched_at: float | None = None  # from then on the reset can no longer be undone
    wd_expiring: bool = False
    wd_broken: bool = False  # reports armed but never resets the host (a failed watchdog: what leases must catch)
    # Disk leases (virtlockd, libvirt lock_manager "lockd"): held while a VM runs here. On NFS a lock lives as long as
    # its host renews it (powered and reaching its storage), then until `World.lease_expiry_s` after the last renewal.
    leases: bool = True
    lease_until: dict[VmUuid, float] = field(default_factory=dict)  # NFS: locks left behind, and until when
    # What its agent reports for placement (None: an older agent that reports nothing): storage name -> the identity
    # mounted at /mnt/NAME ("nfs:nas:/a"; another identity at the same path models a different mount there), the
    # unhealthy ones, networks, free memory (None: not reported) and the hypervisor's memory reserve.
    storage: dict[str, str] | None = None
    storage_down: set[str] = field(default_factory=set)
    networks: tuple[str, ...] = ()
    free_memory_mib: int | None = None
    memory_reserve_mib: int | None = None

    def inventory(self) -> HostInventory:
        if self.storage is None and not self.networks:
            return HostInventory(free_memory_mib=self.free_memory_mib, memory_reserve_mib=self.memory_reserve_mib)
        storage = tuple(
            StorageReach(identity, f"/mnt/{name}", name not in self.storage_down)
            for name, identity in sorted((self.storage or {}).items())
        )
        return HostInventory(True, storage, frozenset(self.networks), self.free_memory_mib, self.memory_reserve_mib)

    def reaches_disks(self, vm: SimVm) -> bool:
        """What the real hypervisor finds: the VM's disks exist here (a mount of the same storage, healthy)."""
        if self.storage is None:
            return True
        return all(
            self.storage.get(name) == f"nfs:nas:/{name}" and name not in self.storage_down for name in vm.disks
        )

    def renews_leases(self) -> bool:
        return self.powered and self.storage_ok

    def stop_renewing(self, now: float, expiry_s: float) -> None:
        """NFS: the server keeps this host's locks until `expiry_s` after its last renewal (now), VM running or not."""
        for uuid in self.running:
            self.lease_until.setdefault(uuid, now + expiry_s)

    def writes_heartbeat(self) -> bool:
        return self.powered and self.agent_running and self.storage_ok

    def update_heartbeat(self, now: float) -> None:
        if self.writes_heartbeat():
            self.hb_stopped_at = None
        elif self.hb_stopped_at is None:
            self.hb_stopped_at = now

    def heartbeat_age_s(self, now: float) -> float:
        if self.hb_stopped_at is not None:
            return now - self.hb_stopped_at
        return (now - self.booted_at) % HEARTBEAT_INTERVAL_S


class World:
    def __init__(self, hosts: list[SimHost], vms: list[SimVm]) -> None:
        self.hosts = {host.id: host for host in hosts}
        self.hosts_by_name = {host.name: host for host in hosts}
        self.vms = {vm.uuid: vm for vm in vms}
        self.vms_by_name = {vm.name: vm for vm in vms}
        self.manager_net_up = True
        self.manager_running = True
        self.partitions: set[frozenset[HostId]] = set()  # host pairs that cannot reach each other
        # "posix": a lease is held exactly while its QEMU runs (one kernel, as in the lab); "nfs": NFSv4 semantics.
        self.lease_mode = "posix"
        self.lease_expiry_s = 90.0

    def link_up(self, host: SimHost) -> bool:
        """Can the manager and this host's agent talk?"""
        return host.powered and host.net_up and host.manager_link_up and self.manager_net_up and self.manager_running

    def reaches(self, source: SimHost, target: SimHost) -> bool:
        return (
            source.powered
            and target.powered
            and source.net_up
            and target.net_up
            and frozenset((source.id, target.id)) not in self.partitions
        )

    def lease_state(self, uuid: VmUuid, prober: SimHost, now: float) -> tuple[Literal["held", "free", "unknown"], str]:
        """What a CheckLease from `prober` reads: ("held" | "free" | "unknown", detail)."""
        if not prober.storage_ok:
            return "unknown", "the lockspace is unreachable from the prober"
        for host in self.hosts.values():
            if not host.leases:
                continue
            if uuid in host.running and (self.lease_mode == "posix" or host.renews_leases()):
                return "held", f"by a QEMU on {host.name}"
            until = host.lease_until.get(uuid) if self.lease_mode == "nfs" else None
            if until is not None and now < until:
                return "held", f"an NFS lock of {host.name}, not expired before {until:.0f} s"
        return "free", ""

    def where(self, uuid: VmUuid) -> list[HostId]:
        return sorted(host.id for host in self.hosts.values() if uuid in host.running)
