"""What the dashboard shows, as plain records built from the store port (one unit of work) and the driver's live
view of the agents' links (`LiveHosts`).

Pure functions of their inputs: no HTTP, no HTML, no clock (the caller passes `now`, wall-clock seconds). The pages
(pages.py) and the JSON API (api.py) both render these records, so the two always show the same data.

Health per host comes from what the manager holds: the agent link (open stream, agent version), the last ping's age
against ping.timeout, the BMC (configured or not), the watchdog the agent reported at its last contact (armed with
its bound, or why not) and libvirt's lock manager on the host (disk leases or none). Nothing is guessed: what the
manager has not heard is "unknown", never "ok".
"""

from __future__ import annotations

import collections
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kvmha.manager.core.model import HaWorkRecord, HostId, PowerState, VmRecord, VmState
from kvmha.manager.operations import LiveHosts
from kvmha.manager.store import EventRow, HostDetails, UnitOfWork

SEVERITIES = ("info", "warning", "alert")
OCCUPYING = (VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING)
RECENT_WORK_LIMIT = 50
STEPS_PER_WORK_LIMIT = 40
SUBJECT_PAGE_ROWS = 1000
SUBJECT_PAGES = 50
CREATED_SLACK_S = 1.0  # a work item's first event and its created_at come from the same decision


@dataclass(frozen=True, slots=True)
class Health:
    """One health signal of a host: `state` is ok, warn, bad or unknown; `detail` says why in words."""

    name: str
    state: str
    detail: str


@dataclass(frozen=True, slots=True)
class VmLine:
    id: int
    uuid: str
    name: str
    state: str
    power_state: str
    host: str
    last_host: str
    ha_enabled: bool
    restart_priority: int
    anti_affinity_group: str
    vcpus: int
    memory_mib: int
    power_state_updated_at: float | None


@dataclass(frozen=True, slots=True)
class HostTile:
    id: int
    uuid: str
    name: str
    address: str
    status: str
    resource_state: str
    role: str
    connected: bool
    last_ping_at: float | None
    last_ping_age_s: float | None
    cpus: int
    memory_mib: int
    used_vcpus: int
    used_memory_mib: int
    agent_version: str
    bmc: str
    health: tuple[Health, ...]
    vms: tuple[VmLine, ...]


@dataclass(frozen=True, slots=True)
class Step:
    at: float
    kind: str
    message: str
    severity: str


@dataclass(frozen=True, slots=True)
class WorkItem:
    id: int
    vm: str
    vm_id: int
    type: str
    step: str
    active: bool
    host: str
    tried: int
    reason: str
    created_at: float
    updated_at: float
    taken_by: str
    steps: tuple[Step, ...] = ()


@dataclass(frozen=True, slots=True)
class Cluster:
    """One consistent read of everything the overview shows."""

    at: float  # wall-clock seconds of the read
    hosts: tuple[HostTile, ...]
    vms: tuple[VmLine, ...]
    work: tuple[WorkItem, ...]  # active first, then the most recent finished
    last_event_id: int
    counts: Mapping[str, int] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)  # event subject ("host:3") -> name


def vm_line(vm: VmRecord, names: Mapping[int, str]) -> VmLine:
    return VmLine(id=vm.id, uuid=vm.uuid, name=vm.name, state=vm.state.value, power_state=vm.power_state.value,
                  host=names.get(vm.host_id or 0, ""), last_host=names.get(vm.last_host_id or 0, ""),
                  ha_enabled=vm.ha_enabled, restart_priority=vm.restart_priority,
                  anti_affinity_group=vm.anti_affinity_group or "", vcpus=vm.vcpus, memory_mib=vm.memory_mib,
                  power_state_updated_at=vm.power_state_updated_at)


def host_health(details: HostDetails, connected: bool, last_ping_age_s: float | None,
                ping_timeout_s: float) -> tuple[Health, ...]:
    version = details.agent.agent_version or "version unknown"
    if connected:
        agent = Health("agent", "ok", f"stream open (agent {version})")
    elif details.host.status.value == "Removed":
        agent = Health("agent", "unknown", "host removed")
    else:
        agent = Health("agent", "bad", "no agent stream")
    if last_ping_age_s is None:
        ping = Health("ping", "unknown", "never pinged")
    elif last_ping_age_s <= ping_timeout_s:
        ping = Health("ping", "ok", f"{last_ping_age_s:.1f} s ago")
    else:
        ping = Health("ping", "bad", f"{last_ping_age_s:.0f} s ago (timeout {ping_timeout_s:.0f} s)")
    if details.host.has_bmc and details.bmc_address:
        bmc = Health("bmc", "ok", f"configured at {details.bmc_address}:{details.bmc_port}")
    else:
        bmc = Health("bmc", "warn", "no BMC: cannot be fenced out of band")
    return (agent, ping, bmc, lease_health(details.host.lease_manager, details.agent.agent_version),
            watchdog_health(details.host.watchdog_timeout_s, details.host.watchdog_detail))


def watchdog_health(timeout_s: float | None, detail: str) -> Health:
    """Armed: the host resets itself at most `timeout_s` after its agent's last sign of life, so its silence can prove
    it dead. Not armed: silence proves nothing (it waits for a fence or an operator)."""
    if timeout_s is not None:
        return Health("watchdog", "ok", f"armed: resets the host within {timeout_s:g} s")
    if detail:
        return Health("watchdog", "warn", f"not armed ({detail}): its silence never proves it dead")
    return Health("watchdog", "unknown", "never reported")


def lease_health(lease_manager: str, agent_version: str) -> Health:
    if lease_manager:
        return Health("lease", "ok", f"disk leases by {lease_manager}")
    if not agent_version:
        return Health("lease", "unknown", "never reported")
    return Health("lease", "warn", "no disk leases: a VM's disks cannot be probed")


def build_cluster(uow: UnitOfWork, live: LiveHosts, now: float, ping_timeout_s: float) -> Cluster:
    details = uow.hosts.details()
    names: dict[int, str] = {d.host.id: d.host.name for d in details}
    vms = uow.vms.all()
    by_host: dict[int, list[VmRecord]] = defaultdict(list)
    for vm in vms:
        if vm.host_id is not None:
            by_host[vm.host_id].append(vm)
    tiles = tuple(_tile(d, by_host.get(d.host.id, []), live, names, now, ping_timeout_s)
                  for d in sorted(details, key=lambda d: d.host.name))
    works = _work_items(uow, {v.id: v for v in vms}, names)
    counts = {"hosts": len(tiles), "hosts_up": sum(t.status == "Up" for t in tiles), "vms": len(vms),
              "vms_running": sum(v.power_state is PowerState.POWER_ON for v in vms),
              "ha_work_active": sum(w.active for w in works)}
    # Only hosts keep their ids forever: a VM's id (and its work items') can be given again after a delete, so an
    # old event's "vm:N" or "work:N" could be named after the wrong VM. Those subjects are not named.
    subjects = {f"host:{i}": n for i, n in names.items()}
    return Cluster(at=now, hosts=tiles, vms=tuple(vm_line(v, names) for v in vms), work=works,
                   last_event_id=uow.events.last_id(), counts=counts, names=subjects)


def _tile(details: HostDetails, vms: Sequence[VmRecord], live: LiveHosts, names: Mapping[int, str], now: float,
          ping_timeout_s: float) -> HostTile:
    host = details.host
    last_ping_at = max(host.last_ping_at or 0.0, live.last_ping_at.get(host.id, 0.0)) or None
    age_s = None if last_ping_at is None else max(0.0, now - last_ping_at)
    connected = host.id in live.connected
    occupying = [v for v in vms if v.state in OCCUPYING or v.power_state is PowerState.POWER_ON]
    return HostTile(
        id=host.id, uuid=host.uuid, name=host.name, address=host.address, status=host.status.value,
        resource_state=host.resource_state.value, role=host.role.value, connected=connected,
        last_ping_at=last_ping_at, last_ping_age_s=age_s, cpus=host.capacity.cpus,
        memory_mib=host.capacity.memory_mib, used_vcpus=sum(v.vcpus for v in occupying),
        used_memory_mib=sum(v.memory_mib for v in occupying), agent_version=details.agent.agent_version,
        bmc=f"{details.bmc_address}:{details.bmc_port}" if details.bmc_address else "",
        health=host_health(details, connected, age_s, ping_timeout_s),
        vms=tuple(vm_line(v, names) for v in vms))


def _work_items(uow: UnitOfWork, vms: Mapping[int, VmRecord], names: Mapping[int, str]) -> tuple[WorkItem, ...]:
    works = uow.works.all()
    active = [w for w in works if w.step.active]
    finished = sorted((w for w in works if not w.step.active), key=lambda w: w.updated_at, reverse=True)
    chosen = active + finished[:max(0, RECENT_WORK_LIMIT - len(active))]
    return tuple(work_item(w, vms, names, work_steps(uow, w) if w.step.active else ()) for w in chosen)


def recent_of(uow: UnitOfWork, subject: str, limit: int) -> list[EventRow]:
    """The newest `limit` events of one subject, oldest first. The store port pages forward only, so the pages are
    read through (bounded: at most SUBJECT_PAGES pages of SUBJECT_PAGE_ROWS)."""
    newest: collections.deque[EventRow] = collections.deque(maxlen=limit)
    after = 0
    for _ in range(SUBJECT_PAGES):
        page = uow.events.all(after, SUBJECT_PAGE_ROWS, subject)
        newest.extend(page)
        if len(page) < SUBJECT_PAGE_ROWS:
            break
        after = page[-1].id
    return list(newest)


def current_life(rows: Iterable[EventRow], created_at: float | None = None) -> list[EventRow]:
    """Events of this VM or work item only: ids of deleted VMs (and their work items) are given again, so what came
    before the subject's last `vm.deleted` (or before a work item was created) belongs to an earlier one."""
    ordered = sorted(rows, key=lambda e: e.id)
    last_delete = max((i for i, e in enumerate(ordered) if e.kind == "vm.deleted"), default=-1)
    kept = ordered[last_delete + 1:]
    return kept if created_at is None else [e for e in kept if e.at >= created_at - CREATED_SLACK_S]


def work_steps(uow: UnitOfWork, work: HaWorkRecord) -> tuple[Step, ...]:
    """The item's own events, and its VM's start attempts while it was open: the steps an operator follows."""
    rows = [*current_life(uow.events.all(0, 500, f"work:{work.id}"), work.created_at),
            *(e for e in current_life(recent_of(uow, f"vm:{work.vm_id}", 500), work.created_at)
              if e.kind.startswith("vm."))]
    rows.sort(key=lambda e: e.id)
    return tuple(Step(e.at, e.kind, e.message, e.severity) for e in rows[-STEPS_PER_WORK_LIMIT:])


def work_item(work: HaWorkRecord, vms: Mapping[int, VmRecord], names: Mapping[int, str],
              steps: tuple[Step, ...] = ()) -> WorkItem:
    vm = vms.get(work.vm_id)
    return WorkItem(id=work.id, vm=vm.name if vm else f"vm#{work.vm_id}", vm_id=work.vm_id, type=work.type.value,
                    step=work.step.value, active=work.step.active, host=names.get(work.host_id or 0, ""),
                    tried=work.tried, reason=work.reason, created_at=work.created_at, updated_at=work.updated_at,
                    taken_by=work.taken_by or "", steps=steps)


@dataclass(frozen=True, slots=True)
class VmPage:
    vm: VmLine
    work: tuple[WorkItem, ...]
    history: tuple[EventRow, ...]


def build_vm_page(uow: UnitOfWork, vm: VmRecord, history_limit: int = 500) -> VmPage:
    names: dict[int, str] = {h.id: h.name for h in uow.hosts.all()}
    works = [w for w in uow.works.all() if w.vm_id == vm.id]
    rows = current_life(recent_of(uow, f"vm:{vm.id}", history_limit))
    for work in works:
        rows.extend(current_life(uow.events.all(0, 500, f"work:{work.id}"), work.created_at))
    rows.sort(key=lambda e: e.id)
    items = tuple(work_item(w, {vm.id: vm}, names) for w in sorted(works, key=lambda w: w.id, reverse=True))
    return VmPage(vm_line(vm, names), items, tuple(rows[-history_limit:]))


def matches(row: EventRow, subject: str, min_severity: str) -> bool:
    """The stream's filter: a subject prefix ("host:", "vm:3") and a least severity."""
    if subject and not (row.subject == subject or (subject.endswith(":") and row.subject.startswith(subject))):
        return False
    return severity_rank(row.severity) >= severity_rank(min_severity)


def severity_rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else 0


def search_vms(vms: Iterable[VmLine], query: str) -> list[VmLine]:
    """Case-insensitive match of every word against name, uuid, host, state, power state and group."""
    words = query.lower().split()
    if not words:
        return list(vms)

    def text(vm: VmLine) -> str:
        return " ".join((vm.name, vm.uuid, vm.host, vm.state, vm.power_state, vm.anti_affinity_group,
                         "ha" if vm.ha_enabled else "noha")).lower()

    return [vm for vm in vms if all(w in text(vm) for w in words)]


def host_name_map(hosts: Iterable[HostTile]) -> dict[HostId, str]:
    return {HostId(h.id): h.name for h in hosts}
