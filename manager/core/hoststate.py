"""The host status machine as data: (status, event) → next status.

Anything not in the table is impossible and raises `TransitionError`: a dead end is a loud bug (CloudStack's
NoTransitionException stalls, #8326), never a silent stall. Every transition is audited by the caller with a reason.

    Connecting --READY--> Up --PING_TIMEOUT--> Investigating --VERDICT_DOWN--> Down
         ^                 |--LINK_LOST_POWER_OFF (link broke, BMC off at once)--> Down
         |                 |                        |  \\--VERDICT_ALIVE / FENCE_BLOCKED--> Alert --REINVESTIGATE--^
         |                 |                        \\--VERDICT_UNKNOWN--> Fencing --FENCE_OK--> Fenced
    AGENT_CONNECTED        \\--NO_HA_TIMEOUT / GOODBYE--> Disconnected        \\--FENCE_FAILED--> Alert
"""

from __future__ import annotations

import enum

from kvmha.manager.core.model import HostStatus

S = HostStatus


class HostEvent(enum.StrEnum):
    AGENT_CONNECTED = "AgentConnected"
    READY = "Ready"  # first full power report after connecting
    PING = "Ping"  # a ping on a live link while the host was being investigated
    PING_TIMEOUT = "PingTimeout"  # behind, to be investigated
    NO_HA_TIMEOUT = "NoHaTimeout"  # behind, but its resource state or role says: no investigation
    GOODBYE = "Goodbye"  # planned agent shutdown
    WAITED_TOO_LONG = "WaitedTooLong"  # a planned disconnect that did not come back
    LINK_LOST_POWER_OFF = "LinkLostPowerOff"  # its agent link broke and its BMC says off at once (linkloss.py)
    VERDICT_ALIVE = "VerdictAlive"
    VERDICT_DOWN = "VerdictDown"
    VERDICT_UNKNOWN = "VerdictUnknown"  # → fence
    FENCE_BLOCKED = "FenceBlocked"  # unknown, but fencing is not possible or not allowed now
    FENCE_OK = "FenceOk"
    FENCE_FAILED = "FenceFailed"
    REINVESTIGATE = "Reinvestigate"
    MANAGER_RESTARTED = "ManagerRestarted"  # restored mid-investigation/fence: start over
    REMOVE = "Remove"


class TransitionError(RuntimeError):
    pass


_LIVE = (S.CONNECTING, S.UP, S.DISCONNECTED, S.INVESTIGATING, S.ALERT, S.FENCED, S.DOWN)

TRANSITIONS: dict[tuple[HostStatus, HostEvent], HostStatus] = {
    # An agent may (re)connect from any state but Fencing and Removed: a fence in flight is never undone by a
    # reconnect, the service refuses the agent instead (see HostFlow.on_agent_connected).
    **{(status, HostEvent.AGENT_CONNECTED): S.CONNECTING for status in _LIVE},
    (S.CONNECTING, HostEvent.READY): S.UP,
    (S.CONNECTING, HostEvent.PING_TIMEOUT): S.INVESTIGATING,
    (S.CONNECTING, HostEvent.NO_HA_TIMEOUT): S.DISCONNECTED,
    (S.CONNECTING, HostEvent.GOODBYE): S.DISCONNECTED,
    (S.UP, HostEvent.PING_TIMEOUT): S.INVESTIGATING,
    (S.UP, HostEvent.NO_HA_TIMEOUT): S.DISCONNECTED,
    (S.UP, HostEvent.GOODBYE): S.DISCONNECTED,
    (S.UP, HostEvent.LINK_LOST_POWER_OFF): S.DOWN,
    (S.CONNECTING, HostEvent.LINK_LOST_POWER_OFF): S.DOWN,
    (S.DISCONNECTED, HostEvent.WAITED_TOO_LONG): S.INVESTIGATING,
    (S.INVESTIGATING, HostEvent.PING): S.UP,
    (S.ALERT, HostEvent.PING): S.UP,
    (S.INVESTIGATING, HostEvent.VERDICT_ALIVE): S.ALERT,
    (S.INVESTIGATING, HostEvent.VERDICT_DOWN): S.DOWN,
    (S.INVESTIGATING, HostEvent.VERDICT_UNKNOWN): S.FENCING,
    (S.INVESTIGATING, HostEvent.FENCE_BLOCKED): S.ALERT,
    (S.INVESTIGATING, HostEvent.GOODBYE): S.INVESTIGATING,
    (S.ALERT, HostEvent.REINVESTIGATE): S.INVESTIGATING,
    (S.ALERT, HostEvent.GOODBYE): S.ALERT,
    # A late success of an earlier fence attempt is still a confirmed power-off.
    (S.ALERT, HostEvent.FENCE_OK): S.FENCED,
    (S.INVESTIGATING, HostEvent.FENCE_OK): S.FENCED,
    (S.FENCING, HostEvent.FENCE_OK): S.FENCED,
    (S.FENCING, HostEvent.FENCE_FAILED): S.ALERT,
    (S.INVESTIGATING, HostEvent.MANAGER_RESTARTED): S.INVESTIGATING,
    (S.FENCING, HostEvent.MANAGER_RESTARTED): S.INVESTIGATING,
    (S.ALERT, HostEvent.MANAGER_RESTARTED): S.INVESTIGATING,
    **{(status, HostEvent.REMOVE): S.REMOVED for status in (*_LIVE, S.FENCING)},
}

# Statuses in which a host's agent link was lost unexpectedly and the host is not yet resolved.
SILENT = frozenset({S.INVESTIGATING, S.ALERT, S.FENCING})
# Statuses in which the host's VMs are known not to run: it may be restarted elsewhere.
DEAD = frozenset({S.DOWN, S.FENCED})


def next_status(status: HostStatus, event: HostEvent) -> HostStatus:
    try:
        return TRANSITIONS[(status, event)]
    except KeyError:
        raise TransitionError(f"no host transition from {status.value} on {event.value}") from None
