"""Fixtures of the agent tests: a private libvirtd (session-wide), a fake manager, a guest that powers itself off.

Domain XML comes from kvmha.lab.domain."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kvmha.lab.testing import libvirtd as private_libvirtd_module
from kvmha.lab.testing.fake_manager import FakeManager
from kvmha.lab.testing.libvirtd import PrivateLibvirtd


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
