"""How long the manager's event loop may leave a message unread: the slack its silence judgements need.

Pings are stamped when the gRPC adapter reads them, and the adapter reads on the event loop. A loop that is
saturated (thousands of streams on a starved CPU) or blocked leaves messages waiting inside gRPC, unstamped: a host
whose ping waits there looks silent for as long as it waits. `Hearing` measures that wait the way any message would
feel it: a callback scheduled every `period_s` and how late it runs. `lag_s(now)` is the largest lateness of the
last `window` runs, or the current one's if it is overdue by more. The driver judges silence at `now - lag_s(now)`
(kvmha.manager.driver): a ping that may still sit unread is given the time to be read, and a backlog never reads as
silence. On the simulator's virtual loop callbacks run on time and the lag is 0: the simulator turns it off
(`hearing_period_s = 0`) rather than add a timer that changes nothing.

Invariant: the slack only ever delays a verdict (by the manager's own measured deafness), never hastens one.
"""

from __future__ import annotations

import asyncio
from collections import deque

from kvmha.manager.env import Clock

PERIOD_S = 0.2
WINDOW = 10  # runs remembered: the lag of the last ~2 s


class Hearing:
    def __init__(self, clock: Clock, period_s: float = PERIOD_S) -> None:
        self._clock, self._period_s = clock, period_s
        self._due: float | None = None
        self._late: deque[float] = deque(maxlen=WINDOW)
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        if self._period_s > 0:
            self._arm(self._clock.monotonic())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle, self._due = None, None

    def lag_s(self, now: float) -> float:
        overdue = now - self._due if self._due is not None else 0.0
        return max(0.0, overdue, max(self._late, default=0.0))

    def _arm(self, now: float) -> None:
        self._due = now + self._period_s
        self._handle = asyncio.get_running_loop().call_at(self._due, self._ran)

    def _ran(self) -> None:
        now = self._clock.monotonic()
        if self._due is not None:
            self._late.append(max(0.0, now - self._due))
        self._arm(now)
