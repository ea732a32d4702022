"""The hand-assembled boot sector and the files the lab writes (no lab needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvmha.lab import guest, host
from kvmha.lab.domain import BootDisk, domain_xml
from kvmha.lab.state import HostSpec, LabSpec


def test_boot_sector_is_one_sector_with_the_boot_signature() -> None:
    sector = guest.boot_sector()
    assert len(sector) == 512
    assert sector[-2:] == b"\x55\xaa"


def _rel8_target(code: bytes, at: int) -> int:
    """Where a 2-byte short jump at `at` lands (relative to the byte after it)."""
    offset = code[at + 1] - 256 if code[at + 1] > 127 else code[at + 1]
    return at + 2 + offset


# Length of each instruction the boot sector uses, by its first byte (rep stosw: F3 AB).
_LENGTHS = {0xFB: 1, 0xF4: 1, 0xEC: 1, 0xEF: 1, 0xFA: 1, 0xFC: 1, 0xA8: 2, 0x74: 2, 0x3C: 2, 0xEB: 2, 0x72: 2,
            0x31: 2, 0x8E: 2, 0xF3: 2, 0xBA: 3, 0xB8: 3, 0xB9: 3, 0x05: 3, 0x3D: 3}
_JUMPS = {0x74, 0xEB, 0x72}


def _instructions(code: bytes) -> list[int]:
    """The offsets where the code's instructions start, walked from the first byte."""
    starts, at = [], 0
    while at < len(code):
        starts.append(at)
        at += _LENGTHS[code[at]]
    assert at == len(code), "the walk ends on the code's last byte"
    return starts


def test_boot_sector_jumps_land_on_instructions() -> None:
    code = guest._CODE
    starts = _instructions(code)
    jumps = {at: _rel8_target(code, at) for at in starts if code[at] in _JUMPS}
    assert all(target in starts for target in jumps.values()), jumps
    poll = code.index(0xF4)  # the first hlt
    acpi = code.index(bytes([0xBA, 0x04, 0x06, 0xB8, 0x00, 0x20, 0xEF]))  # mov dx, 0x604; mov ax, 0x2000; out
    dirty = code.index(bytes([0xFA, 0xFC]))  # cli; cld
    shutdown_test = code.index(bytes([0x3C]) + guest.SHUTDOWN_CHAR)
    busy_test = code.index(bytes([0x3C]) + guest.BUSY_CHAR)
    assert jumps[shutdown_test + 2] == acpi and jumps[busy_test + 2] == dirty
    assert jumps[code.index(0x74)] == poll and jumps[busy_test + 4] == poll  # no data, or another character
    halt = jumps[acpi + 9]
    assert code[halt] == 0xF4 and halt == acpi + 8  # the halt loop after the power-off
    segment = code.index(bytes([0x8E, 0xC0]))  # mov es, ax
    assert jumps[code.index(0x72)] == segment and jumps[len(code) - 2] == dirty + 2  # next segment; next pass
    assert bytes([0xB8, 0x00, 0x10]) in code and bytes([0x3D, 0x00, 0x90]) in code  # 0x10000 up to 0x8FFFF


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (qemu-utils)")
@pytest.mark.parametrize("disk_format", guest.DISK_FORMATS)
def test_disk_images_hold_the_boot_sector(tmp_path: Path, disk_format: str) -> None:
    disk = tmp_path / f"d.{disk_format}"
    guest.make_disk(disk, disk_format)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk)], capture_output=True, text=True, check=True)
    assert f'"format": "{disk_format}"' in info.stdout
    raw = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True)
    assert raw.read_bytes()[:512] == guest.boot_sector()
    assert not list(tmp_path.glob("*.tmp-raw"))


def test_domain_xml_shares_the_raw_disk_device_but_not_the_lease() -> None:
    xml = domain_xml("vm1", guest.vm_uuid("vm1"), domain_type="kvm", disk=BootDisk(Path("/srv/d.img"), shared=True))
    assert "<shareable/>" not in xml  # that would make virtlockd take a shared lease
    assert "name='share-rw' type='bool' value='true'" in xml
    qcow2 = domain_xml("vm1", domain_type="kvm", disk=BootDisk("/srv/d.qcow2", "qcow2", shared=True))
    assert "name='share-rw'" not in qcow2
    assert guest.vm_uuid("vm1") in xml and guest.vm_uuid("vm1") == guest.vm_uuid("vm1")


def _spec(tmp_path: Path) -> tuple[LabSpec, HostSpec]:
    spec = LabSpec(state_dir=str(tmp_path), prefix="kvmhat", subnet="10.251.0.192/26", bridge="kvmhat-br0",
                   bridge_address="10.251.0.193", shared_dir=str(tmp_path / "shared"), manager="10.251.0.193:50051",
                   domain_type="kvm", bmc_user="admin", bmc_password="pw")  # fmt: skip
    h1 = HostSpec(name="h1", index=1, netns="kvmhat-h1", veth="kvmhat-h1", address="10.251.0.203", bmc_port=623,
                  host_uuid="6f1d3a52-9c0e-4a55-8d11-000000000001", dir=str(tmp_path / "hosts" / "h1"))  # fmt: skip
    spec.hosts.append(h1)
    return spec, h1


def test_agent_toml_is_accepted_by_the_agent(tmp_path: Path) -> None:
    config_module = pytest.importorskip("kvmha.agent.config")
    spec, h1 = _spec(tmp_path)
    path = tmp_path / "agent.toml"
    path.write_text(host.agent_toml(spec, h1, {"isolation.policy": "destroy-vms", "isolation.after_s": 12.5}))
    config = config_module.load_config(["--config", str(path)], environ={})
    assert config.host_uuid == h1.host_uuid
    assert config.managers == ("10.251.0.193:50051",)
    assert config.management_address == "10.251.0.203"
    assert config.storage_paths == (spec.shared_dir,)
    assert config.isolation_policy == "destroy-vms" and config.isolation_after_s == 12.5


def test_host_files_configure_leases_on_the_shared_storage(tmp_path: Path) -> None:
    spec, h1 = _spec(tmp_path)
    host.prepare(spec, h1, {})
    etc = Path(h1.dir) / "etc-libvirt"
    assert 'lock_manager = "lockd"' in (etc / "qemu.conf").read_text()
    lockd = (etc / "qemu-lockd.conf").read_text()
    assert "auto_disk_leases = 1" in lockd and f'file_lockspace_dir = "{spec.shared_dir}/leases"' in lockd
    startcmd = host.startcmd(h1)
    assert " -m kvmha.lab.power kvmhat-h1 -- ip netns exec kvmhat-h1 unshare --pid --fork --kill-child --mount-proc" \
        in startcmd
    assert '"' not in startcmd  # ipmi_sim's lan.conf cannot quote it
