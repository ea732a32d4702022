from __future__ import annotations

from kvmha.manager.core.model import (
    HostCapacity,
    HostId,
    HostRecord,
    HostStatus,
    HostUuid,
    ResourceState,
    VmId,
    VmRecord,
    VmState,
    VmUuid,
)
from kvmha.manager.core.placement import PlacementRequest, choose_host
from kvmha.manager.core.vmindex import VmIndex
from kvmha.manager.core.vmstate import VmEvent


def _hosts(*memory_mib: int) -> dict[HostId, HostRecord]:
    return {
        HostId(i): HostRecord(
            HostId(i), HostUuid(f"u{i}"), f"h{i}", "", HostStatus.UP, capacity=HostCapacity(cpus=4, memory_mib=mem)
        )
        for i, mem in enumerate(memory_mib, start=1)
    }


def _vm(
    vm_id: int, memory_mib: int = 1024, vcpus: int = 1, host: int | None = None, group: str | None = None
) -> VmRecord:
    return VmRecord(
        VmId(vm_id),
        VmUuid(f"v{vm_id}"),
        f"vm{vm_id}",
        VmState.RUNNING if host else VmState.STOPPED,
        host_id=HostId(host) if host else None,
        memory_mib=memory_mib,
        vcpus=vcpus,
        anti_affinity_group=group,
    )


def _choose(
    vm: VmRecord,
    hosts: dict[HostId, HostRecord],
    index: VmIndex,
    exclude: frozenset[int] = frozenset(),
    group_hosts: frozenset[int] = frozenset(),
) -> tuple[HostRecord | None, str]:
    req = PlacementRequest(vm, frozenset(HostId(h) for h in exclude), frozenset(HostId(h) for h in group_hosts))
    return choose_host(req, sorted(hosts), hosts, index, start=0, compare=32, cpu_ratio=1.0)


def test_spreads_to_the_host_with_most_free_memory() -> None:
    hosts, index = _hosts(8192, 8192, 8192), VmIndex()
    index.add(_vm(1, 4096, host=1))
    index.add(_vm(2, 2048, host=2))
    host, _ = _choose(_vm(9), hosts, index)
    assert host is not None and host.id == 3


def test_placed_usage_counts_against_capacity() -> None:
    hosts, index = _hosts(4096, 4096), VmIndex()
    index.add(_vm(1, 3500, host=1))
    host, _ = _choose(_vm(9, 1024), hosts, index)
    assert host is not None and host.id == 2
    index.add(_vm(2, 3500, host=2))
    host, why = _choose(_vm(9, 1024), hosts, index)
    assert host is None and "not enough free memory: h1, h2" in why


def test_vcpus_are_a_limit_too() -> None:
    hosts, index = _hosts(65536), VmIndex()
    index.add(_vm(1, 1, vcpus=3, host=1))
    host, why = _choose(_vm(9, 1, vcpus=2), hosts, index)
    assert host is None and "vCPUs" in why


def test_excluded_disabled_and_anti_affinity_hosts_are_skipped() -> None:
    hosts, index = _hosts(8192, 8192, 8192, 8192), VmIndex()
    hosts[HostId(2)].resource_state = ResourceState.MAINTENANCE
    host, _ = _choose(_vm(9, group="db"), hosts, index, exclude=frozenset({1}), group_hosts=frozenset({3}))
    assert host is not None and host.id == 4
    host, why = _choose(_vm(9, group="db"), hosts, index, exclude=frozenset({1, 4}), group_hosts=frozenset({3}))
    assert host is None and "anti-affinity" in why and "Maintenance" in why


def test_stopped_vms_do_not_hold_resources() -> None:
    hosts, index = _hosts(2048), VmIndex()
    vm = _vm(1, 2048, host=1)
    index.add(vm)
    assert _choose(_vm(9, 1024), hosts, index)[0] is None
    index.update(vm, VmEvent.POWERED_OFF)
    assert _choose(_vm(9, 1024), hosts, index)[0] is not None
    assert index.used_memory_mib[HostId(1)] == 0


def test_no_candidates() -> None:
    host, why = choose_host(
        PlacementRequest(_vm(9), frozenset(), frozenset()), [], {}, VmIndex(), start=0, compare=4, cpu_ratio=1.0
    )
    assert host is None and "no Up and Enabled host" in why
