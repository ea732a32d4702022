"""Simulated live migration, as libvirt's peer-to-peer migration behaves on the hosts.

A migration (a MigrateVm sent to the source's agent, or a `virsh-migrate` an admin runs outside kvmha) starts a
paused copy on the target after PREPARE_S (reported PowerOn, paused for migration), copies memory for a time that
grows with the VM's memory, then switches over in one step: the target resumes, the source's domain shuts off with
cause Migrated, and the agent answers ok. It fails — the target's copy is destroyed, the guest keeps running on the
source — when the target dies or becomes unreachable from the source, or the guest dies on the source. When the
source dies, the target's copy is destroyed (its agent reports it gone) and no answer ever comes.

The invariant checker sees exactly one running copy at every moment: the paused copy is never `started`, and the
switchover stops the source before it starts the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmha.manager.core import facts as f
from kvmha.manager.core.model import PowerState, RequestId, StopCause, VmUuid
from kvmha.manager.sim.invariants import VM_LEVEL
from kvmha.manager.sim.world import SimHost

if TYPE_CHECKING:
    from kvmha.manager.sim.agents import Agents
    from kvmha.manager.sim.simulator import Simulator

PREPARE_S = 0.3  # the target's paused copy exists this long after the command arrives
COPY_BASE_S = 2.0  # memory copy time: base plus per GiB of the VM's memory
COPY_PER_GIB_S = 1.0
FAIL_NOTICE_S = 0.5  # the source's libvirt notices a dead target this long after


@dataclass(slots=True)
class SimMigration:
    uuid: VmUuid
    source: SimHost
    target: SimHost
    epoch: int
    request_id: RequestId | None  # None: started outside kvmha
    copying: bool = False  # the target's paused copy exists


class Migrations:
    def __init__(self, sim: Simulator, agents: Agents) -> None:
        self.sim = sim
        self.agents = agents
        self.active: dict[VmUuid, SimMigration] = {}

    def start(self, source: SimHost, uuid: VmUuid, target: SimHost, epoch: int, rid: RequestId | None) -> None:
        problem = self._refusal(source, uuid, target)
        if problem:
            self._answer(SimMigration(uuid, source, target, epoch, rid), False, problem)
            return
        migration = SimMigration(uuid, source, target, epoch, rid)
        self.active[uuid] = migration
        self.sim.schedule(self.sim.now + PREPARE_S, self._prepared, migration)

    def _refusal(self, source: SimHost, uuid: VmUuid, target: SimHost) -> str:
        if uuid not in source.running:
            return "ERROR_NOT_FOUND: the domain does not run here"
        if uuid in self.active:
            return "ERROR_LIBVIRT: a migration of this domain is already in progress"
        if source is target or uuid in target.running:
            return "ERROR_INVALID_ARGUMENT: the domain already runs on the target"
        if not (self.sim.world.reaches(source, target) and target.hypervisor_ok):
            return f"ERROR_LIBVIRT: cannot connect to {target.name}'s libvirt"
        return ""

    def _prepared(self, migration: SimMigration) -> None:
        if self.active.get(migration.uuid) is not migration:
            return
        if not self.sim.world.reaches(migration.source, migration.target):
            self._fail(migration, f"ERROR_LIBVIRT: connection to {migration.target.name} lost")
            return
        migration.copying = True
        migration.target.incoming.add(migration.uuid)
        self.agents.delta(migration.target, migration.uuid, PowerState.POWER_ON, StopCause.NONE, migrating=True)
        memory_gib = self.sim.world.vms[migration.uuid].memory_mib / 1024
        self.sim.schedule(self.sim.now + COPY_BASE_S + COPY_PER_GIB_S * memory_gib, self._switchover, migration)

    def _switchover(self, migration: SimMigration) -> None:
        if self.active.get(migration.uuid) is not migration:
            return
        source, target, uuid = migration.source, migration.target, migration.uuid
        if uuid not in source.running:
            self._fail(migration, "ERROR_LIBVIRT: domain is not running")
            return
        if not self.sim.world.reaches(source, target) or not target.hypervisor_ok:
            self._fail(migration, f"ERROR_LIBVIRT: connection to {target.name} lost")
            return
        del self.active[uuid]
        source.running.discard(uuid)
        self.sim.checker.stopped(uuid, source.id, VM_LEVEL)
        target.incoming.discard(uuid)
        target.running.add(uuid)
        self.sim.checker.started(uuid, target.id, self.sim.now)
        self.agents.delta(target, uuid, PowerState.POWER_ON, StopCause.NONE)
        self.agents.delta(source, uuid, PowerState.POWER_OFF, StopCause.MIGRATED)
        self._answer(migration, True, "")

    def _fail(self, migration: SimMigration, error: str) -> None:
        """libvirt gives up: the target's copy is destroyed, the guest goes on on the source."""
        if self.active.get(migration.uuid) is not migration:
            return
        del self.active[migration.uuid]
        target = migration.target
        if migration.uuid in target.incoming:
            target.incoming.discard(migration.uuid)
            if target.powered:
                self.agents.delta(target, migration.uuid, PowerState.POWER_OFF, StopCause.FAILED)
        if migration.source.powered:
            self._answer(migration, False, error)

    def _answer(self, migration: SimMigration, ok: bool, error: str) -> None:
        if migration.request_id is not None:
            fact = f.CommandCompleted(migration.request_id, ok, error)
            self.sim.schedule(self.sim.now + 0.05, self.agents.reply, migration.epoch, migration.source, fact)

    # ------------------------------------------------------------ faults

    def host_lost(self, host: SimHost) -> None:
        """The host lost power (or was fenced): its migrations end."""
        host.incoming.clear()
        for migration in [m for m in self.active.values() if host in (m.source, m.target)]:
            if host is migration.source:
                self._fail(migration, "")  # the target's copy dies with its source; nobody answers
            else:
                self.sim.schedule(self.sim.now + FAIL_NOTICE_S, self._fail, migration,
                                  f"ERROR_LIBVIRT: connection to {host.name} lost during the migration")

    def cancel(self, uuid: VmUuid) -> None:
        """virDomainAbortJob on the source: libvirt gives the migration up."""
        migration = self.active.get(uuid)
        if migration is not None:
            self._fail(migration, "ERROR_LIBVIRT: operation aborted: migration out job: canceled by client")

    def vm_stopped(self, host: SimHost, uuid: VmUuid) -> None:
        """The guest died on its source mid-migration: libvirt aborts the migration."""
        migration = self.active.get(uuid)
        if migration is not None and migration.source is host:
            self._fail(migration, "ERROR_LIBVIRT: domain is not running")
