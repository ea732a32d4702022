"""What this host offers a VM besides CPUs (issue 16): the storage it reaches, its networks and bridges, its free
memory and the memory kept for the hypervisor. Sent in Hello and again when it changes (agent/link.py).

Invariants:
- A storage's identity comes from the storage, never from its path, so the manager can tell the same export mounted
  on two hosts from two different things mounted at the same path: NFS "nfs:SERVER:EXPORT" (the mount source),
  a block filesystem "fs:UUID" (/dev/disk/by-uuid) or "fsid:HEX" (statvfs, derived from the UUID), anything
  else "local:HOST_UUID:MOUNT" (seen by nobody else).
- Reading the inventory never hangs the agent: it runs in a worker thread, and an NFS mount's statvfs gets
  `HEALTH_TIMEOUT_S`; one that does not answer is reported unhealthy (and not asked again while its probe hangs).
- Pseudo filesystems (proc, sysfs, cgroup, ...) are not storage and are left out.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kvmha.proto.v1 import agent_pb2 as pb

HEALTH_TIMEOUT_S = 2.0
MAX_MOUNTS = 256
FREE_MEMORY_STEP_MIB = 512  # a change of free memory smaller than this is not worth a message
PSEUDO = frozenset({
    "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs", "securityfs", "pstore", "bpf",
    "autofs", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "devtmpfs", "nsfs", "rpc_pipefs", "efivarfs",
    "selinuxfs", "ramfs",
})


@dataclass(frozen=True, slots=True)
class Mount:
    mount: str
    fstype: str
    source: str
    device: str  # "major:minor"


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/self/mountinfo lines -> real mounts (a later mount over the same path hides the earlier one)."""
    found: dict[str, Mount] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2 or tail[0] in PSEUDO:
            continue
        point = fields[4].replace("\\040", " ")
        found.pop(point, None)
        found[point] = Mount(point, tail[0], tail[1], fields[2])
    return list(found.values())[:MAX_MOUNTS]


def identity(mount: Mount, uuids: dict[str, str], host_uuid: str, fsid: Callable[[str], int] | None = None) -> str:
    """NFS: the export; a block filesystem: its UUID (/dev/disk/by-uuid, else statvfs's f_fsid, which ext4, xfs and
    btrfs derive from that UUID); anything else (tmpfs: f_fsid 0) is local to this host."""
    if mount.fstype.startswith("nfs"):
        return f"nfs:{mount.source}"
    uuid = uuids.get(mount.device)
    if uuid:
        return f"fs:{uuid}"
    number = 0
    if fsid is not None and mount.fstype not in ("tmpfs", "overlay", "fuse", "squashfs"):
        try:
            number = fsid(mount.mount)
        except OSError:
            number = 0
    return f"fsid:{number:x}" if number else f"local:{host_uuid}:{mount.mount}"


def statvfs_fsid(path: str) -> int:
    return int(os.statvfs(path).f_fsid)


def filesystem_uuids(by_uuid: Path = Path("/dev/disk/by-uuid")) -> dict[str, str]:
    """'major:minor' -> filesystem UUID."""
    uuids: dict[str, str] = {}
    try:
        entries = list(by_uuid.iterdir())
    except OSError:
        return uuids
    for entry in entries:
        try:
            rdev = os.stat(entry).st_rdev
        except OSError:
            continue
        uuids[f"{os.major(rdev)}:{os.minor(rdev)}"] = entry.name
    return uuids


def bridges(sys_net: Path = Path("/sys/class/net")) -> list[str]:
    try:
        return sorted(f"bridge:{d.name}" for d in sys_net.iterdir() if (d / "bridge").is_dir())
    except OSError:
        return []


class HealthProbe:
    """statvfs with a deadline, one probe in flight per mount: a hung NFS server costs one stuck thread, not many."""

    def __init__(self, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._hanging: set[str] = set()
        self._lock = threading.Lock()

    def check(self, path: str) -> str:
        """'' when healthy, else why not."""
        with self._lock:
            if path in self._hanging:
                return "statvfs still hangs"
        result: list[str] = []

        def probe() -> None:
            try:
                os.statvfs(path)
                result.append("")
            except OSError as error:
                result.append(f"statvfs: {error.strerror}")
            with self._lock:
                self._hanging.discard(path)

        with self._lock:
            self._hanging.add(path)
        worker = threading.Thread(target=probe, name="kvmha-statvfs", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        return result[0] if result else f"statvfs did not answer in {self.timeout_s:g} s"


def collect(
    host_uuid: str, free_memory_mib: int | None, reserve_mib: int | None, networks: Iterable[str] = (),
    *, mountinfo: Callable[[], str] = lambda: Path("/proc/self/mountinfo").read_text(),
    uuids: Callable[[], dict[str, str]] = filesystem_uuids, probe: HealthProbe | None = None,
    fsid: Callable[[str], int] | None = statvfs_fsid,
) -> pb.Inventory:
    """The inventory now (blocking: call it in a worker thread)."""
    inventory = pb.Inventory(networks=sorted(set(networks) | set(bridges())))
    try:
        mounts = parse_mountinfo(mountinfo())
    except OSError:
        mounts = []
    known = uuids()
    for mount in mounts:
        detail = probe.check(mount.mount) if probe is not None and mount.fstype.startswith("nfs") else ""
        inventory.mounts.append(pb.StorageMount(identity=identity(mount, known, host_uuid, fsid)[:2000],
                                                mount=mount.mount, healthy=not detail, detail=detail))
    if free_memory_mib is not None:
        inventory.free_memory_mib = free_memory_mib
    if reserve_mib is not None:
        inventory.memory_reserve_mib = reserve_mib
    return inventory


def mem_available_mib(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable (what can be given to a new VM without swapping: free plus reclaimable cache); None unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def changed(before: pb.Inventory | None, now: pb.Inventory) -> bool:
    """Worth telling the manager: storage, networks or reserve differ, or free memory moved by a step."""
    if before is None:
        return True
    if list(before.mounts) != list(now.mounts) or list(before.networks) != list(now.networks):
        return True
    if before.HasField("memory_reserve_mib") != now.HasField("memory_reserve_mib"):
        return True
    if before.memory_reserve_mib != now.memory_reserve_mib:
        return True
    return abs(before.free_memory_mib - now.free_memory_mib) >= FREE_MEMORY_STEP_MIB
