"""The VM records and the indexes every decision needs: by uuid, by host, by anti-affinity group, and what each host
has placed on it (memory, vCPUs). All changes of a VM's host or state go through `VmIndex.update`, so the indexes
and the usage sums can never drift from the records, and every state change reads the table in `vmstate`.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterator

from kvmha.manager.core.model import HostId, PowerState, VmId, VmRecord, VmState, VmUuid
from kvmha.manager.core.vmstate import VmEvent, next_vm_state

# States in which a VM holds resources on its host (UNMANAGED domains do too: they are really there).
_OCCUPYING = frozenset({VmState.STARTING, VmState.RUNNING, VmState.STOPPING, VmState.MIGRATING, VmState.UNMANAGED})


class Keep(enum.Enum):
    """`VmIndex.update(host_id=KEEP)`: the VM stays on its host (None would mean: on no host)."""

    KEEP = "keep"


KEEP = Keep.KEEP


def occupies(vm: VmRecord) -> bool:
    return vm.host_id is not None and vm.state in _OCCUPYING


class VmIndex:
    def __init__(self) -> None:
        self._vms: dict[VmId, VmRecord] = {}
        self._by_uuid: dict[VmUuid, VmId] = {}
        self._by_host: defaultdict[HostId, set[VmId]] = defaultdict(set)
        self._by_group: defaultdict[str, set[VmId]] = defaultdict(set)
        self.used_memory_mib: defaultdict[HostId, int] = defaultdict(int)
        self.used_vcpus: defaultdict[HostId, int] = defaultdict(int)
        self.placed_count: defaultdict[HostId, int] = defaultdict(int)
        self._reserved: dict[VmId, HostId] = {}  # a migration's target holds the VM's resources until it settles

    # ------------------------------------------------------------ queries

    def get(self, vm_id: VmId) -> VmRecord | None:
        return self._vms.get(vm_id)

    def by_uuid(self, uuid: VmUuid) -> VmRecord | None:
        vm_id = self._by_uuid.get(uuid)
        return None if vm_id is None else self._vms[vm_id]

    def on_host(self, host_id: HostId) -> list[VmRecord]:
        """VMs recorded on a host, in id order (deterministic)."""
        return [self._vms[vm_id] for vm_id in sorted(self._by_host.get(host_id, ()))]

    def group_hosts(self, group: str, except_vm: VmId) -> set[HostId]:
        """Hosts where other members of an anti-affinity group hold resources."""
        hosts: set[HostId] = set()
        for vm_id in self._by_group.get(group, ()):
            member = self._vms[vm_id]
            if vm_id != except_vm and occupies(member) and member.host_id is not None:
                hosts.add(member.host_id)
        return hosts

    def __iter__(self) -> Iterator[VmRecord]:
        return iter(self._vms.values())

    def __len__(self) -> int:
        return len(self._vms)

    def max_id(self) -> int:
        return max(self._vms, default=0)

    def copy(self) -> VmIndex:
        """An index over the same records whose own changes (add, remove) do not reach this one: the planner's
        scratch copy (core/capacityplan.py). Records are shared, so callers must not `update` them."""
        twin = VmIndex()
        twin._vms, twin._by_uuid, twin._reserved = dict(self._vms), dict(self._by_uuid), dict(self._reserved)
        twin._by_host = defaultdict(set, {h: set(ids) for h, ids in self._by_host.items()})
        twin._by_group = defaultdict(set, {g: set(ids) for g, ids in self._by_group.items()})
        twin.used_memory_mib = defaultdict(int, self.used_memory_mib)
        twin.used_vcpus = defaultdict(int, self.used_vcpus)
        twin.placed_count = defaultdict(int, self.placed_count)
        return twin

    # ------------------------------------------------------------ changes

    def add(self, vm: VmRecord) -> None:
        if vm.id in self._vms:
            self.remove(vm.id)
        self._vms[vm.id] = vm
        self._by_uuid[vm.uuid] = vm.id
        if vm.anti_affinity_group:
            self._by_group[vm.anti_affinity_group].add(vm.id)
        self._attach(vm)

    def remove(self, vm_id: VmId) -> VmRecord | None:
        vm = self._vms.pop(vm_id, None)
        if vm is None:
            return None
        self.release(vm)
        self._detach(vm)
        self._by_uuid.pop(vm.uuid, None)
        if vm.anti_affinity_group:
            self._by_group[vm.anti_affinity_group].discard(vm.id)
        return vm

    def reserve(self, vm: VmRecord, host_id: HostId) -> None:
        """Count the VM on `host_id` too (the target of its migration), so placement never fills it twice."""
        self.release(vm)
        self._reserved[vm.id] = host_id
        self.used_memory_mib[host_id] += vm.memory_mib
        self.used_vcpus[host_id] += vm.vcpus
        self.placed_count[host_id] += 1

    def release(self, vm: VmRecord) -> None:
        host_id = self._reserved.pop(vm.id, None)
        if host_id is not None:
            self.used_memory_mib[host_id] -= vm.memory_mib
            self.used_vcpus[host_id] -= vm.vcpus
            self.placed_count[host_id] -= 1

    def set_power(self, vm: VmRecord, power: PowerState, at: float) -> None:
        """What the hypervisor says: no index or usage changes (the common case of a periodic report)."""
        vm.power_state, vm.power_state_updated_at = power, at

    def update(
        self,
        vm: VmRecord,
        event: VmEvent | None = None,
        *,
        host_id: HostId | Keep | None = KEEP,
        power: PowerState | None = None,
        at: float | None = None,
    ) -> None:
        """Move a VM through the state table (`event`) and/or to another host, optionally with a new power state.
        Its update_count goes up when state or host change: an HA work item scheduled before then is stale."""
        old = vm.state
        new = next_vm_state(old, event) if event is not None else old  # raises before anything changed
        self._detach(vm)
        vm.state = new  # (via next_vm_state above: the only assignment of a VM's state)
        changed = new is not old
        if not isinstance(host_id, Keep) and host_id != vm.host_id:
            if vm.host_id is not None:
                vm.last_host_id = vm.host_id
            vm.host_id = host_id
            changed = True
        if power is not None:
            vm.power_state = power
            vm.power_state_updated_at = at
        if changed:
            vm.update_count += 1
        self._attach(vm)

    def _attach(self, vm: VmRecord) -> None:
        if vm.host_id is not None:
            self._by_host[vm.host_id].add(vm.id)
        if occupies(vm) and vm.host_id is not None:
            self.used_memory_mib[vm.host_id] += vm.memory_mib
            self.used_vcpus[vm.host_id] += vm.vcpus
            self.placed_count[vm.host_id] += 1

    def _detach(self, vm: VmRecord) -> None:
        if vm.host_id is not None:
            self._by_host[vm.host_id].discard(vm.id)
        if occupies(vm) and vm.host_id is not None:
            self.used_memory_mib[vm.host_id] -= vm.memory_mib
            self.used_vcpus[vm.host_id] -= vm.vcpus
            self.placed_count[vm.host_id] -= 1
