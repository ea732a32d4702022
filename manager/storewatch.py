"""Whether the store commits: the driver's view of its database, fed by its own writes and by a probe.

Invariants:
- **Said once.** The store going down is reported once (journal `store_unavailable`), its return once
  (`store_available` with the outage's length); the failed retries in between are counted, not announced.
- **A write that hangs is a write that fails.** A probe that has not answered within `probe_timeout_s` marks the
  store down as surely as an error does: a stalled database cannot record a decision either.
- **Back means committed.** Only a transaction that committed (a probe or one of the driver's writes) ends an
  outage; the driver then tells the core (`StoreRecovered`), which gives every host a fresh silence window.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from kvmha.manager.env import Clock, Journal


class StoreWatch:
    def __init__(self, clock: Clock, journal: Journal, on_recovered: Callable[[float], None]) -> None:
        self._clock, self._journal, self._on_recovered = clock, journal, on_recovered
        self.down_since: float | None = None
        self._up = asyncio.Event()
        self._up.set()

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, error: str, since: float | None = None) -> None:
        """A transaction failed (or, begun at `since`, did not answer in time)."""
        if self.down_since is None:
            self.down_since = self._clock.monotonic() if since is None else since
            self._up.clear()
            self._journal.store_unavailable(error)

    def committed(self) -> None:
        if self.down_since is not None:
            down_s = self._clock.monotonic() - self.down_since
            self.down_since = None
            self._up.set()
            self._journal.store_available(down_s)
            self._on_recovered(down_s)

    def down_for_s(self) -> float:
        return 0.0 if self.down_since is None else self._clock.monotonic() - self.down_since

    async def wait_up(self, timeout_s: float | None = None) -> None:
        """Until the store is back (or `timeout_s` passed)."""
        if self._up.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._up.wait(), timeout_s)
