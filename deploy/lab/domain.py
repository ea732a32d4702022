"""Domain XML for every VM the lab, the tests and the benchmarks define: one builder, one shape of guest.

A guest is a pc machine with 1 vCPU, COM1 on a pty (the lab's guest powers itself off when "S" arrives there, see
kvmha.lab.guest), no USB controller and no memory balloon (nothing a guest without an OS would use; fewer devices
start faster on a busy machine), and the libvirt default lifecycle written out (power-off and crash end the domain,
a reboot restarts it) so that a guest-initiated shutdown shows as "shut off (shutdown)", never as a restart.

With a boot disk the guest boots from it (IDE, so SeaBIOS needs no driver) and gets ACPI, which the guest's
power-off goes through. A disk `shared` between hosts (the lab's shared storage) gets a user alias and, when raw,
share-rw=on through <qemu:override> rather than <shareable/>: QEMU's own image lock, local to one kernel, would
otherwise refuse a second start before virtlockd, the real cross-host guard, is asked; <shareable/> would make
virtlockd's lease shared too (kvmha.lab.guest explains it). qcow2 always takes QEMU's exclusive lock.

Without a disk the domain runs no code at all: enough for libvirt's test driver (`domain_type="test"`) and for
tests that only need a QEMU process to start, run and be killed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

DISK_ALIAS = "ua-lab-disk"  # libvirt keeps user aliases ("ua-" prefix), so the override can name the device
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@dataclass(frozen=True)
class BootDisk:
    path: Path | str
    format: str = "raw"  # "raw" or "qcow2"
    shared: bool = False  # on storage other hosts start the same VM from: see the module header


def domain_xml(name: str, vm_uuid: str | None = None, *, domain_type: str = "qemu", memory_mib: int = 32,
               disk: BootDisk | None = None) -> str:
    """The domain definition; `vm_uuid` defaults to a new random UUID, `domain_type` is kvm, qemu or test."""
    boot = features = disk_xml = override = ""
    if disk is not None:
        boot, features = "\n    <boot dev='hd'/>", "\n  <features><acpi/></features>"
        alias = f"\n      <alias name='{DISK_ALIAS}'/>" if disk.shared else ""
        disk_xml = f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type={_attr(disk.format)}/>
      <source file={_attr(str(disk.path))}/>
      <target dev='hda' bus='ide'/>{alias}
    </disk>"""
        if disk.shared and disk.format == "raw":
            override = f"""
  <qemu:override>
    <qemu:device alias='{DISK_ALIAS}'>
      <qemu:frontend><qemu:property name='share-rw' type='bool' value='true'/></qemu:frontend>
    </qemu:device>
  </qemu:override>"""
    namespace = f" xmlns:qemu='{QEMU_NS}'" if override else ""
    return f"""<domain type={_attr(domain_type)}{namespace}>
  <name>{escape(name)}</name>
  <uuid>{escape(vm_uuid or str(uuid.uuid4()))}</uuid>
  <memory unit='MiB'>{int(memory_mib)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>{boot}
  </os>{features}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>{disk_xml}
    <controller type='usb' model='none'/>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>
  </devices>{override}
</domain>
"""


def _attr(value: str) -> str:
    """An attribute value in single quotes, escaped."""
    return "'" + escape(value, {"'": "&apos;"}) + "'"
