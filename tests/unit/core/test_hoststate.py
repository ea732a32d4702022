"""The host status machine: the table's content, loud impossible transitions, and no dead ends."""

from __future__ import annotations

import pytest

from kvmha.manager.core.hoststate import TRANSITIONS, HostEvent, TransitionError, next_status
from kvmha.manager.core.model import HostStatus

S, E = HostStatus, HostEvent

EXPECTED = [
    (S.CONNECTING, E.READY, S.UP),
    (S.UP, E.PING_TIMEOUT, S.INVESTIGATING),
    (S.UP, E.NO_HA_TIMEOUT, S.DISCONNECTED),
    (S.UP, E.GOODBYE, S.DISCONNECTED),
    (S.DISCONNECTED, E.WAITED_TOO_LONG, S.INVESTIGATING),
    (S.INVESTIGATING, E.VERDICT_DOWN, S.DOWN),
    (S.INVESTIGATING, E.VERDICT_ALIVE, S.ALERT),
    (S.INVESTIGATING, E.VERDICT_UNKNOWN, S.FENCING),
    (S.INVESTIGATING, E.FENCE_BLOCKED, S.ALERT),
    (S.INVESTIGATING, E.PING, S.UP),
    (S.ALERT, E.REINVESTIGATE, S.INVESTIGATING),
    (S.FENCING, E.FENCE_OK, S.FENCED),
    (S.FENCING, E.FENCE_FAILED, S.ALERT),
    (S.ALERT, E.FENCE_OK, S.FENCED),
    (S.DOWN, E.AGENT_CONNECTED, S.CONNECTING),
    (S.FENCED, E.AGENT_CONNECTED, S.CONNECTING),
    (S.FENCING, E.MANAGER_RESTARTED, S.INVESTIGATING),
    (S.UP, E.REMOVE, S.REMOVED),
]


@pytest.mark.parametrize(("status", "event", "expected"), EXPECTED)
def test_transition(status: HostStatus, event: HostEvent, expected: HostStatus) -> None:
    assert next_status(status, event) is expected


IMPOSSIBLE = [
    (S.UP, E.FENCE_OK),  # nobody fences an Up host
    (S.DOWN, E.READY),
    (S.FENCING, E.AGENT_CONNECTED),  # a fence in flight is never undone by a reconnect
    (S.FENCING, E.PING),
    (S.UP, E.VERDICT_DOWN),
    (S.REMOVED, E.AGENT_CONNECTED),
    (S.DOWN, E.FENCE_FAILED),
]


@pytest.mark.parametrize(("status", "event"), IMPOSSIBLE)
def test_impossible_transition_is_loud(status: HostStatus, event: HostEvent) -> None:
    with pytest.raises(TransitionError, match=status.value):
        next_status(status, event)


def test_every_live_status_can_get_back_to_up() -> None:
    """No dead ends: from every status but Removed some sequence of events leads back to Up."""
    reaches_up = {S.UP}
    changed = True
    while changed:
        changed = False
        for (source, _event), target in TRANSITIONS.items():
            if target in reaches_up and source not in reaches_up:
                reaches_up.add(source)
                changed = True
    assert set(HostStatus) - reaches_up == {S.REMOVED}


def test_every_status_but_removed_has_a_way_out() -> None:
    sources = {source for source, _ in TRANSITIONS}
    assert set(HostStatus) - sources == {S.REMOVED}
