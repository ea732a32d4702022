"""A domain's libvirt XML read into the VM record kvmha registers: name, uuid, memory, vCPUs.

Bad XML is refused with a message for the operator (an `OperationError` of kind INVALID). A missing uuid is added
to the XML, so that every restart of the VM on another host keeps the same uuid.
"""

from __future__ import annotations

import uuid as uuid_module
import xml.etree.ElementTree as ET
from collections.abc import Iterable

from kvmha.manager import domainpolicy
from kvmha.manager.core.model import VmId, VmRecord, VmState, VmUuid
from kvmha.manager.operations import Refusal, refuse

MAX_XML_BYTES = 1 << 20


def vm_from_xml(
    domain_xml: str, *, name: str = "", ha_enabled: bool = False, restart_priority: int = 0,
    anti_affinity_group: str = "", allowed: Iterable[str] | None = None,
) -> VmRecord:
    """Read name, uuid, memory and vCPUs from the domain XML; a missing uuid is added so restarts keep it.

    `allowed`: the guarded elements this manager allows (domainpolicy.py); None skips the policy (the XML of VMs
    already registered, or found running on a host)."""
    if len(domain_xml.encode()) > MAX_XML_BYTES:
        refuse(Refusal.INVALID, "domain XML is larger than 1 MiB")
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError as error:
        refuse(Refusal.INVALID, f"domain XML does not parse: {error}")
    if root.tag != "domain":
        refuse(Refusal.INVALID, f"the XML's root is <{root.tag}>, not <domain>")
    if allowed is not None and (refusals := domainpolicy.refused(root, allowed)):
        refuse(Refusal.INVALID, domainpolicy.explain(refusals))
    name = name or (root.findtext("name") or "").strip()
    if not name:
        refuse(Refusal.INVALID, "the domain has no <name> (or pass a name)")
    _set_text(root, "name", name)
    uuid_text = (root.findtext("uuid") or "").strip() or str(uuid_module.uuid4())
    try:
        uuid = str(uuid_module.UUID(uuid_text))
    except ValueError:
        refuse(Refusal.INVALID, f"<uuid> {uuid_text!r} is not a UUID")
    _set_text(root, "uuid", uuid)
    return VmRecord(id=VmId(0), uuid=VmUuid(uuid), name=name, state=VmState.STOPPED,
                    ha_enabled=ha_enabled, restart_priority=restart_priority,
                    anti_affinity_group=anti_affinity_group or None, memory_mib=_memory_mib(root),
                    vcpus=_int(root.findtext("vcpu"), "vcpu", default=1), domain_xml=ET.tostring(root, "unicode"))


def _set_text(root: ET.Element, tag: str, text: str) -> None:
    element = root.find(tag)
    if element is None:
        element = ET.SubElement(root, tag)
    element.text = text


_UNIT_TO_MIB = {"b": 1 / (1 << 20), "bytes": 1 / (1 << 20), "k": 1 / 1024, "kib": 1 / 1024, "kb": 1000 / (1 << 20),
                "m": 1, "mib": 1, "mb": 1e6 / (1 << 20), "g": 1024, "gib": 1024, "gb": 1e9 / (1 << 20)}


def _memory_mib(root: ET.Element) -> int:
    element = root.find("memory")
    if element is None:
        refuse(Refusal.INVALID, "the domain has no <memory>")
    unit = (element.get("unit") or "KiB").lower()
    if unit not in _UNIT_TO_MIB:
        refuse(Refusal.INVALID, f"<memory unit='{unit}'> is not a unit kvmha knows")
    return max(1, round(_int(element.text, "memory") * _UNIT_TO_MIB[unit]))


def _int(text: str | None, what: str, default: int | None = None) -> int:
    if text is None and default is not None:
        return default
    try:
        value = int((text or "").strip())
    except ValueError:
        refuse(Refusal.INVALID, f"<{what}> {text!r} is not a whole number")
    if value <= 0:
        refuse(Refusal.INVALID, f"<{what}> must be positive")
    return value
