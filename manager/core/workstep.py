"""The HA work item's step machine as data: (step, event) → next step, like `hoststate.TRANSITIONS`.

Anything not in the table is impossible and raises `TransitionError`. The scheduler moves every item through
`next_step` only, so the table is the whole story of an item:

    Scheduled ──WAIT_VERDICT/WAIT_POWER──> Investigating ──WAIT_FENCE──> Fencing      (and back, as the host moves)
        │  ^                                    │                            │
        │  └──────────── NO_CAPACITY ───────────┴────────────────────────────┤
        └──START──> Restarting ──CONFIRMED──> Done                            │ START
                       │   └──GIVE_UP──> Error                                v
                       └──START_FAILED──> Scheduled                      Restarting
    CANCEL ends any active item (Cancelled). Done, Error and Cancelled are final. Stopping belongs to the stop
    work types CloudStack has; HA work never enters it.

Migration items (WorkType.MIGRATION, core/migration.py) use the same table and their own three events:

    Scheduled ──MIGRATE──> Migrating ──MIGRATED──> Done          (the VM lives on the target)
                               ├──MIGRATION_FAILED──> Error     (it stays on the source, or neither holds it)
                               └──CANCEL──> Cancelled           (the VM moved on: deleted, stopped, ...)
"""

from __future__ import annotations

import enum

from kvmha.manager.core.hoststate import TransitionError
from kvmha.manager.core.model import WorkStep

W = WorkStep


class WorkEvent(enum.StrEnum):
    WAIT_VERDICT = "WaitVerdict"  # its VM's host is being investigated (or has not sent its first report)
    WAIT_FENCE = "WaitFence"  # its VM's host is being fenced
    WAIT_POWER = "WaitPower"  # the host is up, the VM's power state there is not known yet
    NO_CAPACITY = "NoCapacity"  # nowhere to place it: try again later
    START = "Start"  # StartVm sent to the chosen host
    START_FAILED = "StartFailed"  # the attempt failed and attempts are left: scheduled again
    GIVE_UP = "GiveUp"  # the last attempt failed
    CONFIRMED = "Confirmed"  # the target's power report shows the VM on
    CANCEL = "Cancel"  # the VM moved on (deleted, HA off, found running, stopped by the operator, ...)
    MIGRATE = "Migrate"  # MigrateVm sent to the VM's source host
    MIGRATED = "Migrated"  # the VM lives on the target
    MIGRATION_FAILED = "MigrationFailed"  # the migration did not happen (the VM stays on its source, or died)


_WAITING = (W.SCHEDULED, W.INVESTIGATING, W.FENCING)

TRANSITIONS: dict[tuple[WorkStep, WorkEvent], WorkStep] = {
    **{(step, WorkEvent.WAIT_VERDICT): W.INVESTIGATING for step in _WAITING},
    **{(step, WorkEvent.WAIT_POWER): W.INVESTIGATING for step in _WAITING},
    **{(step, WorkEvent.WAIT_FENCE): W.FENCING for step in _WAITING},
    **{(step, WorkEvent.NO_CAPACITY): W.SCHEDULED for step in _WAITING},
    **{(step, WorkEvent.START): W.RESTARTING for step in _WAITING},
    (W.RESTARTING, WorkEvent.START_FAILED): W.SCHEDULED,
    (W.RESTARTING, WorkEvent.GIVE_UP): W.ERROR,
    (W.RESTARTING, WorkEvent.CONFIRMED): W.DONE,
    **{(step, WorkEvent.CANCEL): W.CANCELLED for step in (*_WAITING, W.RESTARTING, W.MIGRATING)},
    (W.SCHEDULED, WorkEvent.MIGRATE): W.MIGRATING,
    (W.MIGRATING, WorkEvent.MIGRATED): W.DONE,
    (W.MIGRATING, WorkEvent.MIGRATION_FAILED): W.ERROR,
}

FINAL = frozenset(step for step in WorkStep if not step.active)


def next_step(step: WorkStep, event: WorkEvent) -> WorkStep:
    try:
        return TRANSITIONS[(step, event)]
    except KeyError:
        raise TransitionError(f"no work step change from {step.value} on {event.value}") from None
