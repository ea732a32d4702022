"""The fencing port: power a host off and *confirm* it is off, through an ordered chain of fencers.

Why this is shaped the way it is (fencing safety above all):

* A fence succeeds only when the power is confirmed off — by a fencer that saw the power-off through, or found
  the power already off (:attr:`FenceOutcome.ALREADY_OFF`). A fencer that cannot reach its device returns
  :attr:`FenceOutcome.FAILED`, never a success, and its power status is :attr:`PowerStatus.UNKNOWN`: silence
  from a BMC proves nothing about the host.
* A host has an ordered list of fencers (say its BMC, then a switched PDU). :class:`FencerChain` tries them in
  order; the first success wins; when all fail the result is FAILED and carries every fencer's detail.
* Two managers, or two decisions of one manager, must not fire at the same moment: the chain waits a *race delay*
  before its first fencer (fixed per host — see :func:`race_delay_s` — plus optional random jitter), and in one
  process a second fence call for the same host joins the one in flight and gets its result instead of sending a
  second power-off.
* The API is synchronous and every call is bounded by its ``timeout_s`` (the service runs it in a thread
  executor). ``detail`` strings are shown to operators and logged: they never contain a secret.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

log = logging.getLogger(__name__)


class FenceOutcome(StrEnum):
    FENCED = "fenced"  # power-off sent and the power confirmed off within the deadline
    ALREADY_OFF = "already_off"  # the device reported the power off; nothing was sent
    FAILED = "failed"  # not confirmed off: the host may still be running


@dataclass(frozen=True)
class FenceResult:
    outcome: FenceOutcome
    detail: str  # for operators and logs; never contains a secret
    elapsed_s: float

    @property
    def succeeded(self) -> bool:
        """True when the host is confirmed powered off."""
        return self.outcome is not FenceOutcome.FAILED


class PowerStatus(StrEnum):
    ON = "on"
    OFF = "off"
    UNKNOWN = "unknown"  # the device did not answer (or answered nonsense): nothing is known about the host


class Fencer(Protocol):
    """One way to cut a host's power. Implementations never raise for device errors: they return results."""

    name: str

    def power_status(self, timeout_s: float) -> PowerStatus:
        """The power state as the device reports it; UNKNOWN when it does not answer within ``timeout_s``."""
        ...

    def fence(self, timeout_s: float) -> FenceResult:
        """Power off, then confirm off by polling the device, all within ``timeout_s``."""
        ...


def race_delay_s(key: str, max_delay_s: float) -> float:
    """A delay in ``[0, max_delay_s)`` fixed by ``key`` (say ``f"{manager_id}/{host_id}"``).

    Deterministic so that two managers given different keys for the same host always fire at different moments,
    run after run, and a test or an operator can predict when a fence fires.
    """
    if max_delay_s <= 0:
        return 0.0
    fraction = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return max_delay_s * fraction


class _InFlight:
    """A fence being carried out for one host; late callers wait on it instead of firing again."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: FenceResult | None = None


_in_flight_lock = threading.Lock()
_in_flight: dict[str, _InFlight] = {}


class FencerChain:
    """The ordered fencers of one host, with the race delay and the in-process guard.

    ``guard_key`` names the host for the guard: chains built separately for the same host (one per decision, say)
    share it when given the same key; without one, only calls on this very chain object are guarded.
    """

    def __init__(
        self,
        fencers: Sequence[Fencer],
        race_delay_s: float = 0.0,
        *,
        race_jitter_s: float = 0.0,
        guard_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if race_delay_s < 0 or race_jitter_s < 0:
            raise ValueError("race_delay_s and race_jitter_s must not be negative")
        self.fencers = tuple(fencers)
        self.race_delay_s = race_delay_s
        self.race_jitter_s = race_jitter_s
        self.name = "chain(" + ", ".join(f.name for f in self.fencers) + ")"
        self._guard_key = guard_key if guard_key is not None else f"chain@{id(self)}"
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        return f"FencerChain({list(self.fencers)!r}, race_delay_s={self.race_delay_s})"

    def power_status(self, timeout_s: float) -> PowerStatus:
        """The first definite answer (ON or OFF) among the fencers, asked in order; UNKNOWN if none answers."""
        deadline = self._clock() + timeout_s
        for index, fencer in enumerate(self.fencers):
            share_s = self._share_s(deadline, len(self.fencers) - index)
            if share_s <= 0:
                break
            try:
                status = fencer.power_status(share_s)
            except Exception:
                log.exception("fencer %s raised on power_status", fencer.name)
                continue
            if status is not PowerStatus.UNKNOWN:
                return status
        return PowerStatus.UNKNOWN

    def fence(self, timeout_s: float) -> FenceResult:
        """Fence the host within ``timeout_s`` (race delay included); joins a fence already in flight."""
        started = self._clock()
        with _in_flight_lock:
            flight = _in_flight.get(self._guard_key)
            leading = flight is None
            if flight is None:
                flight = _in_flight[self._guard_key] = _InFlight()
        if not leading:
            return self._join(flight, started, timeout_s)
        result = FenceResult(FenceOutcome.FAILED, "fence aborted", 0.0)
        try:
            result = self._fence_now(started, timeout_s)
            return result
        finally:
            flight.result = result
            with _in_flight_lock:
                del _in_flight[self._guard_key]
            flight.done.set()

    def _join(self, flight: _InFlight, started: float, timeout_s: float) -> FenceResult:
        # The event is set by another thread: wait on it, bounded, with the real clock.
        if flight.done.wait(max(0.0, timeout_s)) and flight.result is not None:
            joined = flight.result
            return replace(
                joined,
                detail=f"joined the fence already in progress: {joined.detail}",
                elapsed_s=self._clock() - started,
            )
        return FenceResult(
            FenceOutcome.FAILED,
            f"a fence already in progress for this host did not finish within {timeout_s:.1f} s",
            self._clock() - started,
        )

    def _fence_now(self, started: float, timeout_s: float) -> FenceResult:
        deadline = started + timeout_s
        if not self.fencers:
            return FenceResult(FenceOutcome.FAILED, "no fencer configured for this host", 0.0)
        delay_s = self.race_delay_s + (self._rng.uniform(0, self.race_jitter_s) if self.race_jitter_s else 0.0)
        if delay_s > 0:
            if delay_s >= timeout_s:
                return FenceResult(
                    FenceOutcome.FAILED,
                    f"race delay {delay_s:.1f} s leaves no time within the {timeout_s:.1f} s timeout",
                    self._clock() - started,
                )
            log.info("%s: waiting the fence-race delay of %.2f s", self.name, delay_s)
            self._sleep(delay_s)
        failures: list[str] = []
        for index, fencer in enumerate(self.fencers):
            share_s = self._share_s(deadline, len(self.fencers) - index)
            if share_s <= 0:
                failures.append(f"{fencer.name}: not tried, no time left")
                continue
            result = self._try(fencer, share_s)
            if result.succeeded:
                detail = f"{fencer.name}: {result.detail}"
                if failures:
                    detail += " (after: " + "; ".join(failures) + ")"
                log.info("%s: %s", self.name, detail)
                return FenceResult(result.outcome, detail, self._clock() - started)
            failures.append(f"{fencer.name}: {result.detail}")
        detail = "all fencers failed: " + "; ".join(failures)
        log.warning("%s: %s", self.name, detail)
        return FenceResult(FenceOutcome.FAILED, detail, self._clock() - started)

    def _try(self, fencer: Fencer, timeout_s: float) -> FenceResult:
        try:
            return fencer.fence(timeout_s)
        except Exception as exc:  # a broken fencer must not take the chain down; it simply did not fence
            log.exception("fencer %s raised", fencer.name)
            return FenceResult(FenceOutcome.FAILED, f"raised {type(exc).__name__}", 0.0)

    def _share_s(self, deadline: float, fencers_left: int) -> float:
        """Each remaining fencer gets an equal share of the time left, so a dead first device cannot starve the
        ones behind it; time a fencer does not use passes on to the next."""
        return (deadline - self._clock()) / fencers_left
