"""The CreateVm domain XML policy: each guarded element is found, named in the refusal, and allowed by name."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from kvmha.manager import domainpolicy
from kvmha.manager.domainxml import vm_from_xml
from kvmha.manager.operations import OperationError

QEMU = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"


def domain(devices: str = "", extra: str = "", namespace: str = "") -> str:
    return (f"<domain type='kvm' {namespace}><name>v</name><memory unit='MiB'>64</memory>"
            f"<devices>{devices}</devices>{extra}</domain>")


CASES = {
    "qemu:commandline": domain(extra="<qemu:commandline><qemu:arg value='-set'/></qemu:commandline>", namespace=QEMU),
    "qemu:override": domain(extra="<qemu:override><qemu:device alias='ua-x'/></qemu:override>", namespace=QEMU),
    "hostdev": domain("<hostdev mode='subsystem' type='pci'><source><address bus='0x01'/></source></hostdev>"),
    "interface-hostdev": domain("<interface type='hostdev'><source><address type='pci'/></source></interface>"),
    "filesystem": domain("<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_guarded_element_is_refused_by_name_and_allowed_by_name(name: str) -> None:
    with pytest.raises(OperationError) as refused:
        vm_from_xml(CASES[name], allowed=())
    assert f"[domain_xml] allow = ['{name}']" in str(refused.value)
    assert vm_from_xml(CASES[name], allowed=(name,)).name == "v"
    others = tuple(n for n in domainpolicy.KNOWN if n != name)
    with pytest.raises(OperationError):
        vm_from_xml(CASES[name], allowed=others)


def test_another_prefix_for_the_qemu_namespace_changes_nothing() -> None:
    xml = ("<domain type='kvm' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'><name>v</name>"
           "<memory>1024</memory><q:commandline><q:arg value='-x'/></q:commandline></domain>")
    assert domainpolicy.findings(ET.fromstring(xml)) == ["qemu:commandline"]


def test_plain_domains_pass_and_the_lab_allowance_admits_exactly_override() -> None:
    assert domainpolicy.findings(ET.fromstring(domain("<disk type='file' device='disk'/><interface type='network'/>"))
                                 ) == []
    with pytest.raises(OperationError, match="qemu:commandline"):
        vm_from_xml(CASES["qemu:commandline"], allowed=("qemu:override",))
