"""kvmha-watchdog's logic with a fake device and a fake clock: the mux's states walked one by one, then the daemon's
promise checked over random client histories: the device is never left unpetted while every client is alive, and
it fires at most `timeout_s` after the last pet of a client that died, hung or lost its link."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmha.agent.watchdog_daemon import Daemon, DaemonConfig
from kvmha.agent.watchdog_mux import ArmState, Mux

D = 10.0  # device timeout
P = 1.0  # pet interval
T = 20.0  # the client's timeout: silence limit T - D = 10 s


def armed_mux(now: float = 0.0) -> Mux:
    mux = Mux(D, P)
    assert mux.arm(1, "kvmha-agent", T, now).ok
    verdict = mux.verdict(now)
    assert verdict.pet and verdict.open_device
    mux.device_opened(now)
    return mux


def test_a_live_client_within_its_limit_keeps_the_device_petted() -> None:
    mux = armed_mux()
    for t in range(1, 60):
        assert mux.pet(1, {"contact_at": t}, float(t))
        verdict = mux.verdict(t + 0.5)
        assert verdict.pet and not verdict.open_device, verdict
        mux.device_petted(t + 0.5)
    assert mux.status(60.0)["clients"][0]["state"] == "live"


def test_silence_beyond_timeout_minus_device_timeout_stops_the_pets_for_good() -> None:
    mux = armed_mux()
    assert mux.verdict(T - D).pet  # exactly at the limit: still alive
    verdict = mux.verdict(T - D + 0.01)
    assert not verdict.pet and "silent" in verdict.reason
    assert mux.arms["kvmha-agent"].state is ArmState.EXPIRED
    assert not mux.pet(1, None, 11.0)  # a client waking up late (SIGCONT) does not undo it
    assert not mux.verdict(11.0).pet
    assert not mux.disarm(1) or not mux.verdict(12.0).pet  # nor does a late disarm
    refused = mux.arm(2, "kvmha-agent", T, 12.0)
    assert not refused.ok and "being reset" in refused.error


def test_a_lost_connection_stops_the_pets_and_the_same_identity_takes_over_with_the_note() -> None:
    mux = armed_mux()
    mux.pet(1, {"contact_at": 3.0}, 3.0)
    mux.device_petted(3.0)
    mux.disconnect(1, 3.5)
    verdict = mux.verdict(4.0)
    assert not verdict.pet and "re-arm" in verdict.reason
    assert not mux.arm(2, "other", T, 4.0).ok or not mux.verdict(4.0).pet  # another client does not lift it
    taken = mux.arm(3, "kvmha-agent", T, 8.0)  # a restarted agent, 5 s after the last device pet (< D)
    assert taken.ok and taken.takeover and taken.note == {"contact_at": 3.0}
    mux.disarm(2)
    assert mux.verdict(8.0).pet


def test_a_takeover_is_not_a_pet() -> None:
    """A restarted agent that arms but withholds its pets (its isolation response is due) is reset when its
    predecessor would have been: the silence counts from the old agent's last pet."""
    mux = armed_mux()
    mux.pet(1, None, 4.0)
    mux.device_petted(4.0)
    mux.disconnect(1, 5.0)
    assert mux.arm(2, "kvmha-agent", T, 7.0).takeover
    mux.device_petted(7.0)
    assert mux.verdict(4.0 + (T - D)).pet
    assert not mux.verdict(4.0 + (T - D) + 0.1).pet and mux.doomed is not None


def test_an_orphan_not_taken_over_within_the_device_timeout_dooms_the_host() -> None:
    mux = armed_mux()
    mux.device_petted(2.0)
    mux.disconnect(1, 2.5)
    assert not mux.verdict(11.9).pet and mux.doomed is None
    assert not mux.verdict(12.0).pet and mux.doomed is not None  # the device must have fired by now
    assert not mux.arm(2, "kvmha-agent", T, 12.5).ok


def test_a_second_live_connection_cannot_arm_the_same_identity() -> None:
    mux = armed_mux()
    refused = mux.arm(2, "kvmha-agent", T, 1.0)
    assert not refused.ok and "another live connection" in refused.error
    assert not mux.arm(1, "again", T, 1.0).ok  # one arm per connection


@pytest.mark.parametrize(("client", "timeout_s", "error"), [
    ("", T, "client must be"),
    ("x" * 65, T, "client must be"),
    ("bad id", T, "client must be"),
    ("ok", D + 2 * P - 0.1, "timeout_s must be between"),
    ("ok", float("nan"), "timeout_s must be between"),
    ("ok", 7200.0, "timeout_s must be between"),
])
def test_bad_arms_are_refused_with_the_reason(client: str, timeout_s: float, error: str) -> None:
    result = Mux(D, P).arm(1, client, timeout_s, 0.0)
    assert not result.ok and error in result.error


def test_clean_disarm_of_the_last_client_closes_the_device_with_the_magic_close() -> None:
    mux = armed_mux()
    assert mux.arm(2, "second", T, 0.0).ok
    assert mux.disarm(1)
    assert mux.verdict(1.0).pet
    assert mux.disarm(2)
    verdict = mux.verdict(2.0)
    assert not verdict.pet and verdict.close_device
    mux.device_closed()
    assert not mux.verdict(3.0).close_device


def test_too_many_clients_are_refused() -> None:
    mux = Mux(D, P, max_clients=2)
    assert mux.arm(1, "a", T, 0.0).ok and mux.arm(2, "b", T, 0.0).ok
    assert "too many" in mux.arm(3, "c", T, 0.0).error


# ---------------------------------------------------------------------------------------------- the daemon, faked


@dataclass
class FakeDevice:
    """A hardware timer: fires `timeout` after the last keepalive while open and not magic-closed."""

    name: str = "fake"
    can_disarm: bool = True
    timeout_s: int = 0
    open_at: float | None = None
    last_keepalive_at: float | None = None
    disarmed: bool = False
    now: list[float] = field(default_factory=lambda: [0.0])

    def open(self, timeout_s: int) -> int:
        self.timeout_s, self.open_at, self.last_keepalive_at, self.disarmed = timeout_s, self.now[0], self.now[0], False
        return timeout_s

    def keepalive(self) -> None:
        assert self.open_at is not None, "petted while closed"
        self.last_keepalive_at = self.now[0]

    def close(self, disarm: bool) -> None:
        self.disarmed = disarm
        if disarm:
            self.open_at = None

    def fires_at(self) -> float | None:
        if self.open_at is None or self.last_keepalive_at is None:
            return None
        return self.last_keepalive_at + self.timeout_s


MARKER_DIR = Path(tempfile.mkdtemp(prefix="kvmha-watchdog-test-"))


@pytest.fixture(scope="module", autouse=True)
def _marker_dir() -> Iterator[None]:
    yield
    shutil.rmtree(MARKER_DIR, ignore_errors=True)


def make_daemon(device: FakeDevice) -> Daemon:
    cfg = DaemonConfig(device="fake", device_timeout_s=int(D), pet_interval_s=P,
                       active_marker=str(MARKER_DIR / "active"), socket=str(MARKER_DIR / "unused.sock"))
    return Daemon(cfg, device, clock=lambda: device.now[0])


@dataclass(frozen=True)
class History:
    """One client: pets every `pet_every_s` until `stop_at`, then ends by `how`; optionally restarted."""

    pet_every_s: float
    stop_at: float
    how: str  # "hang" (silent, connection open), "crash" (closed, no disarm), "disarm"
    restart_after_s: float | None  # for "crash": a new process arms the same identity this long after


def run(history: History, end: float = 120.0, tick_s: float = 0.05) -> tuple[FakeDevice, float]:
    """Drive a daemon on a fake clock; returns the device and the client's last pet time."""
    device = FakeDevice()
    daemon = make_daemon(device)
    answer, _ = daemon.on_message(1, {"op": "arm", "client": "kvmha-agent", "timeout_s": T}, 0.0)
    assert answer is not None and answer["ok"], answer
    conn, last_pet, next_pet, next_tick = 1, 0.0, history.pet_every_s, P
    restart_at = None
    t = 0.0
    while t < end:
        t = round(t + tick_s, 6)
        device.now[0] = t
        fires = device.fires_at()
        if fires is not None and t >= fires:
            break  # the host resets here
        if conn and t >= next_pet and t < history.stop_at:
            daemon.on_message(conn, {"op": "pet", "note": {"t": t}}, t)
            last_pet, next_pet = t, t + history.pet_every_s
        if conn and t >= history.stop_at:
            if history.how == "crash":
                daemon.on_closed(conn, t)
                conn = 0
                if history.restart_after_s is not None:
                    restart_at = t + history.restart_after_s
            elif history.how == "disarm":
                daemon.on_message(conn, {"op": "disarm"}, t)
                daemon.on_closed(conn, t)
                conn = 0
        if restart_at is not None and t >= restart_at:
            restart_at = None
            reply: dict[str, Any] | None
            reply, _ = daemon.on_message(2, {"op": "arm", "client": "kvmha-agent", "timeout_s": T}, t)
            if reply is not None and reply["ok"]:
                # Arming is not a pet: the new process pets at once (as kvmha.agent.watchdog_client.arm_at_start).
                daemon.on_message(2, {"op": "pet"}, t)
                conn, last_pet, next_pet, history = 2, t, t + history.pet_every_s, History(
                    history.pet_every_s, end + 1, "hang", None)
        if t >= next_tick:
            daemon.tick(t)
            next_tick += P
    return device, last_pet


@settings(max_examples=150, deadline=None)
@given(pet_every_s=st.floats(0.2, 2.0), stop_at=st.floats(1.0, 60.0), how=st.sampled_from(["hang", "crash"]))
def test_a_client_that_stops_petting_is_followed_by_a_reset_within_its_timeout(
        pet_every_s: float, stop_at: float, how: str) -> None:
    device, last_pet = run(History(pet_every_s, stop_at, how, None))
    fires = device.fires_at()
    assert fires is not None, "the device was disarmed"
    assert fires <= last_pet + T + 0.1, f"reset {fires - last_pet:.2f} s after the last pet (promise: {T} s)"
    if how == "crash":  # a lost connection stops the pets at once: the reset comes within the device timeout
        assert fires <= stop_at + D + 0.1


@settings(max_examples=100, deadline=None)
@given(pet_every_s=st.floats(0.2, 2.0), stop_at=st.floats(1.0, 30.0), restart_fraction=st.floats(0.0, 1.0))
def test_a_crashed_client_restarted_within_the_device_timeout_takes_over_without_a_reset(
        pet_every_s: float, stop_at: float, restart_fraction: float) -> None:
    # The new process must arm (and pet) before the device fires (D after the daemon's last pet, up to P before the
    # crash) and within the silence limit T - D counted from the old client's last pet (up to one of its pet
    # intervals before the crash): here T - D = D.
    restart_after_s = 0.1 + restart_fraction * (min(D, T - D) - P - pet_every_s - 0.3)
    device, _ = run(History(pet_every_s, stop_at, "crash", restart_after_s), end=90.0)
    fires = device.fires_at()
    assert fires is not None and fires > 90.0, f"reset at {fires} despite the restart after {restart_after_s} s"


def test_a_crashed_client_restarted_too_late_does_not_stop_the_reset() -> None:
    device, _ = run(History(1.0, 10.0, "crash", D + 1.0), end=60.0)
    fires = device.fires_at()
    assert fires is not None and fires <= 10.0 + D + 0.1


def test_a_clean_disarm_stops_the_device() -> None:
    device, _ = run(History(1.0, 10.0, "disarm", None), end=60.0)
    assert device.disarmed and device.fires_at() is None


def test_a_daemon_stopped_with_an_armed_client_leaves_the_device_armed() -> None:
    device = FakeDevice()
    daemon = make_daemon(device)
    daemon.on_message(1, {"op": "arm", "client": "kvmha-agent", "timeout_s": T}, 0.0)
    assert daemon.finish(1.0) == 1 and not device.disarmed and device.fires_at() == D
    idle = FakeDevice()
    assert make_daemon(idle).finish(0.0) == 0 and idle.open_at is None  # never opened, nothing to do


def test_a_device_that_cannot_be_disarmed_is_petted_forever() -> None:
    device = FakeDevice(can_disarm=False)
    daemon = make_daemon(device)
    daemon.on_message(1, {"op": "arm", "client": "kvmha-agent", "timeout_s": T}, 0.0)
    daemon.on_message(1, {"op": "disarm"}, 1.0)
    for t in (2.0, 3.0, 30.0):
        device.now[0] = t
        daemon.tick(t)
        assert device.last_keepalive_at == t and not device.disarmed
