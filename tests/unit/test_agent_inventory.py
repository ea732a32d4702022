"""The agent's inventory (issue 16): storage identities from the storage itself, what counts as a change, and the
manager's reading of it (translate.inventory)."""

from __future__ import annotations

from pathlib import Path

from kvmha.agent import inventory as inv
from kvmha.manager.adapters import translate, wirecheck
from kvmha.proto.v1 import agent_pb2 as pb

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw shared:2 - proc proc rw
40 22 0:45 / /mnt/a rw shared:9 - nfs4 nas:/export/a rw,vers=4.2
41 22 0:46 / /mnt/b rw shared:10 - tmpfs tmpfs rw
42 22 0:47 / /mnt/a rw shared:11 - nfs4 other:/export/a rw
43 22 0:48 / /mnt/with\\040space rw - xfs /dev/sdb1 rw
"""


def test_mounts_and_their_identities() -> None:
    mounts = inv.parse_mountinfo(MOUNTINFO)
    by_point = {m.mount: m for m in mounts}
    assert "/proc" not in by_point  # pseudo filesystems are not storage
    assert by_point["/mnt/a"].source == "other:/export/a"  # the later mount hides the earlier one
    uuids = {"8:1": "1111-aaaa"}
    assert inv.identity(by_point["/"], uuids, "h") == "fs:1111-aaaa"
    assert inv.identity(by_point["/mnt/a"], uuids, "h") == "nfs:other:/export/a"
    assert inv.identity(by_point["/mnt/b"], uuids, "h") == "local:h:/mnt/b"
    assert "/mnt/with space" in by_point
    # no /dev/disk/by-uuid (containers): ext4/xfs derive f_fsid from their UUID; tmpfs stays local
    assert inv.identity(by_point["/"], {}, "h", lambda _: 0xBEEF) == "fsid:beef"
    assert inv.identity(by_point["/mnt/b"], {}, "h", lambda _: 0xBEEF) == "local:h:/mnt/b"


def test_this_machine_root_has_a_shared_identity() -> None:
    root = next(m for m in inv.parse_mountinfo(Path("/proc/self/mountinfo").read_text()) if m.mount == "/")
    assert not inv.identity(root, inv.filesystem_uuids(), "h", inv.statvfs_fsid).startswith("local:")


def test_collect_reports_health_and_memory(tmp_path: Path) -> None:
    class Hung(inv.HealthProbe):
        def check(self, path: str) -> str:
            return "statvfs did not answer in 2 s" if path == "/mnt/a" else ""

    report = inv.collect("h", 3000, None, ["network:default"], mountinfo=lambda: MOUNTINFO, uuids=dict, probe=Hung(),
                         fsid=None)
    health = {m.mount: m.healthy for m in report.mounts}
    assert health == {"/": True, "/mnt/a": False, "/mnt/b": True, "/mnt/with space": True}
    assert report.free_memory_mib == 3000 and not report.HasField("memory_reserve_mib")
    assert "network:default" in report.networks
    wirecheck.check(pb.AgentMessage(inventory=report))
    seen = translate.inventory(report)
    assert seen.reported and seen.free_memory_mib == 3000 and seen.memory_reserve_mib is None
    assert [s.identity for s in seen.storage if not s.healthy] == ["nfs:other:/export/a"]


def test_health_probe_answers_for_a_real_path(tmp_path: Path) -> None:
    assert inv.HealthProbe().check(str(tmp_path)) == ""
    assert "statvfs" in inv.HealthProbe().check(str(tmp_path / "missing"))


def test_what_counts_as_a_change() -> None:
    base = pb.Inventory(mounts=[pb.StorageMount(identity="nfs:a", mount="/mnt/a", healthy=True)], free_memory_mib=4096)
    same = pb.Inventory()
    same.CopyFrom(base)
    same.free_memory_mib = 4096 + inv.FREE_MEMORY_STEP_MIB - 1
    assert inv.changed(None, base)
    assert not inv.changed(base, same)
    same.free_memory_mib = 4096 + inv.FREE_MEMORY_STEP_MIB
    assert inv.changed(base, same)
    sick = pb.Inventory()
    sick.CopyFrom(base)
    sick.mounts[0].healthy = False
    assert inv.changed(base, sick)


def test_a_hello_without_inventory_is_an_older_agent() -> None:
    hello = pb.Hello(host_uuid="00000000-0000-0000-0000-000000000001", hostname="h1")
    assert not translate.hello(hello).inventory.reported
    hello.inventory.networks.append("bridge:br0")
    assert translate.hello(hello).inventory.networks == frozenset({"bridge:br0"})


def test_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 8000000 kB\nMemAvailable: 2097152 kB\n")
    assert inv.mem_available_mib(meminfo) == 2048
    assert inv.mem_available_mib(tmp_path / "none") is None
