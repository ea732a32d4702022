"""Disk leases (libvirt's virtlockd): this host's lock manager configuration, and the CheckLease probe.

With `lock_manager = "lockd"` in qemu.conf and `auto_disk_leases` (lockd's default), libvirt asks virtlockd for a
lease on every writable disk of a VM before its CPUs start: an fcntl write lock on byte 0 of a lease file (a read
lock for a <shareable/> disk; none for a read-only one), held while QEMU runs and dropped by the kernel when the
holding virtlockd dies. With `file_lockspace_dir` set, the lease file is `<dir>/<sha256 of the disk path>`, the
path hashed exactly as written in the domain XML (libvirt does not canonicalise it: two spellings of one path are
two leases); without it the lease is the disk file itself ("direct"). /dev paths may be leased by LVM or SCSI id
when `lvm_lockspace_dir` / `scsi_lockspace_dir` are set: those cannot be derived from the XML and read UNKNOWN.

The probe asks the kernel (fcntl F_GETLK on byte 0) whether anyone holds the lease, without taking it: a
take-and-release test could make a concurrent virtlockd's acquire fail. The lease file is opened without O_CREAT (a
missing file was never taken in this lockspace: FREE), but a missing lockspace *directory* is UNKNOWN (the share
may not be mounted here). This process never holds a lock on a lease file, which matters: closing any descriptor
of a file drops every POSIX lock the closing process holds on it (so the probe must never run in a process that
holds leases, and tests hold their locks in another process). On NFS the answer comes from the server (NLM or
NFSv4 LOCKT), unless the share is mounted with `nolock`/`local_lock=`: then it is this host's kernel only and says
nothing about other hosts; and a dead client's lock stays "held" until the server expires it (see
docs/watchdog.md). Every probe runs in a daemon thread and the answer comes by the deadline (a hung NFS read
becomes UNKNOWN, never a stalled command).

`python -m kvmha.agent.lease --domain-xml FILE [--lockspace-dir DIR]` prints the probe's answer as JSON (used by
the lab's contract test; handy for an operator too).
"""

from __future__ import annotations

import argparse
import enum
import errno
import fcntl
import hashlib
import json
import os
import re
import struct
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 60.0
_CONF_LINE = re.compile(r"""^\s*(\w+)\s*=\s*("(?:[^"\\]|\\.)*"|'[^']*'|-?\d+)""")


class LeaseState(enum.Enum):
    HELD = "held"
    FREE = "free"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class LockConfig:
    lock_manager: str = ""  # "" when qemu.conf says nothing (libvirt's "nop": no leases)
    auto_disk_leases: bool = True
    file_lockspace_dir: str = ""
    require_lease_for_disks: bool = False
    lvm_lockspace_dir: str = ""
    scsi_lockspace_dir: str = ""
    error: str = ""

    @property
    def leases_on(self) -> bool:
        return self.lock_manager == "lockd" and self.auto_disk_leases and not self.error


def _conf_values(text: str) -> dict[str, str | int]:
    """The scalar settings of a libvirt .conf file (`key = "string"` or `key = 123`; lists are skipped)."""
    out: dict[str, str | int] = {}
    for line in text.splitlines():
        match = _CONF_LINE.match(line)
        if match:
            key, raw = match.groups()
            out[key] = raw[1:-1] if raw[0] in "\"'" else int(raw)
    return out


def read_lock_config(config_dir: str = "/etc/libvirt") -> LockConfig:
    """qemu.conf's lock_manager and, for lockd, qemu-lockd.conf's lease settings; never raises."""
    try:
        qemu = _conf_values((Path(config_dir) / "qemu.conf").read_text(errors="replace"))
    except OSError as exc:
        return LockConfig(error=f"cannot read {config_dir}/qemu.conf: {exc.strerror}")
    manager = str(qemu.get("lock_manager", "")).strip()
    if manager in ("", "nop"):
        return LockConfig(lock_manager="")
    if manager != "lockd":
        return LockConfig(lock_manager=manager)  # sanlock: leases exist, but not ones this probe can read
    try:
        lockd = _conf_values((Path(config_dir) / "qemu-lockd.conf").read_text(errors="replace"))
    except FileNotFoundError:
        lockd = {}  # lockd's defaults: automatic direct leases on the disk files
    except OSError as exc:
        return LockConfig(lock_manager="lockd", error=f"cannot read {config_dir}/qemu-lockd.conf: {exc.strerror}")
    auto = bool(lockd.get("auto_disk_leases", 1))
    return LockConfig(
        lock_manager="lockd", auto_disk_leases=auto,
        file_lockspace_dir=str(lockd.get("file_lockspace_dir", "")),
        # lockd: "if auto_disk_leases is disabled, this setting defaults to enabled, otherwise to disabled"
        require_lease_for_disks=bool(lockd.get("require_lease_for_disks", 0 if auto else 1)),
        lvm_lockspace_dir=str(lockd.get("lvm_lockspace_dir", "")),
        scsi_lockspace_dir=str(lockd.get("scsi_lockspace_dir", "")))


@dataclass(frozen=True)
class LeasedDisk:
    path: str  # exactly as written in the XML
    shared: bool


def leased_disks(domain_xml: str) -> tuple[list[LeasedDisk], list[str]]:
    """The disks virtlockd leases (writable file/block/dir sources), and notes on the ones it does not."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as exc:
        raise ValueError(f"malformed domain XML: {exc}") from exc
    if root.tag != "domain":
        raise ValueError(f"root element is <{root.tag}>, expected <domain>")
    disks: list[LeasedDisk] = []
    notes: list[str] = []
    for disk in root.iterfind("./devices/disk"):
        kind = disk.get("type", "file")
        source = disk.find("source")
        attribute = {"file": "file", "block": "dev", "dir": "dir"}.get(kind)
        path = source.get(attribute) if source is not None and attribute else None
        target_element = disk.find("target")
        target = target_element.get("dev", "?") if target_element is not None else "?"
        if kind == "volume":
            notes.append(f"{target}: a storage pool volume (its path is known to libvirt only): not probed")
        elif attribute is None:
            notes.append(f"{target}: a {kind} disk has no virtlockd lease")
        elif not path:
            continue  # an empty cdrom drive
        elif disk.find("readonly") is not None:
            continue  # read-only disks take no lease
        else:
            disks.append(LeasedDisk(path, shared=disk.find("shareable") is not None))
    return disks, notes


def lease_file(disk_path: str, lockspace_dir: str) -> str:
    """The lease of a disk: <lockspace>/<sha256 hex of the path as written>, or the disk itself (direct)."""
    if not lockspace_dir:
        return disk_path
    return os.path.join(lockspace_dir, hashlib.sha256(disk_path.encode()).hexdigest())


@dataclass(frozen=True)
class DiskLeaseOutcome:
    disk_path: str
    lease_path: str
    state: LeaseState
    shared: bool
    holder_pid: int = 0
    detail: str = ""


def probe_lease_file(path: str) -> tuple[LeaseState, int, str]:
    """F_GETLK on byte 0 of `path`: (state, holder pid as seen here, detail). Never creates or locks anything."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        return LeaseState.FREE, 0, "no lease file: never taken in this lockspace"
    except OSError as exc:
        return LeaseState.UNKNOWN, 0, f"cannot open {path}: {exc.strerror}"
    try:
        # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid (+ padding).
        query = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    except OSError as exc:
        hint = " (NFS without a lock service?)" if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP) else ""
        return LeaseState.UNKNOWN, 0, f"F_GETLK on {path}: {exc.strerror}{hint}"
    finally:
        os.close(fd)  # safe: this process holds no lock on the file (see the module docstring)
    l_type, _whence, _start, _len, l_pid = struct.unpack("hhqqi4x", answer)
    if l_type == fcntl.F_UNLCK:
        return LeaseState.FREE, 0, "not locked"
    kind = "write" if l_type == fcntl.F_WRLCK else "read"
    return LeaseState.HELD, int(l_pid), f"{kind} lock held (pid {l_pid} as seen from here)"


@dataclass(frozen=True)
class LeaseOutcome:
    state: LeaseState
    lockspace_dir: str
    disks: list[DiskLeaseOutcome] = field(default_factory=list)
    detail: str = ""


def _probe_all(disks: Sequence[LeasedDisk], config: LockConfig, lockspace_dir: str) -> list[DiskLeaseOutcome]:
    out = []
    for disk in disks:
        path = lease_file(disk.path, lockspace_dir)
        if disk.path.startswith("/dev") and (config.lvm_lockspace_dir or config.scsi_lockspace_dir):
            out.append(DiskLeaseOutcome(disk.path, "", LeaseState.UNKNOWN, disk.shared, 0,
                                        "a /dev disk may be leased by its LVM or SCSI id: not derivable here"))
            continue
        state, pid, detail = probe_lease_file(path)
        out.append(DiskLeaseOutcome(disk.path, path, state, disk.shared, pid, detail))
    return out


def check_lease(disks: Sequence[LeasedDisk], config: LockConfig, lockspace_dir: str | None,
                timeout_s: float, notes: Sequence[str] = ()) -> LeaseOutcome:
    """Probe every leased disk; answers within `timeout_s` whatever the storage does."""
    space = config.file_lockspace_dir if lockspace_dir is None else lockspace_dir
    if lockspace_dir is None and not config.leases_on:
        why = config.error or (f"lock manager {config.lock_manager!r} on this host" if config.lock_manager
                               else "no lock manager on this host (qemu.conf lock_manager)")
        return LeaseOutcome(LeaseState.UNKNOWN, space, [], f"cannot probe leases: {why}")
    if not disks:
        return LeaseOutcome(LeaseState.UNKNOWN, space, [], "; ".join(["no disk with a lease", *notes]))
    result: list[list[DiskLeaseOutcome]] = []
    error: list[str] = []

    def run() -> None:
        try:
            if space and not os.path.isdir(space):
                error.append(f"lockspace {space} is not a directory here (shared storage not mounted?)")
                return
            result.append(_probe_all(disks, config, space))
        except Exception as exc:  # reported, never raised into the command
            error.append(f"probe failed: {exc!r}")

    worker = threading.Thread(target=run, name="lease-probe", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return LeaseOutcome(LeaseState.UNKNOWN, space, [], f"probe still running after {timeout_s:g} s "
                            "(storage hung?)")
    if error:
        return LeaseOutcome(LeaseState.UNKNOWN, space, [], error[0])
    outcomes = result[0]
    states = {d.state for d in outcomes}
    state = LeaseState.HELD if LeaseState.HELD in states else \
        LeaseState.FREE if states == {LeaseState.FREE} and not notes else LeaseState.UNKNOWN
    summary = [f"{d.disk_path}: {d.state.value} ({d.detail})" for d in outcomes]
    return LeaseOutcome(state, space, outcomes, "; ".join([*summary, *notes]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvmha.agent.lease",
                                description="Probe a VM's virtlockd disk leases without taking them.")
    p.add_argument("--domain-xml", required=True, help="the VM's domain XML file")
    p.add_argument("--lockspace-dir", default=None, help="default: file_lockspace_dir of qemu-lockd.conf")
    p.add_argument("--config-dir", default="/etc/libvirt")
    p.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S)
    args = p.parse_args(argv)
    disks, notes = leased_disks(Path(args.domain_xml).read_text())
    started = time.monotonic()
    outcome = check_lease(disks, read_lock_config(args.config_dir), args.lockspace_dir, args.timeout_s, notes)
    report = asdict(outcome)
    report["state"] = outcome.state.value
    report["disks"] = [{**asdict(d), "state": d.state.value} for d in outcome.disks]
    report["took_s"] = round(time.monotonic() - started, 3)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
