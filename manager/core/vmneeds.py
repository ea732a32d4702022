"""What a VM needs from a host besides memory and vCPUs, read from its domain XML: the files its disks live in and
the networks its interfaces attach to.

Invariants:
- Pure and cached by the XML text: the XML is parsed once per distinct domain, never per placement.
- Only what a host must offer is collected: file- and block-backed disks (`<source file=|dev=>`; a CD-ROM without
  a source needs nothing), libvirt networks (`<interface type='network'><source network=...>`, "network:NAME") and
  bridges (`type='bridge'`, "bridge:NAME"). Network disks (rbd, iscsi, ...) and other interface types are reached
  over the network and test nothing here.
- XML that does not parse needs nothing: the manager refused it at registration (manager/domainxml.py), and a
  placement must not crash on a record that predates that check.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, slots=True)
class VmNeeds:
    disks: tuple[str, ...] = ()  # absolute paths of the disk sources, in XML order
    networks: frozenset[str] = frozenset()  # "network:NAME" / "bridge:NAME"


NOTHING = VmNeeds()


@lru_cache(maxsize=16384)
def needs_of(domain_xml: str) -> VmNeeds:
    """The disks and networks of a domain."""
    if "<disk" not in domain_xml and "<interface" not in domain_xml:
        return NOTHING
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return NOTHING
    disks: list[str] = []
    for disk in root.iterfind("./devices/disk"):
        source = disk.find("source")
        path = None if source is None else (source.get("file") or source.get("dev"))
        if path and path.startswith("/") and path not in disks:
            disks.append(path)
    networks: set[str] = set()
    for interface in root.iterfind("./devices/interface"):
        source = interface.find("source")
        kind = interface.get("type", "")
        if source is None or kind not in ("network", "bridge"):
            continue
        name = source.get(kind)
        if name:
            networks.add(f"{kind}:{name}")
    return VmNeeds(tuple(disks), frozenset(networks))


def mount_of(path: str, mounts: tuple[str, ...]) -> str | None:
    """The longest of `mounts` that contains `path` (component-wise: /mnt/a does not contain /mnt/ab), or None."""
    best: str | None = None
    for mount in mounts:
        prefix = mount.rstrip("/") + "/"
        if (path == mount or path.startswith(prefix) or mount == "/") and (best is None or len(mount) > len(best)):
            best = mount
    return best
