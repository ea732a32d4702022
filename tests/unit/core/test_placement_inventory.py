"""Storage-, network- and memory-aware placement (issue 16): the table of what refuses a host, and the refusal text."""

from __future__ import annotations

import pytest

from kvmha.manager.core.model import (
    HostCapacity,
    HostId,
    HostInventory,
    HostRecord,
    HostStatus,
    HostUuid,
    StorageReach,
    VmId,
    VmRecord,
    VmState,
    VmUuid,
)
from kvmha.manager.core.placement import PlacementRequest, choose_host, refusals
from kvmha.manager.core.vmindex import VmIndex
from kvmha.manager.core.vmneeds import mount_of, needs_of

XML = (
    "<domain><name>v</name><devices>"
    "<disk type='file' device='disk'><source file='/mnt/a/v.qcow2'/></disk>"
    "<disk type='file' device='cdrom'><target dev='hdc'/></disk>"
    "<disk type='network'><source protocol='rbd' name='pool/img'/></disk>"
    "<interface type='bridge'><source bridge='br0'/></interface>"
    "<interface type='network'><source network='default'/></interface>"
    "<interface type='user'/>"
    "</devices></domain>"
)
SHARED_A = StorageReach("nfs:nas:/a", "/mnt/a")


def test_needs_are_read_from_the_domain_xml() -> None:
    needs = needs_of(XML)
    assert needs.disks == ("/mnt/a/v.qcow2",)
    assert needs.networks == frozenset({"bridge:br0", "network:default"})
    assert needs_of("<domain>broken").disks == ()


def test_mount_of_is_component_wise_and_longest() -> None:
    assert mount_of("/mnt/ab/x", ("/mnt/a",)) is None
    assert mount_of("/mnt/a/b/x", ("/", "/mnt/a", "/mnt/a/b")) == "/mnt/a/b"
    assert mount_of("/srv/x", ("/",)) == "/"


def _host(
    host_id: int, *storage: StorageReach, nets: tuple[str, ...] = ("bridge:br0", "network:default"),
    reported: bool = True, free: int | None = None, reserve: int | None = None, memory_mib: int = 8192,
) -> HostRecord:
    inventory = HostInventory(reported, storage, frozenset(nets), free, reserve)
    return HostRecord(HostId(host_id), HostUuid(f"u{host_id}"), f"h{host_id}", "", HostStatus.UP,
                      capacity=HostCapacity(cpus=4, memory_mib=memory_mib), inventory=inventory)


def _place(vm_host: HostRecord | None, target: HostRecord, memory_mib: int = 1024,
           reserve_mib: int = 0) -> str:
    hosts = {target.id: target} | ({vm_host.id: vm_host} if vm_host else {})
    vm = VmRecord(VmId(1), VmUuid("v1"), "v1", VmState.STOPPED, last_host_id=vm_host.id if vm_host else None,
                  memory_mib=memory_mib, vcpus=1, domain_xml=XML)
    chosen, why = choose_host(PlacementRequest(vm, frozenset(), frozenset()), [target.id], hosts, VmIndex(),
                              start=0, compare=8, cpu_ratio=1.0, reserve_mib=reserve_mib)
    assert (chosen is None) == bool(why)
    return why


OLD = _host(1, SHARED_A)
CASES = [
    ("fits", _host(2, SHARED_A), 1024, 0, ""),
    ("another storage at the same path", _host(2, StorageReach("nfs:other:/a", "/mnt/a")), 1024, 0,
     "lacks storage nfs:nas:/a: h2"),
    ("no storage at the path", _host(2, StorageReach("nfs:nas:/b", "/mnt/b")), 1024, 0,
     "lacks storage nfs:nas:/a: h2"),
    ("storage unhealthy", _host(2, StorageReach("nfs:nas:/a", "/mnt/a", healthy=False)), 1024, 0,
     "storage nfs:nas:/a unhealthy: h2"),
    ("a bridge missing", _host(2, SHARED_A, nets=("network:default",)), 1024, 0, "lacks bridge:br0: h2"),
    ("an older agent: not tested", _host(2, reported=False), 1024, 0, ""),
    ("reported free memory caps", _host(2, SHARED_A, free=1000), 1024, 0, "not enough free memory: h2"),
    ("the manager's reserve", _host(2, SHARED_A), 1024, 7500, "not enough free memory: h2"),
    ("the host's own reserve wins", _host(2, SHARED_A, reserve=0), 1024, 7500, ""),
]


@pytest.mark.parametrize(("case", "target", "memory_mib", "reserve_mib", "why"), CASES, ids=[c[0] for c in CASES])
def test_what_refuses_a_host(case: str, target: HostRecord, memory_mib: int, reserve_mib: int, why: str) -> None:
    result = _place(OLD, target, memory_mib, reserve_mib)
    assert why in result if why else result == ""


def test_a_vm_that_never_ran_goes_where_most_hosts_see_its_storage() -> None:
    other = _host(3, StorageReach("nfs:other:/a", "/mnt/a"))
    hosts = {h.id: h for h in (_host(1, SHARED_A), _host(2, SHARED_A), other)}
    vm = VmRecord(VmId(1), VmUuid("v1"), "v1", VmState.STOPPED, memory_mib=1, vcpus=1, domain_xml=XML)
    chosen, why = choose_host(PlacementRequest(vm, frozenset(), frozenset()), [HostId(3)], hosts, VmIndex(),
                              start=0, compare=8, cpu_ratio=1.0)
    assert chosen is None and "lacks storage nfs:nas:/a: h3" in why


def test_a_local_disk_runs_only_on_its_own_host() -> None:
    own = _host(1, StorageReach("nfs:nas:/b", "/mnt/b"))
    assert _place(own, own) == ""
    assert "local to h1" in _place(own, _host(2, SHARED_A))


def test_refusals_name_hosts_per_reason_naturally_ordered_and_count_the_rest() -> None:
    text = refusals({"not enough free memory": ["h10", "h2", "h1", "h3", "h4", "h5"], "lacks bridge:br0": ["h7"]})
    assert text == "lacks bridge:br0: h7; not enough free memory: h1, h2, h3, h4 and 2 more"
