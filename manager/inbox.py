"""The driver's inbox: facts and operator jobs in arrival order, each stamped with its arrival time, and the
driver's wake-up.

Invariants:
- **Stamped on arrival.** Every item carries the monotonic time it was put here (or the time its adapter read it
  off the wire, which is the same instant: the gRPC stream reader submits without awaiting). The core measures a
  host's silence from the arrival of its last ping, however late the driver gets to it, so a backlog in front of
  a slow or stalled driver never reads as silence.
- **Arrival order.** Items are taken in the order they arrived, so the stamps the core sees never run backwards
  (the ping map relies on it).
- **Bounded by hosts plus real events.** A ping carries nothing the core needs twice (its latest sequence and
  health flags supersede the earlier ones): a host's ping that arrives while an earlier one of the same host still
  waits here replaces it, moving to the end with its new stamp. However long the driver is held up, the waiting
  pings number at most one per host; `coalesced` counts the replaced ones. Everything else (power reports,
  command results, operator jobs) is a real event and is kept.

Cheaper than asyncio.Queue + wait_for: one future per sleep, and one loop timer that is moved only when the core's
next deadline moves (most facts do not move it) — it matters when the simulator pushes millions of pings through.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Generic, TypeVar

from kvmha.manager.core import facts

J = TypeVar("J")


class Inbox(Generic[J]):
    """`J` is the driver's job type (an operator operation with its future)."""

    def __init__(self) -> None:
        # Pings are keyed by their host id (ids are >= 0), everything else by a fresh negative number: one dict
        # keeps the arrival order and lets a host's waiting ping be replaced in O(1).
        self.items: dict[int, tuple[facts.Fact | J, float]] = {}
        self._keys = itertools.count(-1, -1)
        self.coalesced = 0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    def put(self, item: facts.Fact | J, received_at: float) -> None:
        if isinstance(item, facts.HeartbeatReceived):
            key = int(item.host_id)
            if self.items.pop(key, None) is not None:
                self.coalesced += 1
        else:
            key = next(self._keys)
        self.items[key] = (item, received_at)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> list[tuple[facts.Fact | J, float]]:
        """Everything received so far, oldest first; the inbox starts over empty."""
        taken, self.items = self.items, {}
        return list(taken.values())

    def __len__(self) -> int:
        return len(self.items)

    async def wait(self, deadline: float | None, now: float) -> None:
        """Return when an item is there or the loop's clock reaches `deadline` (None: no deadline)."""
        if self.items or (deadline is not None and deadline <= now):
            return
        loop = asyncio.get_running_loop()
        if deadline != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None if deadline is None else loop.call_at(deadline, self._ring)
            self._timer_at = deadline
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _ring(self) -> None:
        self._timer, self._timer_at = None, None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, None
