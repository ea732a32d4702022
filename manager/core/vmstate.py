"""The VM state machine as data: (state, event) → next state, like `hoststate.TRANSITIONS`.

`VmState` is what the manager wants and believes of a VM (CloudStack's VirtualMachine.State); the power state is
what the hypervisor last said and changes freely. Every state change goes through `VmIndex.update(vm, event)`,
which reads this table; anything not in it raises `TransitionError`: a VM never drifts into a state nobody meant.

    Stopped ──START_SENT──> Starting ──CONFIRMED / REPORTED_ON──> Running ──START_SENT (HA restart)──> Starting
       ^                      │ START_FAILED ──> Stopped               │ POWERED_OFF (not restarted) ──> Stopped
       │                      └ GAVE_UP ──> Error ──OPERATOR_RESET──> Stopped
       └── OPERATOR_STOPPED <── Stopping <── STOP_REQUESTED (Running, Starting, Migrating)
    Unmanaged (a domain nobody registered) leaves only by registration: ADOPTED_RUNNING / ADOPTED_STOPPED.
    Running ──MIGRATION_STARTED──> Migrating ──MIGRATED (on the target) / MIGRATION_FAILED (on the source)──> Running
       (a kvmha MigrateVm, or a libvirt migration seen in the reports); Migrating ──START_SENT──> Starting when
       neither host holds it any more and HA restarts it, ──POWERED_OFF──> Stopped when it is not HA.
"""

from __future__ import annotations

import enum

from kvmha.manager.core.hoststate import TransitionError
from kvmha.manager.core.model import VmState

V = VmState


class VmEvent(enum.StrEnum):
    REPORTED_ON = "ReportedOn"  # its own host reports it running although the manager thought otherwise
    FOLLOWED = "Followed"  # reported running on another host: the record follows it there
    POWERED_OFF = "PoweredOff"  # known not to run (reported off, or its host is dead) and not restarted
    RESTART_LIMIT = "RestartLimit"  # restarted restart.max.per.window times already: not again
    START_SENT = "StartSent"  # HA work (or an operator start) sends StartVm
    START_FAILED = "StartFailed"  # the start surely did not happen
    GAVE_UP = "GaveUp"  # the HA work ended in Error
    CONFIRMED = "Confirmed"  # the target's power report shows it on
    OPERATOR_RESET = "OperatorReset"  # an operator start of a VM in Error (the manual clean-up)
    STOP_REQUESTED = "StopRequested"  # operator stop of a VM that holds resources on a host
    OPERATOR_STOPPED = "OperatorStopped"  # stopped by the operator, or nothing to stop
    ADOPTED_RUNNING = "AdoptedRunning"  # an Unmanaged domain registered while it runs
    ADOPTED_STOPPED = "AdoptedStopped"  # an Unmanaged domain registered while it is off
    MIGRATION_STARTED = "MigrationStarted"  # kvmha sent MigrateVm, or libvirt was seen migrating it
    MIGRATED = "Migrated"  # the migration completed: the VM runs on the target (its record moves there)
    MIGRATION_FAILED = "MigrationFailed"  # the migration did not complete: the VM runs on its source


_OCCUPYING = (V.STARTING, V.RUNNING, V.STOPPING, V.MIGRATING)  # registered states that hold resources on a host
_MANAGED = (*_OCCUPYING, V.STOPPED, V.ERROR)

TRANSITIONS: dict[tuple[VmState, VmEvent], VmState] = {
    **{(state, VmEvent.REPORTED_ON): V.RUNNING for state in (V.STOPPED, V.ERROR, V.STARTING)},
    # A VM being stopped that turns up elsewhere is followed but stays Stopping: the stop still has to land.
    **{(state, VmEvent.FOLLOWED): V.RUNNING for state in _MANAGED if state is not V.STOPPING},
    (V.STOPPING, VmEvent.FOLLOWED): V.STOPPING,
    **{(state, VmEvent.POWERED_OFF): V.STOPPED for state in _OCCUPYING},
    **{(state, VmEvent.RESTART_LIMIT): V.ERROR for state in _OCCUPYING},
    **{(state, VmEvent.START_SENT): V.STARTING for state in (*_OCCUPYING, V.STOPPED)},
    (V.STARTING, VmEvent.START_FAILED): V.STOPPED,
    (V.STARTING, VmEvent.GAVE_UP): V.ERROR,
    (V.STOPPED, VmEvent.GAVE_UP): V.ERROR,
    (V.STARTING, VmEvent.CONFIRMED): V.RUNNING,
    (V.ERROR, VmEvent.OPERATOR_RESET): V.STOPPED,
    **{(state, VmEvent.STOP_REQUESTED): V.STOPPING for state in _OCCUPYING},
    **{(state, VmEvent.OPERATOR_STOPPED): V.STOPPED for state in _MANAGED},
    (V.UNMANAGED, VmEvent.ADOPTED_RUNNING): V.RUNNING,
    (V.UNMANAGED, VmEvent.ADOPTED_STOPPED): V.STOPPED,
    (V.RUNNING, VmEvent.MIGRATION_STARTED): V.MIGRATING,
    (V.MIGRATING, VmEvent.MIGRATED): V.RUNNING,
    (V.MIGRATING, VmEvent.MIGRATION_FAILED): V.RUNNING,
}


def next_vm_state(state: VmState, event: VmEvent) -> VmState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no VM state change from {state.value} on {event.value}") from None
