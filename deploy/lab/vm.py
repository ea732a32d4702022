"""Lab VMs: small guests with a qcow2 disk on the shared storage, driven with virsh on the host that runs them.

A VM's definition is kept in <shared>/vms/<name>.xml so that any host can define and start the same VM (same
name, UUID and disk) — which is what a failover does, and what virtlockd must refuse while another host runs it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kvmha.lab import proc
from kvmha.lab.domain import BootDisk, domain_xml
from kvmha.lab.guest import BUSY_CHAR, DISK_FORMATS, SHUTDOWN_CHAR, make_disk, vm_uuid
from kvmha.lab.host import DISKS_DIR_NAME
from kvmha.lab.state import QEMU_COMM, LabError

if TYPE_CHECKING:
    from kvmha.lab.lab import Lab


def xml_path(lab: Lab, name: str) -> Path:
    return Path(lab.spec.shared_dir) / "vms" / f"{name}.xml"


def disk_path(lab: Lab, name: str, disk_format: str = "raw") -> Path:
    return Path(lab.spec.shared_dir) / DISKS_DIR_NAME / f"{name}.{'img' if disk_format == 'raw' else disk_format}"


def prepare(lab: Lab, name: str, memory_mib: int = 32, disk_format: str = "raw") -> Path:
    """Write the VM's disk and definition on the shared storage (once); returns the definition's path."""
    if not 16 <= memory_mib <= 1024:
        raise LabError("memory between 16 and 1024 MiB")
    if disk_format not in DISK_FORMATS:
        raise LabError(f"disk format {disk_format!r} is not one of {DISK_FORMATS}")
    disk = disk_path(lab, name, disk_format)
    if not disk.exists():
        make_disk(disk, disk_format)
    xml = xml_path(lab, name)
    xml.write_text(domain_xml(name, vm_uuid(name), domain_type=lab.spec.domain_type, memory_mib=memory_mib,
                              disk=BootDisk(disk, disk_format, shared=True)))
    return xml


def define(lab: Lab, name: str, host: str) -> None:
    """Define the (already prepared) VM on a host, as a manager restarting it there would."""
    xml = xml_path(lab, name)
    if not xml.exists():
        raise LabError(f"no VM {name!r} in this lab (no {xml})")
    lab.virsh(host, "define", str(xml))


def create(lab: Lab, name: str, host: str, memory_mib: int = 32, start: bool = True, disk_format: str = "raw") -> None:
    """Prepare, define and (by default) start the VM on `host` directly with virsh."""
    prepare(lab, name, memory_mib, disk_format)
    define(lab, name, host)
    if start:
        lab.virsh(host, "start", name)


def qemu_of(lab: Lab, name: str) -> list[tuple[str, proc.ProcInfo]]:
    """(host, QEMU process) for every host running the VM — more than one would be a split brain."""
    found = []
    for host in lab.hosts:
        for p in lab.processes(host.name):
            if p.comm == QEMU_COMM and _guest_name(p.pid) == name:
                found.append((host.name, p))
    return found


def _guest_name(pid: int) -> str | None:
    argv = proc.cmdline(pid)
    for flag, value in itertools.pairwise(argv):
        if flag == "-name":
            # libvirt passes "-name guest=NAME,debug-threads=on"; a comma in NAME is doubled.
            first = value.replace(",,", "\0").split(",")[0].replace("\0", ",")
            return first.removeprefix("guest=")
    return None


def running_everywhere(lab: Lab) -> dict[str, dict[str, int]]:
    """Host -> {VM name: QEMU PID} for every powered-on host, from one pass over /proc: cheap enough to sample
    many times a second while a test watches for a VM running on two hosts at once."""
    host_of_ns: dict[int, str] = {}
    for host in lab.hosts:
        init = lab.init(host.name)
        ns = proc.pid_ns(init.pid) if init else None
        if ns is not None:
            host_of_ns[ns] = host.name
    out: dict[str, dict[str, int]] = {name: {} for name in host_of_ns.values()}
    for pid in proc.all_pids():
        info = proc.info(pid)
        if info is None or info.zombie or info.comm != QEMU_COMM:
            continue
        host_name = host_of_ns.get(proc.pid_ns(pid) or -1)
        guest = _guest_name(pid)
        if host_name is not None and guest:
            out[host_name][guest] = pid
    return out


def running_on(lab: Lab, host: str) -> dict[str, int]:
    """VM name -> QEMU PID for the VMs whose QEMU runs in the host (from /proc, not from libvirt)."""
    out: dict[str, int] = {}
    for p in lab.processes(host):
        if p.comm == QEMU_COMM:
            guest = _guest_name(p.pid)
            if guest:
                out[guest] = p.pid
    return out


def where(lab: Lab, name: str) -> tuple[str, proc.ProcInfo]:
    found = qemu_of(lab, name)
    if not found:
        raise LabError(f"VM {name!r} runs nowhere in the lab")
    if len(found) > 1:
        raise LabError(f"VM {name!r} runs on several hosts: {[h for h, _ in found]}")
    return found[0]


def kill(lab: Lab, name: str) -> str:
    """SIGKILL the VM's QEMU by PID (a crash as libvirt sees it); returns the host it ran on."""
    host, qemu = where(lab, name)
    proc.kill(qemu.pid, qemu.start_ticks, signal.SIGKILL)
    if proc.wait_gone([qemu], 10.0):
        raise LabError(f"QEMU of {name} (pid {qemu.pid}) survived SIGKILL")
    return host


@contextlib.contextmanager
def _serial(lab: Lab, name: str) -> Iterator[tuple[str, proc.ProcInfo, int]]:
    """(host, QEMU, fd): the VM's COM1 (a pty) open for writing, through the host's root, so the path is the one QEMU
    gave to that host's libvirtd. Held open while the caller writes: QEMU reads a pty only once it has seen the other
    side opened (it checks about once a second), and a write followed at once by close() is lost; callers repeat
    their character for the same reason."""
    host, qemu = where(lab, name)
    pty = lab.virsh(host, "ttyconsole", name).strip()
    if not pty.startswith("/dev/pts/"):
        raise LabError(f"{name}: no pty serial console ({pty!r})")
    init = lab.init(host)
    assert init is not None
    fd = os.open(f"/proc/{init.pid}/root{pty}", os.O_WRONLY | os.O_NOCTTY)
    try:
        yield host, qemu, fd
    finally:
        os.close(fd)


def guest_shutdown(lab: Lab, name: str, timeout_s: float = 15.0) -> str:
    """Ask the guest itself to power off: send 'S' to its COM1 and wait until its QEMU has ended; returns the host it
    ran on."""
    with _serial(lab, name) as (host, qemu, fd):
        deadline = time.monotonic() + timeout_s
        while proc.alive(qemu.pid, qemu.start_ticks):
            if time.monotonic() > deadline:
                raise LabError(f"{name}: the guest did not power off within {timeout_s:.0f} s")
            os.write(fd, SHUTDOWN_CHAR)
            proc.wait_gone([qemu], 0.5)
    return host


# A guest that took a quarter of a core over BUSY_SAMPLE_S is in its dirty loop: idle, the lab's guest sleeps in hlt
# (about 1 % of a core), and a busy one gets a core less what a loaded 2-core machine takes from it.
BUSY_CPU_SHARE = 0.25
BUSY_SAMPLE_S = 0.5


def guest_busy(lab: Lab, name: str, timeout_s: float = 15.0) -> str:
    """Put the guest under load: send 'D' to its COM1 until its QEMU burns a vCPU (the guest's loop rewriting 512 KiB
    of memory, kvmha.lab.guest); returns the host it runs on. It stays busy until the VM is destroyed."""
    with _serial(lab, name) as (host, qemu, fd):
        deadline = time.monotonic() + timeout_s
        while cpu_share(qemu.pid, BUSY_SAMPLE_S) < BUSY_CPU_SHARE:
            if time.monotonic() > deadline or not proc.alive(qemu.pid, qemu.start_ticks):
                raise LabError(f"{name}: the guest did not get busy within {timeout_s:.0f} s")
            os.write(fd, BUSY_CHAR)
    return host


def cpu_share(pid: int, window_s: float) -> float:
    """Cores the process used over the next `window_s` (user + system time from /proc/PID/stat; a KVM guest's own
    time counts as the vCPU thread's user time). 0.0 when it is gone."""
    def used_s() -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    before, started = used_s(), time.monotonic()
    time.sleep(window_s)
    after = used_s()
    if before is None or after is None:
        return 0.0
    return (after - before) / (time.monotonic() - started)


def domstate(lab: Lab, host: str, name: str) -> tuple[str, str]:
    """('running', 'booted'), ('shut off', 'crashed'), ... as `virsh domstate --reason` says on that host."""
    text = lab.virsh(host, "domstate", name, "--reason").strip()
    state, _, reason = text.partition(" (")
    return state, reason.rstrip(")")
