"""libvirt's states, reasons and lifecycle events decoded into the wire's Power + Cause, against libvirt's constants.

The contract suite produces the common ones for real (boot, guest shutdown, destroy, SIGKILL); the rest (crash with
on_crash=preserve, migration, save, pause) are checked here against the constants of the libvirt bindings.
"""

from __future__ import annotations

import libvirt
import pytest

from kvmha.agent.hypervisor import Cause, Power
from kvmha.agent.libvirt_adapter import decode_event, decode_state
from kvmha.proto.v1 import agent_pb2 as pb

L = libvirt


@pytest.mark.parametrize(("state", "reason", "power", "cause", "text"), [
    (L.VIR_DOMAIN_RUNNING, L.VIR_DOMAIN_RUNNING_BOOTED, Power.ON, Cause.BOOTED, "RUNNING_BOOTED"),
    (L.VIR_DOMAIN_RUNNING, L.VIR_DOMAIN_RUNNING_UNPAUSED, Power.ON, Cause.OTHER, "RUNNING_5"),
    (L.VIR_DOMAIN_SHUTOFF, L.VIR_DOMAIN_SHUTOFF_SHUTDOWN, Power.OFF, Cause.GUEST_SHUTDOWN, "SHUTOFF_SHUTDOWN"),
    (L.VIR_DOMAIN_SHUTOFF, L.VIR_DOMAIN_SHUTOFF_DESTROYED, Power.OFF, Cause.DESTROYED, "SHUTOFF_DESTROYED"),
    (L.VIR_DOMAIN_SHUTOFF, L.VIR_DOMAIN_SHUTOFF_CRASHED, Power.OFF, Cause.CRASHED, "SHUTOFF_CRASHED"),
    (L.VIR_DOMAIN_SHUTOFF, L.VIR_DOMAIN_SHUTOFF_FAILED, Power.OFF, Cause.FAILED, "SHUTOFF_FAILED"),
    (L.VIR_DOMAIN_SHUTOFF, L.VIR_DOMAIN_SHUTOFF_MIGRATED, Power.OFF, Cause.MIGRATED, "SHUTOFF_MIGRATED"),
    (L.VIR_DOMAIN_SHUTOFF, L.VIR_DOMAIN_SHUTOFF_SAVED, Power.OFF, Cause.SAVED, "SHUTOFF_SAVED"),
    (L.VIR_DOMAIN_SHUTOFF, L.VIR_DOMAIN_SHUTOFF_UNKNOWN, Power.OFF, Cause.OTHER, "SHUTOFF_UNKNOWN"),
    (L.VIR_DOMAIN_SHUTOFF, L.VIR_DOMAIN_SHUTOFF_DAEMON, Power.OFF, Cause.OTHER, "SHUTOFF_DAEMON"),
    (L.VIR_DOMAIN_CRASHED, L.VIR_DOMAIN_CRASHED_PANICKED, Power.CRASHED, Cause.CRASHED, "CRASHED_1"),
    (L.VIR_DOMAIN_PAUSED, L.VIR_DOMAIN_PAUSED_IOERROR, Power.PAUSED, Cause.PAUSED, "PAUSED_5"),
    (L.VIR_DOMAIN_PMSUSPENDED, 0, Power.PAUSED, Cause.PAUSED, "PMSUSPENDED_0"),
    (L.VIR_DOMAIN_SHUTDOWN, 0, Power.ON, Cause.OTHER, "SHUTDOWN_0"),
    (L.VIR_DOMAIN_NOSTATE, 0, Power.UNKNOWN, Cause.OTHER, "NOSTATE_0"),
])
def test_decode_state(state: int, reason: int, power: Power, cause: Cause, text: str) -> None:
    assert decode_state(state, reason) == (power, cause, text)


@pytest.mark.parametrize(("event", "detail", "power", "cause", "text"), [
    (L.VIR_DOMAIN_EVENT_STARTED, L.VIR_DOMAIN_EVENT_STARTED_BOOTED, Power.ON, Cause.BOOTED, "STARTED_BOOTED"),
    (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN, Power.OFF, Cause.GUEST_SHUTDOWN,
     "STOPPED_SHUTDOWN"),
    (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, Power.OFF, Cause.DESTROYED,
     "STOPPED_DESTROYED"),
    (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_CRASHED, Power.OFF, Cause.CRASHED, "STOPPED_CRASHED"),
    (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_FAILED, Power.OFF, Cause.FAILED, "STOPPED_FAILED"),
    (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, Power.OFF, Cause.MIGRATED,
     "STOPPED_MIGRATED"),
    (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_SAVED, Power.OFF, Cause.SAVED, "STOPPED_SAVED"),
    (L.VIR_DOMAIN_EVENT_STOPPED, L.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT, Power.OFF, Cause.OTHER,
     "STOPPED_FROM_SNAPSHOT"),
    (L.VIR_DOMAIN_EVENT_CRASHED, L.VIR_DOMAIN_EVENT_CRASHED_PANICKED, Power.CRASHED, Cause.CRASHED, "CRASHED_0"),
    (L.VIR_DOMAIN_EVENT_SUSPENDED, L.VIR_DOMAIN_EVENT_SUSPENDED_IOERROR, Power.PAUSED, Cause.PAUSED,
     "SUSPENDED_2"),
    (L.VIR_DOMAIN_EVENT_RESUMED, 0, Power.ON, Cause.OTHER, "RESUMED_0"),
    (L.VIR_DOMAIN_EVENT_SHUTDOWN, L.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST, Power.ON, Cause.OTHER, "SHUTDOWN_GUEST"),
])
def test_decode_event(event: int, detail: int, power: Power, cause: Cause, text: str) -> None:
    decoded = decode_event(event, detail)
    assert decoded is not None
    assert (decoded[0], decoded[1], decoded[4]) == (power, cause, text)


def test_definition_events_make_no_delta() -> None:
    assert decode_event(L.VIR_DOMAIN_EVENT_DEFINED, 0) is None
    assert decode_event(L.VIR_DOMAIN_EVENT_UNDEFINED, 0) is None


def test_every_power_and_cause_exists_on_the_wire() -> None:
    assert {p.value for p in Power} <= set(pb.PowerState.keys())
    assert {c.value for c in Cause} <= set(pb.StateCause.keys())
