"""kvmha-watchdog's decisions, without I/O: who armed the watchdog, and may the device be petted now.

Theory of operation (modelled on Proxmox's watchdog-mux, see docs/watchdog.md):

- The daemon owns one watchdog device. It opens (starts) it when the first client arms and pets it every
  `pet_interval_s` for as long as *every* armed client is alive. A device that is not petted for
  `device_timeout_s` resets the host; that is the whole mechanism, and it does not need the daemon's goodwill:
  a daemon that dies leaves the device armed.
- A client arms with an identity (`client`, e.g. "kvmha-agent") and a `timeout_s`: the longest time from its last
  pet to the host's reset. The daemon stops petting once the client has been silent for
  `timeout_s - device_timeout_s`; the device then fires `device_timeout_s` later, so the reset comes at most
  `timeout_s` after the client's last pet. A client that is silent past that limit is EXPIRED, and that is latched
  (the daemon never pets again before the reset): a client that wakes up late (SIGCONT) may have missed its
  isolation deadline, and a host that lets it carry on would break the promise the manager counts on.
- A client whose connection ends without the clean disarm is ORPHANED: the daemon stops petting at once (the
  reset follows within `device_timeout_s`) unless a new connection arms *the same identity* before the device
  would fire. That is how a crashed agent restarted by systemd takes over the old arm without a reset. The new
  client receives the old client's last `note` (the agent stores there when it last had contact, so the restarted
  agent keeps the old isolation deadline instead of starting a fresh one). Arming is not a pet: the taken-over arm
  keeps the old client's last pet, so a restarted agent that withholds its pets (its isolation response is due and
  not done) is reset as its predecessor would have been, no later.
- A clean disarm removes the arm. With no arm left the device is closed with the magic close (disarmed), so a
  host with no HA agent running is never reset by a daemon it does not need.

Invariants: the device is petted only while every arm is LIVE and within its silence limit; once `doomed` is set it
stays set; an identity is armed by at most one live connection.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import Any

CLIENT_ID = re.compile(r"[A-Za-z0-9_.@:-]{1,64}")
MAX_CLIENTS = 32
MAX_TIMEOUT_S = 3600.0


class ArmState(enum.Enum):
    LIVE = "live"
    ORPHANED = "orphaned"  # the connection ended without a disarm: waiting for the same identity to re-arm
    EXPIRED = "expired"  # silent beyond its limit: the reset is certain


@dataclass
class Arm:
    client: str
    timeout_s: float
    conn: int | None  # None once ORPHANED
    state: ArmState
    armed_at: float
    last_pet_at: float
    orphaned_at: float | None = None
    note: dict[str, Any] | None = None


@dataclass(frozen=True)
class ArmResult:
    ok: bool
    error: str = ""
    takeover: bool = False
    note: dict[str, Any] | None = None  # the previous holder's last note, on a takeover


@dataclass(frozen=True)
class Verdict:
    pet: bool
    reason: str
    open_device: bool = False  # the first arm: start the device
    close_device: bool = False  # nothing armed any more: magic close


class Mux:
    def __init__(self, device_timeout_s: float, pet_interval_s: float, max_clients: int = MAX_CLIENTS) -> None:
        if not 0 < pet_interval_s * 2 <= device_timeout_s:
            raise ValueError(f"pet interval {pet_interval_s} s must be at most half the device timeout "
                             f"{device_timeout_s} s")
        self.device_timeout_s = device_timeout_s
        self.pet_interval_s = pet_interval_s
        self.max_clients = max_clients
        self.arms: dict[str, Arm] = {}
        self.device_open = False
        self.last_device_pet_at: float | None = None
        self.doomed: str | None = None  # why the host will be reset; latched

    # -- client events ----------------------------------------------------------------------------------------
    def min_timeout_s(self) -> float:
        """A client's timeout must leave it at least two of its pets' worth of silence before the daemon stops."""
        return self.device_timeout_s + 2 * self.pet_interval_s

    def arm(self, conn: int, client: str, timeout_s: float, now: float) -> ArmResult:
        if self.doomed is not None:
            return ArmResult(False, f"the host is being reset ({self.doomed})")
        if not CLIENT_ID.fullmatch(client):
            return ArmResult(False, "client must be 1-64 characters of letters, digits and _.@:-")
        if not math.isfinite(timeout_s) or not self.min_timeout_s() <= timeout_s <= MAX_TIMEOUT_S:
            return ArmResult(False, f"timeout_s must be between {self.min_timeout_s():g} (device timeout "
                                    f"{self.device_timeout_s:g} s + 2 pet intervals) and {MAX_TIMEOUT_S:g}")
        if self.arm_of(conn) is not None:
            return ArmResult(False, "this connection has armed already")
        old = self.arms.get(client)
        if old is not None and old.state is ArmState.LIVE:
            return ArmResult(False, f"client {client!r} is armed by another live connection")
        if old is None and len(self.arms) >= self.max_clients:
            return ArmResult(False, f"too many clients ({self.max_clients})")
        if old is None:
            self.arms[client] = Arm(client, timeout_s, conn, ArmState.LIVE, now, now)
            return ArmResult(True)
        # ORPHANED (EXPIRED would mean doomed): the same identity takes the arm over before the device fires. The
        # last pet stays the old client's: arming proves the new process runs, not that it keeps the promise.
        if now - old.last_pet_at > timeout_s - self.device_timeout_s:
            return ArmResult(False, f"too late to take {client!r} over: silent for {now - old.last_pet_at:.1f} s")
        self.arms[client] = Arm(client, timeout_s, conn, ArmState.LIVE, now, old.last_pet_at, note=old.note)
        return ArmResult(True, takeover=True, note=old.note)

    def pet(self, conn: int, note: dict[str, Any] | None, now: float) -> bool:
        """A sign of life from `conn`; False (ignored) when it holds no live arm."""
        arm = self.arm_of(conn)
        if arm is None or arm.state is not ArmState.LIVE:
            return False
        arm.last_pet_at = now
        if note is not None:
            arm.note = note
        return True

    def disarm(self, conn: int) -> bool:
        arm = self.arm_of(conn)
        if arm is None:
            return False
        del self.arms[arm.client]  # an EXPIRED arm leaves `doomed` set: a late disarm does not undo a reset
        return True

    def disconnect(self, conn: int, now: float) -> None:
        """The connection ended; without a disarm before, its arm is orphaned."""
        arm = self.arm_of(conn)
        if arm is not None and arm.state is ArmState.LIVE:
            arm.state, arm.conn, arm.orphaned_at = ArmState.ORPHANED, None, now
        elif arm is not None:
            arm.conn = None

    # -- device bookkeeping (the daemon reports what it did) ------------------------------------------------
    def device_opened(self, now: float) -> None:
        self.device_open, self.last_device_pet_at = True, now

    def device_petted(self, now: float) -> None:
        self.last_device_pet_at = now

    def device_closed(self) -> None:
        self.device_open, self.last_device_pet_at = False, None

    # -- the decision -----------------------------------------------------------------------------------------
    def verdict(self, now: float) -> Verdict:
        self._expire(now)
        if self.doomed is not None:
            return Verdict(False, self.doomed)
        if not self.arms:
            return Verdict(False, "nothing armed", close_device=self.device_open)
        orphans = sorted(a.client for a in self.arms.values() if a.state is ArmState.ORPHANED)
        if orphans:
            return Verdict(False, f"waiting for {', '.join(orphans)} to re-arm", open_device=not self.device_open)
        return Verdict(True, "every client alive", open_device=not self.device_open)

    def _expire(self, now: float) -> None:
        for arm in self.arms.values():
            if arm.state is ArmState.LIVE:
                silent_s = now - arm.last_pet_at
                limit_s = arm.timeout_s - self.device_timeout_s
                if silent_s > limit_s:
                    arm.state = ArmState.EXPIRED
                    self.doomed = self.doomed or (f"client {arm.client} silent for {silent_s:.1f} s "
                                                  f"(limit {limit_s:g} s)")
            elif arm.state is ArmState.ORPHANED and self.device_open and self.last_device_pet_at is not None \
                    and now - self.last_device_pet_at >= self.device_timeout_s:
                # The device must have fired by now; resuming the pets of a device past its timeout would be
                # resuming a host that should have been reset.
                self.doomed = self.doomed or (f"client {arm.client} ended without disarming and did not re-arm "
                                              f"within the device timeout ({self.device_timeout_s:g} s)")

    # -- views ------------------------------------------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        verdict = self.verdict(now)
        return {
            "device_open": self.device_open,
            "device_timeout_s": self.device_timeout_s,
            "petting": verdict.pet,
            "reason": verdict.reason,
            "doomed": self.doomed,
            "clients": [
                {"client": a.client, "state": a.state.value, "timeout_s": a.timeout_s,
                 "silent_s": round(now - a.last_pet_at, 3), "connected": a.conn is not None}
                for a in sorted(self.arms.values(), key=lambda a: a.client)
            ],
        }

    def arm_of(self, conn: int) -> Arm | None:
        for arm in self.arms.values():
            if arm.conn == conn:
                return arm
        return None
