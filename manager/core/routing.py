"""Typed routing values of the core: what a timer is for, and who waits for the answer of a command in flight.

Every deadline the core arms is keyed by one of the `TimerKey` classes and every command or fence it sends is
owned by one of the `Owner` classes. The core dispatches both with `match` + `typing.assert_never`, so mypy proves
that every timer and every answer has a handler: adding a class to a union without a branch is a type error, not a
silently dropped answer (a DestroyVm answer used to match no string and vanish without an event).

All values are frozen and hashable (timer keys index `Timers`); each carries the id its handler needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmha.manager.core.model import HostId, RequestId, VmId, WorkId

# ---------------------------------------------------------------- timers


@dataclass(frozen=True, slots=True)
class CommandDeadline:
    """A command or fence got no answer in time: it fails inside the core (its owner hears "timed out")."""

    request_id: RequestId


@dataclass(frozen=True, slots=True)
class InvestigationDeadline:
    """Decide on the evidence gathered so far about a silent host."""

    host_id: HostId


@dataclass(frozen=True, slots=True)
class Reinvestigate:
    """Look again at a host in Alert (or one restored mid-investigation)."""

    host_id: HostId


@dataclass(frozen=True, slots=True)
class PlannedWaitOver:
    """A host whose agent said Goodbye did not come back within planned.disconnect.wait."""

    host_id: HostId


@dataclass(frozen=True, slots=True)
class RejoinDeadline:
    """After a manager restart, a host restored as Up had the whole startup grace to reconnect."""

    host_id: HostId


@dataclass(frozen=True, slots=True)
class FirstPingDue:
    """A host whose agent connected has not pinged yet: judged when its first-ping window ends (core/hostflow.py)."""

    host_id: HostId


@dataclass(frozen=True, slots=True)
class LinkLossRecheck:
    """Ask the BMC of a host whose link broke again: its first answer said on (core/linkloss.py)."""

    host_id: HostId


@dataclass(frozen=True, slots=True)
class WorkDue:
    """An HA work item is due for another look (retry time, or a wait for power information)."""

    work_id: WorkId


@dataclass(frozen=True, slots=True)
class StartConfirmDeadline:
    """A started VM must show up in its target's power report by now."""

    work_id: WorkId


@dataclass(frozen=True, slots=True)
class AbsenceGraceOver:
    """A VM absent from its host's full report for power.report.missing.grace is PowerReportMissing."""

    vm_id: VmId


@dataclass(frozen=True, slots=True)
class MaintenanceDue:
    """A host in PrepareForMaintenance: look again at what is left on it (core/maintenance.py)."""

    host_id: HostId


HostTimer = InvestigationDeadline | Reinvestigate | PlannedWaitOver | RejoinDeadline | FirstPingDue
TimerKey = (
    CommandDeadline | HostTimer | LinkLossRecheck | WorkDue | StartConfirmDeadline | AbsenceGraceOver | MaintenanceDue
)
HOST_TIMERS: tuple[type[HostTimer], ...] = (InvestigationDeadline, Reinvestigate, PlannedWaitOver, RejoinDeadline,
                                            FirstPingDue)

# ---------------------------------------------------------------- owners of commands in flight


@dataclass(frozen=True, slots=True)
class NeighborQuery:
    """CheckNeighbor sent to a neighbour of the investigated host `about`."""

    about: HostId


@dataclass(frozen=True, slots=True)
class BmcQuery:
    """QueryBmc of the investigated host `about`."""

    about: HostId


@dataclass(frozen=True, slots=True)
class LinkLossQuery:
    """QueryBmc sent the moment the agent link of host `about` broke (evidence at once, `core/linkloss.py`)."""

    about: HostId


@dataclass(frozen=True, slots=True)
class FenceRequest:
    host_id: HostId


@dataclass(frozen=True, slots=True)
class StartAttempt:
    """StartVm of an HA work item."""

    work_id: WorkId


@dataclass(frozen=True, slots=True)
class OperatorStop:
    vm_id: VmId


@dataclass(frozen=True, slots=True)
class OperatorDestroy:
    """DestroyVm of a deleted VM's domain; the record is gone, so the name travels with the request."""

    vm_id: VmId
    vm_name: str


@dataclass(frozen=True, slots=True)
class LeaseQuery:
    """CheckLease of one VM of the investigated host `about`, sent to a neighbour."""

    about: HostId
    vm_id: VmId


@dataclass(frozen=True, slots=True)
class MigrationAttempt:
    """MigrateVm of a Migration work item (sent to the VM's source host)."""

    work_id: WorkId


@dataclass(frozen=True, slots=True)
class MigrationCancel:
    """CancelMigration of a Migration work item; its MigrateVm's failed answer then settles it on the source."""

    work_id: WorkId


Owner = (
    NeighborQuery
    | LeaseQuery
    | BmcQuery
    | LinkLossQuery
    | FenceRequest
    | StartAttempt
    | OperatorStop
    | OperatorDestroy
    | MigrationAttempt
    | MigrationCancel
)


@dataclass(slots=True)
class Pending:
    """A command or fence in flight: who waits for it, where it runs, and since when."""

    owner: Owner
    host_id: HostId  # where it runs (the agent's host, or the host being fenced / queried)
    sent_at: float  # when it left: the decision's time, moved by CommandsDispatched when it left later
    timeout_s: float
