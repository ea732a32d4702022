"""The agent's side of kvmha-watchdog: arm at start, pet from the asyncio loop, disarm on a clean stop.

Why the pets come from the asyncio loop: that loop sends the pings and runs the isolation clock, so its liveness is
what the manager relies on. Everything that may block (libvirt, storage) already runs in threads; a loop that stops
turning (a bug that blocks it, SIGSTOP, a crash) stops the pets and the host resets. libvirt hanging does *not*
stop them: a hung libvirtd on a connected host is reported (hypervisor_connected=false, VMs PowerUnknown).

The pets are also withheld on purpose while the isolation response is due and not yet complete (`gate`): the
daemon then stops petting once the agent has been silent for `timeout_s - device timeout`, so the response must
complete within that time or the host resets. A destroy that fails or hangs on libvirtd thus ends in a reset.

Takeover: an agent restarted after a crash arms the same identity ("kvmha-agent") before the device fires and gets
the old agent's last `note`: when it last had contact (manager or storage) and the isolation delay then in force.
The new agent starts its isolation clock from there, so a restart never buys an isolated host extra time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmha.agent import watchdog_protocol as wire

log = logging.getLogger("kvmha.agent.watchdog")

CLIENT_ID = "kvmha-agent"


class WatchdogError(RuntimeError):
    pass


@dataclass(frozen=True)
class WatchdogState:
    """What the agent reports in Hello and every Ping."""

    armed: bool
    timeout_s: float = 0.0
    device_timeout_s: float = 0.0
    device: str = ""
    detail: str = ""


@dataclass(frozen=True)
class ContactNote:
    """Left with the daemon at every pet; handed to a restarted agent that takes the arm over (CLOCK_MONOTONIC is
    the same clock in every process of a host, so the times stay meaningful across the restart)."""

    contact_at: float  # monotonic: the later of the last manager contact and the last storage heartbeat write
    isolation_after_s: float  # the delay in force (the manager's value after a Welcome)

    def isolation_due(self, now: float) -> bool:
        """The predecessor's isolation response is due by now (if nothing has been heard since its contact)."""
        return now - self.contact_at > self.isolation_after_s

    def to_json(self) -> dict[str, Any]:
        return {"contact_at": round(self.contact_at, 3), "isolation_after_s": self.isolation_after_s}

    @staticmethod
    def from_json(raw: object) -> ContactNote | None:
        if not isinstance(raw, dict):
            return None
        contact_at, after_s = raw.get("contact_at"), raw.get("isolation_after_s")
        if not isinstance(contact_at, int | float) or not isinstance(after_s, int | float):
            return None
        if not (math.isfinite(contact_at) and math.isfinite(after_s) and after_s > 0):
            return None
        return ContactNote(float(contact_at), float(after_s))


class WatchdogClient:
    """One connection to kvmha-watchdog. `arm` blocks briefly (a local socket); `pet` never blocks."""

    def __init__(self, socket_path: str, timeout_s: float, client_id: str = CLIENT_ID,
                 connect_timeout_s: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.client_id = client_id
        self._connect_timeout_s = connect_timeout_s
        self._sock: socket.socket | None = None
        self._state = WatchdogState(False, detail="not armed yet")

    @property
    def state(self) -> WatchdogState:
        return self._state

    def arm(self) -> ContactNote | None:
        """Connect and arm; returns the previous agent's note on a takeover. Raises WatchdogError."""
        self._drop("re-arming")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._connect_timeout_s)
        try:
            sock.connect(self.socket_path)
            sock.sendall(wire.encode({"op": "arm", "client": self.client_id, "timeout_s": self.timeout_s}))
            answer = _read_answer(sock)
        except (OSError, ValueError) as exc:
            sock.close()
            self._state = WatchdogState(False, detail=f"kvmha-watchdog at {self.socket_path}: {exc}")
            raise WatchdogError(self._state.detail) from exc
        if not answer.get("ok"):
            sock.close()
            self._state = WatchdogState(False, detail=f"kvmha-watchdog refused: {answer.get('error')}")
            raise WatchdogError(self._state.detail)
        sock.setblocking(False)
        self._sock = sock
        self._state = WatchdogState(True, float(answer.get("timeout_s", self.timeout_s)),
                                    float(answer.get("device_timeout_s", 0.0)), str(answer.get("device", "")))
        return ContactNote.from_json(answer.get("note")) if answer.get("takeover") else None

    def pet(self, note: ContactNote | None) -> bool:
        """Send a sign of life (never blocks); False when the link to the daemon is gone (then not armed)."""
        sock = self._sock
        if sock is None:
            return False
        try:
            # Anything from the daemon here means trouble (it only answers requests): EOF is its death.
            with contextlib.suppress(BlockingIOError):
                if sock.recv(4096) == b"":
                    self._drop("kvmha-watchdog closed the connection (did it die?)")
                    return False
            message: dict[str, Any] = {"op": "pet"}
            if note is not None:
                message["note"] = note.to_json()
            sock.send(wire.encode(message))
        except OSError as exc:
            self._drop(f"kvmha-watchdog link lost: {exc}")
            return False
        return True

    def disarm(self) -> bool:
        """The clean disarm (a planned stop): True when the daemon confirmed it."""
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.settimeout(2.0)
            sock.sendall(wire.encode({"op": "disarm"}))
            confirmed = bool(_read_answer(sock).get("ok"))
        except (OSError, ValueError):
            confirmed = False
        self._drop("disarmed (clean stop)" if confirmed else "disarm not confirmed")
        return confirmed

    def _drop(self, why: str) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
            self._state = WatchdogState(False, detail=why)


def _read_answer(sock: socket.socket) -> dict[str, Any]:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ValueError("connection closed before an answer")
        data += chunk
        if len(data) > wire.MAX_LINE_BYTES:
            raise ValueError("answer too long")
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise ValueError("answer is not a JSON object")
    return answer


def log_armed(client: WatchdogClient, takeover: bool) -> None:
    state = client.state
    log.info("event=watchdog_armed socket=%s timeout_s=%g device=%s device_timeout_s=%g takeover=%s",
             client.socket_path, state.timeout_s, state.device, state.device_timeout_s, takeover)


def arm_at_start(socket_path: str, timeout_s: float, responds_to_isolation: bool) -> tuple[
        WatchdogClient, ContactNote | None]:
    """The agent's first arm, before anything else (the keeper retries if this fails); a takeover's note.

    A takeover keeps the predecessor's last pet (arming is not a pet), so the new agent pets at once, before its
    slow start, unless the predecessor's isolation response is due: then it must first be done (the keeper's gate)."""
    client = WatchdogClient(socket_path, timeout_s)
    try:
        note = client.arm()
    except WatchdogError as exc:
        log.error("event=watchdog_not_armed error=%r retry=in_the_background", str(exc))
        return client, None
    log_armed(client, note is not None)
    if note is not None and not (responds_to_isolation and note.isolation_due(time.monotonic())):
        client.pet(note)
    return client, note


class WatchdogKeeper:
    """Pets from the asyncio loop while `gate()` allows it; re-arms when the link is lost.

    The interval: at most 1 s, and at least five pets per silence limit (`timeout_s - device timeout`, known once
    armed), so that one late pet is never what stops the device."""

    def __init__(self, client: WatchdogClient, gate: Callable[[float], str | None],
                 note: Callable[[], ContactNote], on_takeover: Callable[[ContactNote], None],
                 interval_s: float | None = None, rearm_interval_s: float = 2.0) -> None:
        self.client = client
        self._interval_s = interval_s
        self._gate = gate
        self._note = note
        self._on_takeover = on_takeover
        self._rearm_interval_s = rearm_interval_s
        self._withheld: str | None = None
        self.pets = 0

    def arm_now(self) -> bool:
        """Arm synchronously (at start, before anything else runs); applies a takeover note. False on failure."""
        try:
            note = self.client.arm()
        except WatchdogError as exc:
            log.error("event=watchdog_not_armed error=%r", str(exc))
            return False
        self._armed(note)
        return True

    def _armed(self, note: ContactNote | None) -> None:
        log_armed(self.client, note is not None)
        if note is not None:
            self._on_takeover(note)

    async def run(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        next_arm_at = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if not self.client.state.armed and now >= next_arm_at:
                next_arm_at = now + self._rearm_interval_s
                try:
                    note = await loop.run_in_executor(None, self.client.arm)
                except WatchdogError as exc:
                    log.warning("event=watchdog_arm_failed error=%r retry_in_s=%g", str(exc), self._rearm_interval_s)
                else:
                    self._armed(note)
            if self.client.state.armed:
                self._pet(time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    @property
    def interval_s(self) -> float:
        if self._interval_s is not None:
            return self._interval_s
        state = self.client.state
        limit_s = state.timeout_s - state.device_timeout_s if state.armed else 5.0
        return max(0.05, min(1.0, limit_s / 5))

    def _pet(self, now: float) -> None:
        withheld = self._gate(now)
        if withheld != self._withheld:
            if withheld:
                log.error("event=watchdog_pets_withheld why=%r reset_unless_done_in_s=%g", withheld,
                          self.client.state.timeout_s - self.client.state.device_timeout_s)
            else:
                log.warning("event=watchdog_pets_resumed")
            self._withheld = withheld
        if withheld:
            return
        if self.client.pet(self._note()):
            self.pets += 1
        else:
            log.error("event=watchdog_link_lost detail=%r", self.client.state.detail)

    def disarm(self) -> None:
        if self.client.state.armed:
            confirmed = self.client.disarm()
            log.info("event=watchdog_disarmed confirmed=%s", confirmed)
