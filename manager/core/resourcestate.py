"""The host resource-state machine as data: (resource state, event) → next, like `hoststate.TRANSITIONS`.

The resource state is what the operator allows on a host (CloudStack's ResourceState); the status (hoststate) is
its health. Anything not in the table raises `TransitionError`; core/maintenance.py moves hosts through it only.

    Enabled ──DISABLE──> Disabled ──ENABLE──> Enabled
    Enabled / Disabled / ErrorInMaintenance ──PREPARE──> PrepareForMaintenance ──EMPTIED──> Maintenance
                                                            └──STUCK──> ErrorInMaintenance (a VM cannot move)
    PrepareForMaintenance / Maintenance / ErrorInMaintenance ──LEAVE (maintenance off)──> Enabled

Placement takes only Enabled hosts. Host HA (investigation, fencing, restarting the host's VMs) covers every
resource state but Maintenance — and Disabled when `ha.disabled.hosts` is false (the seed's MonitorTask rule) — so a
host being emptied, or left in ErrorInMaintenance with VMs on it, still protects them.
"""

from __future__ import annotations

import enum

from kvmha.manager.core.hoststate import TransitionError
from kvmha.manager.core.model import ResourceState

R = ResourceState


class ResourceEvent(enum.StrEnum):
    DISABLE = "Disable"  # the operator: no new VMs here
    ENABLE = "Enable"
    PREPARE = "Prepare"  # the operator asked for maintenance: move every running VM off
    EMPTIED = "Emptied"  # no VM holds resources here any more
    STUCK = "Stuck"  # a VM cannot move (no target, a failed migration, an unmanaged domain)
    LEAVE = "Leave"  # maintenance off: back in service


TRANSITIONS: dict[tuple[ResourceState, ResourceEvent], ResourceState] = {
    (R.ENABLED, ResourceEvent.DISABLE): R.DISABLED,
    (R.DISABLED, ResourceEvent.ENABLE): R.ENABLED,
    **{(state, ResourceEvent.PREPARE): R.PREPARE_FOR_MAINTENANCE for state in (R.ENABLED, R.DISABLED,
                                                                             R.ERROR_IN_MAINTENANCE)},
    (R.PREPARE_FOR_MAINTENANCE, ResourceEvent.EMPTIED): R.MAINTENANCE,
    (R.PREPARE_FOR_MAINTENANCE, ResourceEvent.STUCK): R.ERROR_IN_MAINTENANCE,
    **{(state, ResourceEvent.LEAVE): R.ENABLED for state in (R.PREPARE_FOR_MAINTENANCE, R.MAINTENANCE,
                                                           R.ERROR_IN_MAINTENANCE)},
}

IN_MAINTENANCE = frozenset({R.PREPARE_FOR_MAINTENANCE, R.MAINTENANCE, R.ERROR_IN_MAINTENANCE})


def next_resource_state(state: ResourceState, event: ResourceEvent) -> ResourceState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no resource state change from {state.value} on {event.value}") from None
