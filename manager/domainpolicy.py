"""What domain XML from CreateVm may ask of a hypervisor, checked before the VM is registered (so before any agent
starts it as root with libvirt).

Refused unless manager.toml allows them by name (`[domain_xml] allow = ["qemu:override", ...]`):

    qemu:commandline     arbitrary QEMU arguments (any file, any device, any host command via QEMU)
    qemu:override        raw QEMU device properties
    qemu:<other>         any other element of libvirt's QEMU namespace (qemu:capabilities, qemu:deprecation, ...)
    hostdev              host PCI/USB/SCSI devices passed through
    interface-hostdev    <interface type='hostdev'>: a host network function passed through
    filesystem           host directories shared into the guest (virtiofs/9p passthrough)

The refusal names the element (and the setting that would allow it). Pure: XML in, a list of findings out.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
KNOWN = ("qemu:commandline", "qemu:override", "hostdev", "interface-hostdev", "filesystem")


def findings(root: ET.Element) -> list[str]:
    """The policy names of every guarded element in the domain, in document order, without repeats."""
    found: list[str] = []
    for element in root.iter():
        name = _guarded(element)
        if name is not None and name not in found:
            found.append(name)
    return found


def _guarded(element: ET.Element) -> str | None:
    tag = element.tag
    if isinstance(tag, str) and tag.startswith(f"{{{QEMU_NS}}}"):
        local = tag.split("}", 1)[1]
        # Children of a guarded qemu element are covered by their parent's name.
        return f"qemu:{local}" if local in ("commandline", "override", "capabilities", "deprecation") else None
    if tag == "hostdev":
        return "hostdev"
    if tag == "interface" and element.get("type") == "hostdev":
        return "interface-hostdev"
    if tag == "filesystem":
        return "filesystem"
    return None


def refused(root: ET.Element, allowed: Iterable[str]) -> list[str]:
    allow = set(allowed)
    return [name for name in findings(root) if name not in allow]


def explain(names: list[str]) -> str:
    elements = ", ".join(f"<{name}>" if not name.startswith("interface") else "<interface type='hostdev'>"
                         for name in names)
    return (f"the domain XML uses {elements}, which this manager does not allow (a VM's XML reaches libvirt as root "
            f"on a hypervisor); an admin can allow it in manager.toml: [domain_xml] allow = {names!r}")
