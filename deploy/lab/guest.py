"""A guest without an OS that can still shut itself down: a 512-byte boot sector, assembled here by hand.

The lab needs VMs whose *guest* can ask for a power-off, so that libvirt records a guest-initiated shutdown
(shut off, reason "shutdown") and the HA logic can tell it from a crash. The boot sector, in 16-bit real mode:

    sti                 ; let SeaBIOS's 18.2 Hz timer tick wake the hlt below
  poll:
    hlt                 ; sleep until the next interrupt: an idle guest must not burn a shared CPU
    mov dx, 0x3FD       ; COM1 line status register
    in  al, dx
    test al, 1          ; data ready?
    jz  poll
    mov dx, 0x3F8       ; COM1 receive buffer
    in  al, dx
    cmp al, 'S'
    je  shutdown
    cmp al, 'D'
    je  dirty
    jmp poll
  shutdown:
    mov dx, 0x604       ; PIIX4 PM1a control block, as SeaBIOS sets it up on QEMU's pc machine
    mov ax, 0x2000      ; SLP_EN with SLP_TYP 0 = S5: QEMU reports a guest shutdown
    out dx, ax
    cli
  halt:
    hlt
    jmp halt
  dirty:                ; a busy guest: rewrite 512 KiB (0x10000-0x8FFFF, clear of the IVT, BIOS data, this code
    cli                 ; and the EBDA) over and over, as fast as the vCPU goes, until the VM is destroyed
    cld
  pass:
    mov ax, 0x1000
  segment:
    mov es, ax
    xor di, di
    mov cx, 0x8000      ; 32,768 words: one 64 KiB segment
    rep stosw
    add ax, 0x1000
    cmp ax, 0x9000
    jb  segment
    jmp pass

So `kvmha-lab guest-shutdown VM` writes "S" to the VM's serial port and the guest powers off through ACPI, and
`kvmha-lab guest-busy VM` writes "D": from then on the guest dirties 512 KiB of memory continuously (a live
migration must copy those pages again and again: a guest under load) and burns its vCPU.

Disk format. The lab's hosts share one kernel, so QEMU's own image locking (OFD locks on the image file) would
refuse a second start of a disk before virtlockd is even asked (libvirt acquires leases when the CPUs start,
after QEMU opened its disks). Between real hosts those locks are local to each kernel and virtlockd is the only
cross-host guard; to reproduce that, lab disks are raw by default and the disk device gets share-rw=on (through
<qemu:override>, not <shareable/>, which would make the lease shared too). qcow2 always takes QEMU's exclusive
write lock whatever the device says, so with disk_format="qcow2" a second start is refused by QEMU instead.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

SHUTDOWN_CHAR = b"S"
BUSY_CHAR = b"D"
SECTOR_SIZE_BYTES = 512
RAW_IMAGE_SIZE_BYTES = 1024 * 1024

_CODE = bytes(
    [
        0xFB,  # 0: sti
        0xF4,  # 1: poll: hlt
        0xBA, 0xFD, 0x03,  # 2: mov dx, 0x3FD
        0xEC,  # 5: in al, dx
        0xA8, 0x01,  # 6: test al, 1
        0x74, 0xF7,  # 8: jz poll (1 - 10)
        0xBA, 0xF8, 0x03,  # 10: mov dx, 0x3F8
        0xEC,  # 13: in al, dx
        0x3C, SHUTDOWN_CHAR[0],  # 14: cmp al, 'S'
        0x74, 0x06,  # 16: je shutdown (24 - 18)
        0x3C, BUSY_CHAR[0],  # 18: cmp al, 'D'
        0x74, 0x0D,  # 20: je dirty (35 - 22)
        0xEB, 0xE9,  # 22: jmp poll (1 - 24)
        0xBA, 0x04, 0x06,  # 24: shutdown: mov dx, 0x604
        0xB8, 0x00, 0x20,  # 27: mov ax, 0x2000
        0xEF,  # 30: out dx, ax
        0xFA,  # 31: cli
        0xF4,  # 32: halt: hlt
        0xEB, 0xFD,  # 33: jmp halt (32 - 35)
        0xFA,  # 35: dirty: cli
        0xFC,  # 36: cld
        0xB8, 0x00, 0x10,  # 37: pass: mov ax, 0x1000
        0x8E, 0xC0,  # 40: segment: mov es, ax
        0x31, 0xFF,  # 42: xor di, di
        0xB9, 0x00, 0x80,  # 44: mov cx, 0x8000
        0xF3, 0xAB,  # 47: rep stosw
        0x05, 0x00, 0x10,  # 49: add ax, 0x1000
        0x3D, 0x00, 0x90,  # 52: cmp ax, 0x9000
        0x72, 0xEF,  # 55: jb segment (40 - 57)
        0xEB, 0xEA,  # 57: jmp pass (37 - 59)
    ]
)  # fmt: skip


def boot_sector() -> bytes:
    """The 512-byte MBR: the code above, zero padding, and the 0x55 0xAA signature SeaBIOS looks for."""
    padding = bytes(SECTOR_SIZE_BYTES - 2 - len(_CODE))
    sector = _CODE + padding + b"\x55\xaa"
    assert len(sector) == SECTOR_SIZE_BYTES
    return sector


DISK_FORMATS = ("raw", "qcow2")


def make_disk(path: Path, disk_format: str = "raw") -> None:
    """A disk that boots the sector above: raw, or qcow2 made from the raw image with `qemu-img convert`."""
    if disk_format not in DISK_FORMATS:
        raise ValueError(f"disk format {disk_format!r} is not one of {DISK_FORMATS}")
    raw = path if disk_format == "raw" else path.with_suffix(".tmp-raw")
    with open(raw, "wb") as out:
        out.write(boot_sector())
        out.truncate(RAW_IMAGE_SIZE_BYTES)
    if disk_format == "raw":
        return
    try:
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
            check=True,
            capture_output=True,
        )
    finally:
        raw.unlink()


def kvm_usable() -> bool:
    """KVM only if /dev/kvm can really be opened read-write here (QEMU runs as root in the lab).
    KVMHA_LAB_TCG=1 forces TCG, to try on a KVM machine what CI without /dev/kvm does."""
    if os.environ.get("KVMHA_LAB_TCG") == "1":
        return False
    try:
        with open("/dev/kvm", "rb+", buffering=0):
            return True
    except OSError:
        return False


def vm_uuid(name: str) -> str:
    """The same VM name gives the same UUID on every host: it is one VM wherever it runs."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"kvmha-lab:vm:{name}"))
