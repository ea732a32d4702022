"""Disk leases without virtlockd: the lock manager configuration, which disks have leases, their file names, and the
F_GETLK probe against locks held by another process (a process never sees its own POSIX locks with F_GETLK, and
closing any descriptor of the file would drop them: the holder must be someone else). The same probe against a real
virtlockd is tests/lab/test_lease.py."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmha.agent import lease
from kvmha.agent.commands import CommandRunner
from kvmha.agent.hypervisor import FakeHypervisor
from kvmha.proto.v1 import agent_pb2 as pb

HOLDER = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
kind = fcntl.F_RDLCK if sys.argv[2] == "read" else fcntl.F_WRLCK
fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", kind, 0, 0, 1, 0))
print("locked", flush=True)
time.sleep(60)
"""


def hold(path: Path, kind: str = "write") -> subprocess.Popen[str]:
    """Another process holding an fcntl lock on byte 0 of `path`, as virtlockd does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def lockspace(tmp_path: Path) -> Iterator[Path]:
    space = tmp_path / "leases"
    space.mkdir()
    yield space


def conf(tmp_path: Path, qemu: str, lockd: str | None = None) -> lease.LockConfig:
    (tmp_path / "qemu.conf").write_text(qemu)
    if lockd is not None:
        (tmp_path / "qemu-lockd.conf").write_text(lockd)
    return lease.read_lock_config(str(tmp_path))


def test_lock_manager_configuration_is_read_as_libvirt_reads_it(tmp_path: Path) -> None:
    lab = conf(tmp_path, '# comment\nuser = "root"\nlock_manager = "lockd"\n',
               'auto_disk_leases = 1\nrequire_lease_for_disks = 1\nfile_lockspace_dir = "/srv/shared/leases"\n')
    assert lab == lease.LockConfig("lockd", True, "/srv/shared/leases", True)
    assert lab.leases_on
    (tmp_path / "qemu-lockd.conf").unlink()
    assert lease.read_lock_config(str(tmp_path)) == lease.LockConfig("lockd", True, "", False)  # lockd's defaults
    assert conf(tmp_path, '#lock_manager = "lockd"\n') == lease.LockConfig()
    assert not lease.LockConfig().leases_on
    assert conf(tmp_path, 'lock_manager = "sanlock"\n').lock_manager == "sanlock"
    manual = conf(tmp_path, 'lock_manager = "lockd"\n', "auto_disk_leases = 0\n")
    assert not manual.leases_on and manual.require_lease_for_disks
    assert "cannot read" in lease.read_lock_config(str(tmp_path / "nowhere")).error


def test_which_disks_have_leases() -> None:
    xml = """<domain type='kvm'><name>v</name><devices>
      <disk type='file' device='disk'><source file='/srv/disks/v.img'/><target dev='vda'/></disk>
      <disk type='file' device='disk'><source file='/srv/disks/base.iso'/><target dev='vdb'/><readonly/></disk>
      <disk type='file' device='disk'><source file='/srv/disks/shared.img'/><target dev='vdc'/><shareable/></disk>
      <disk type='block' device='disk'><source dev='/dev/vg/v'/><target dev='vdd'/></disk>
      <disk type='network' device='disk'><source protocol='rbd' name='pool/v'/><target dev='vde'/></disk>
      <disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdf'/></disk>
      <disk type='file' device='cdrom'><target dev='hdc'/></disk>
    </devices></domain>"""
    disks, notes = lease.leased_disks(xml)
    assert disks == [lease.LeasedDisk("/srv/disks/v.img", False), lease.LeasedDisk("/srv/disks/shared.img", True),
                     lease.LeasedDisk("/dev/vg/v", False)]
    assert any("vde: a network disk" in n for n in notes) and any("vdf: a storage pool volume" in n for n in notes)
    with pytest.raises(ValueError, match="malformed"):
        lease.leased_disks("<domain>")


def test_the_lease_file_is_the_sha256_of_the_path_as_written() -> None:
    assert lease.lease_file("/srv/a.img", "/l") == "/l/" + hashlib.sha256(b"/srv/a.img").hexdigest()
    assert lease.lease_file("/srv//a.img", "/l") != lease.lease_file("/srv/a.img", "/l")  # no canonicalisation
    assert lease.lease_file("/srv/a.img", "") == "/srv/a.img"  # direct leases: the disk itself


def test_a_lease_held_by_another_process_reads_held_then_free(lockspace: Path) -> None:
    path = Path(lease.lease_file("/srv/disks/v.img", str(lockspace)))
    assert lease.probe_lease_file(str(path))[0] is lease.LeaseState.FREE  # never taken: no file
    assert not path.exists()  # and the probe did not create one
    holder = hold(path)
    try:
        state, pid, detail = lease.probe_lease_file(str(path))
        assert state is lease.LeaseState.HELD and pid == holder.pid and "write lock" in detail
        # Probing again (open + close of the file in this process) changes nothing for the holder.
        assert lease.probe_lease_file(str(path))[0] is lease.LeaseState.HELD
    finally:
        holder.kill()
        holder.wait()
    assert lease.probe_lease_file(str(path))[0] is lease.LeaseState.FREE  # the holder died: the kernel dropped it
    reader = hold(path, "read")
    try:
        assert lease.probe_lease_file(str(path))[:2] == (lease.LeaseState.HELD, reader.pid)  # <shareable/>
    finally:
        reader.kill()
        reader.wait()


def test_check_lease_sums_up_and_a_missing_lockspace_is_unknown_not_free(lockspace: Path) -> None:
    config = lease.LockConfig("lockd", True, str(lockspace), True)
    disks = [lease.LeasedDisk("/srv/a.img", False), lease.LeasedDisk("/srv/b.img", False)]
    assert lease.check_lease(disks, config, None, 2.0).state is lease.LeaseState.FREE
    holder = hold(Path(lease.lease_file("/srv/b.img", str(lockspace))))
    try:
        outcome = lease.check_lease(disks, config, None, 2.0)
        assert outcome.state is lease.LeaseState.HELD
        assert [d.state for d in outcome.disks] == [lease.LeaseState.FREE, lease.LeaseState.HELD]
    finally:
        holder.kill()
        holder.wait()
    gone = lease.check_lease(disks, config, str(lockspace / "not-mounted"), 2.0)
    assert gone.state is lease.LeaseState.UNKNOWN and "not a directory" in gone.detail
    assert lease.check_lease(disks, lease.LockConfig(), None, 2.0).state is lease.LeaseState.UNKNOWN
    assert lease.check_lease([], config, None, 2.0).state is lease.LeaseState.UNKNOWN


def test_a_hung_probe_answers_unknown_by_the_deadline(lockspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "probe_lease_file", lambda _path: time.sleep(30))  # a hung NFS server
    started = time.monotonic()
    outcome = lease.check_lease([lease.LeasedDisk("/srv/a.img", False)],
                                lease.LockConfig("lockd", True, str(lockspace)), None, 0.5)
    assert outcome.state is lease.LeaseState.UNKNOWN and "still running" in outcome.detail
    assert time.monotonic() - started < 2.0


def test_the_check_lease_command(lockspace: Path) -> None:
    runner = CommandRunner(FakeHypervisor(), (), 22, lock_config=lease.LockConfig("lockd", True, str(lockspace)))
    xml = ("<domain><name>v</name><uuid>8f6f5ba6-5d8c-4f5e-9a44-6bd0fb1e1c11</uuid><devices>"
           "<disk type='file' device='disk'><source file='/srv/v.img'/><target dev='vda'/></disk></devices></domain>")
    holder = hold(Path(lease.lease_file("/srv/v.img", str(lockspace))))
    try:
        result = runner.run(pb.Command(request_id="l1", check_lease=pb.CheckLease(
            vm_uuid="8f6f5ba6-5d8c-4f5e-9a44-6bd0fb1e1c11", domain_xml=xml, timeout_s=2)))
    finally:
        holder.kill()
        holder.wait()
    assert result.ok and result.lease.state == pb.LEASE_HELD, result
    assert result.lease.disks[0].holder_pid == holder.pid
    assert result.lease.disks[0].lease_path == lease.lease_file("/srv/v.img", str(lockspace))
    by_path = runner.run(pb.Command(request_id="l2", check_lease=pb.CheckLease(disk_paths=["/srv/v.img"])))
    assert by_path.ok and by_path.lease.state == pb.LEASE_FREE
    for bad in (pb.CheckLease(disk_paths=["relative.img"]), pb.CheckLease(domain_xml="<oops"),
                pb.CheckLease(disk_paths=["/a"], lockspace_dir="rel"), pb.CheckLease(vm_uuid="nope")):
        refused = runner.run(pb.Command(request_id=f"bad-{bad.SerializeToString().hex()}", check_lease=bad))
        assert not refused.ok and refused.code == pb.ERROR_INVALID_ARGUMENT, refused
