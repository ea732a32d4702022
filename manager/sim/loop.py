"""An asyncio event loop on virtual time: the production driver runs on it unchanged, and a simulated hour takes
as long as its events take to compute.

`loop.time()` is the simulated clock. Where a real loop would block in `select(timeout)`, this one jumps: it runs
the simulated world's events that are due first (its agenda), or else moves the clock to the next asyncio timer.
There is no I/O and no thread, so a run is a pure function of its inputs (the seed): the same scenario gives the
same log on every machine.

Two kinds of scheduled work, on one clock:
- asyncio's own timers and tasks (`call_later`, `asyncio.sleep`, futures): the driver's deadline wake-ups, the
  store's simulated stalls, the driver's retry back-off — code that also runs in production;
- the world's agenda (`at(when, callback, *args)`): simulated hosts, agents, BMCs and network deliveries. It is a
  heap of plain tuples ordered by (time, sequence), so events at the same instant run in the order they were
  scheduled (asyncio's timer heap does not keep that order) and cost a third of an asyncio TimerHandle — the
  simulator's millions of pings go through here. All agenda events due at an instant run before the callbacks
  they wake (a driver handles every fact that arrived at that instant in one batch, as it would under load).

Several drivers (several managers on one store) can share one loop: they are just tasks.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import selectors
from collections.abc import Callable
from typing import Any


class SimulationStalled(RuntimeError):
    """Nothing is scheduled anywhere: a real loop would wait forever."""


class _VirtualSelector(selectors.SelectSelector):
    """Registrations are kept (asyncio's bookkeeping wants them); select never waits: it advances virtual time."""

    def __init__(self, loop: VirtualLoop) -> None:
        super().__init__()
        self._sim_loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self._sim_loop._advance(timeout)
        return []


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._agenda: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._agenda_seq = 0
        self.agenda_events = 0  # world events run, for the benchmark
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self._now

    def at(self, when: float, callback: Callable[..., None], *args: Any) -> None:
        """Schedule a world event (FIFO among events at the same instant)."""
        self._agenda_seq += 1
        heapq.heappush(self._agenda, (when, self._agenda_seq, callback, args))

    def _advance(self, timeout: float | None) -> None:
        """Called where a real loop would block for `timeout` seconds (None: until something happens)."""
        agenda = self._agenda
        limit = math.inf if timeout is None else self._now + timeout
        if agenda and agenda[0][0] <= limit:
            self._now = max(self._now, agenda[0][0])
            while agenda and agenda[0][0] <= self._now:
                _, _, callback, args = heapq.heappop(agenda)
                self.agenda_events += 1
                callback(*args)
            return
        if timeout is None:
            raise SimulationStalled("nothing is scheduled: the simulation would wait forever")
        self._now = limit

    # No thread ever wakes this loop, so it needs no self-pipe (and holds no file descriptors).
    def _make_self_pipe(self) -> None:
        pass

    def _close_self_pipe(self) -> None:
        pass

    def _write_to_self(self) -> None:
        raise RuntimeError("the simulation's loop is single-threaded: call_soon_threadsafe has no place in it")
