"""How long the manager's event loop may leave a message unread: the slack its silence judgements need.

Pings are stamped when the gRPC adapter reads them, and the adapter reads on the event loop. A loop that is
saturated (thousands of streams on a starved CPU) or blocked leaves messages waiting inside gRPC, unstamped: a host
whose ping waits there looks silent for as long as it waits. `Hearing` measures that wait the way any message would
feel it: a callback scheduled every `period_s` and how late it runs. `lag_s(now)` is the largest lateness of the
last `window` runs, or the current one's if it is overdue by more. The driver judges silence at `now - lag_s(now)`
(kvmha.manager.driver): a ping that may still sit unread is given the time to be read, and a backlog never reads as
silence. On the simulator's virtual loop callbacks run on time and the lag is 0: the simulator turns it off
(`hearing_period_s = 0`) rather than add a timer that changes nothing.

The loop's lag does not see a message that waits before the loop: in the kernel's socket buffers, or in gRPC's
C core and its poller thread, which need the GIL to hand a completion to the loop (at thousands of streams the
event loop holds it most of the time: bench/manager_load.py). The agents say when they built each ping on their
own monotonic clock (`Ping.sent_mono_s`); per stream, `ping_read` keeps the smallest (arrival - sent) seen, which
is that stream's clock offset plus its quickest path, and the excess of each ping over it is how late the manager
read that one. The transit lag is the lower median of the streams' latest excess, recomputed every period: when the
manager reads late it reads every stream late, so the median follows it within a ping interval; one stream whose
pings are slow for its own reasons (or an agent that lies about its clock) cannot move it while most streams are
read on time. Each excess counts at most TRANSIT_CAP_S. `lag_s` is the larger of the two lags.

Invariant: the slack only ever delays a verdict (by the manager's own measured deafness), never hastens one.
"""

from __future__ import annotations

import asyncio
from collections import deque

from kvmha.manager.env import Clock

PERIOD_S = 0.2
WINDOW = 10  # runs remembered: the lag of the last ~2 s
TRANSIT_CAP_S = 60.0  # the most one ping's excess counts for


class Hearing:
    def __init__(self, clock: Clock, period_s: float = PERIOD_S) -> None:
        self._clock, self._period_s = clock, period_s
        self._due: float | None = None
        self._late: deque[float] = deque(maxlen=WINDOW)
        self._handle: asyncio.TimerHandle | None = None
        self._floor_s: dict[int, float] = {}  # stream -> smallest (arrival - sent) seen on it
        self._excess_s: dict[int, float] = {}  # stream -> its latest ping's excess over that
        self.transit_lag_s = 0.0

    def start(self) -> None:
        if self._period_s > 0:
            self._arm(self._clock.monotonic())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle, self._due = None, None

    def lag_s(self, now: float) -> float:
        return max(self.loop_lag_s(now), self.transit_lag_s)

    def loop_lag_s(self, now: float) -> float:
        overdue = now - self._due if self._due is not None else 0.0
        return max(0.0, overdue, max(self._late, default=0.0))

    def ping_read(self, stream: int, sent_mono_s: float, arrival_s: float) -> None:
        """A ping of `stream` built at `sent_mono_s` on its agent's clock was read at `arrival_s` on ours."""
        offset_s = arrival_s - sent_mono_s
        floor_s = self._floor_s.get(stream)
        if floor_s is None or offset_s < floor_s:
            self._floor_s[stream] = floor_s = offset_s
        self._excess_s[stream] = min(offset_s - floor_s, TRANSIT_CAP_S)

    def forget(self, stream: int) -> None:
        """The stream ended."""
        self._floor_s.pop(stream, None)
        self._excess_s.pop(stream, None)

    def update_transit(self) -> None:
        """Recompute the transit lag: the lower median of the streams' latest excess (0 with no stream)."""
        excess = sorted(self._excess_s.values())
        self.transit_lag_s = excess[(len(excess) - 1) // 2] if excess else 0.0

    def _arm(self, now: float) -> None:
        self._due = now + self._period_s
        self._handle = asyncio.get_running_loop().call_at(self._due, self._ran)

    def _ran(self) -> None:
        now = self._clock.monotonic()
        if self._due is not None:
            self._late.append(max(0.0, now - self._due))
        self.update_transit()
        self._arm(now)
