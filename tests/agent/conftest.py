"""Fixtures of the agent tests: a private libvirtd (session-wide), domain XML, a fake manager."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.agent.fake_manager import FakeManager
from tests.support import libvirtd as private_libvirtd_module
from tests.support.libvirtd import PrivateLibvirtd


def domain_xml(name: str, vm_uuid: str, domain_type: str = "qemu", boot_image: str | None = None) -> str:
    """A minimal domain (no disk). With `boot_image`, it boots that raw disk and gets ACPI (see guest_poweroff)."""
    disk = features = boot = ""
    if boot_image is not None:
        disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{boot_image}'/>"
                "<target dev='hda' bus='ide'/></disk>")
        features, boot = "<features><acpi/></features>", "<boot dev='hd'/>"
    return (f"<domain type='{domain_type}'><name>{name}</name><uuid>{vm_uuid}</uuid>"
            "<memory unit='MiB'>32</memory><vcpu>1</vcpu>"
            f"<os><type arch='x86_64' machine='pc'>hvm</type>{boot}</os>{features}"
            f"<devices>{disk}<serial type='pty'/><console type='pty'/></devices></domain>")


def write_poweroff_boot_sector(path: str) -> str:
    """A 512-byte boot sector whose only job is an ACPI soft-off, i.e. a real guest-initiated shutdown.

    mov dx,0x604; mov ax,0x2000; out dx,ax; mov dx,0xb004; out dx,ax; hlt; jmp $-1 — SLP_EN with SLP_TYP 0 written
    to PM1a_CNT at both bases QEMU's PIIX4 may use (0x600 with current SeaBIOS, 0xb000 with older ones). QEMU then
    reports a guest shutdown, and libvirt records SHUTDOWN_GUEST followed by STOPPED_SHUTDOWN / SHUTOFF_SHUTDOWN.
    """
    code = bytes.fromhex("BA0406B80020EFBA04B0EFF4EBFD")
    with open(path, "wb") as fh:
        fh.write(code + b"\0" * (510 - len(code)) + b"\x55\xaa")
    return path


def new_uuid() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="session")
def private_libvirtd() -> Iterator[PrivateLibvirtd]:
    """A libvirtd + virtlogd of our own in a private mount namespace; stopped by PID and removed at the end."""
    why_not = private_libvirtd_module.available()
    if why_not is not None:
        pytest.skip(f"private libvirtd unavailable: {why_not}")
    with PrivateLibvirtd() as lv:
        yield lv


@pytest.fixture
def manager() -> Iterator[FakeManager]:
    m = FakeManager(ping_interval_s=0.2).start()
    try:
        yield m
    finally:
        m.close()
