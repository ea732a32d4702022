"""Where the dashboard's data comes from, without ever delaying the driver.

- Reads go through the store port in the dashboard's own threads (never the driver's loop or its worker threads),
  one transaction at a time (`_db_lock`): however many browsers are open, the dashboard holds at most one database
  connection, so the driver's writes never queue behind it for a connection. The overview is cached for
  `max_age_s`, so many viewers cost one read per period.
- What only the driver's memory knows (open agent links, last pings) is asked of the driver's loop with
  `call_soon_threadsafe`-style scheduling: a dict copy on the loop, bounded by a timeout; if the loop is busy the
  stored values are shown instead.
- New events: the driver's journal calls `wake()` (on its loop; it only sets a threading.Event) after each commit
  with events; one follower thread reads them and fans them out to every stream from a bounded buffer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import Any, TypeVar

from kvmha.manager.dashboard import timeline
from kvmha.manager.dashboard.view import Cluster, build_cluster
from kvmha.manager.operations import LiveHosts
from kvmha.manager.store import EventRow, Store, UnitOfWork

log = logging.getLogger("kvmha.manager.dashboard")
T = TypeVar("T")
NO_LIVE = LiveHosts(frozenset(), {})
LIVE_TIMEOUT_S = 0.5
FOLLOW_POLL_S = 2.0  # a missed wake-up (or another manager's events) is seen within this
BUFFER_EVENTS = 2000
TIMELINE_EVENTS = 20_000  # the failures page reads at most this many recent events


def live_from_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], LiveHosts]) -> Callable[[], LiveHosts]:
    """`read` runs on the driver's loop (it iterates the core's dicts, which only that loop changes)."""

    async def on_loop() -> LiveHosts:
        return read()

    def live() -> LiveHosts:
        coroutine: Coroutine[Any, Any, LiveHosts] = on_loop()
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=LIVE_TIMEOUT_S)
        except (FutureTimeout, RuntimeError):
            coroutine.close()
            return NO_LIVE

    return live


class Source:
    def __init__(self, store: Store, live: Callable[[], LiveHosts], ping_timeout_s: Callable[[], float],
                 clock: Callable[[], float] = time.time, max_age_s: float = 1.0) -> None:
        self._store, self._live, self._ping_timeout_s, self.clock = store, live, ping_timeout_s, clock
        self._max_age_s = max_age_s
        self._db_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cluster: Cluster | None = None
        self._failures: tuple[int, list[timeline.Failure]] | None = None

    def read(self, operation: Callable[[UnitOfWork], T]) -> T:
        with self._db_lock, self._store.unit_of_work() as uow:
            return operation(uow)

    def cluster(self) -> Cluster:
        with self._cache_lock:
            cached = self._cluster
            if cached is not None and self.clock() - cached.at < self._max_age_s:
                return cached
            live = self._live()
            now = self.clock()
            self._cluster = self.read(lambda uow: build_cluster(uow, live, now, self._ping_timeout_s()))
            return self._cluster

    def failures(self) -> list[timeline.Failure]:
        """Every host failure in the recent events; recomputed only when new events were recorded."""
        with self._cache_lock:
            def compute(uow: UnitOfWork) -> tuple[int, list[timeline.Failure]]:
                last_id = uow.events.last_id()
                if self._failures is not None and self._failures[0] == last_id:
                    return self._failures
                events = uow.events.all(max(0, last_id - TIMELINE_EVENTS), TIMELINE_EVENTS)
                hosts: dict[int, str] = {h.id: h.name for h in uow.hosts.all()}
                vms: dict[int, str] = {v.id: v.name for v in uow.vms.all()}
                return last_id, timeline.failures(events, uow.works.all(), hosts, vms)

            self._failures = self.read(compute)
            return self._failures[1]


def _events_after(after_id: int, uow: UnitOfWork) -> list[EventRow]:
    return uow.events.all(after_id, 500)


class EventFeed:
    """New events, read once and handed to every stream; `since()` blocks a stream's thread until there are some."""

    def __init__(self, source: Source, keep: int = BUFFER_EVENTS) -> None:
        self._source = source
        self._buffer: collections.deque[EventRow] = collections.deque(maxlen=keep)
        self._changed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_id = 0

    def wake(self) -> None:
        """Called by the driver's journal on its loop: must not block."""
        self._wake.set()

    def start(self) -> None:
        self.last_id = self._source.read(lambda uow: uow.events.last_id())
        self._thread = threading.Thread(target=self._follow, name="dashboard-events", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._changed:
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def _follow(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FOLLOW_POLL_S)
            self._wake.clear()
            try:
                self.poll()
            except Exception as error:  # the database may be down: the streams wait, the next poll retries
                log.warning("event=dashboard_events_unavailable error=%s", str(error).splitlines()[0][:200])

    def poll(self) -> int:
        """Read what is new into the buffer; returns how many events arrived."""
        total = 0
        while True:
            rows = self._source.read(partial(_events_after, self.last_id))
            if not rows:
                return total
            with self._changed:
                self._buffer.extend(rows)
                self.last_id = rows[-1].id
                self._changed.notify_all()
            total += len(rows)

    def since(self, after_id: int, timeout_s: float) -> list[EventRow]:
        """Events after `after_id`: at once if there are some, else when some arrive or after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._stop.is_set():
                oldest = self._buffer[0].id if self._buffer else self.last_id + 1
                if after_id < oldest - 1:
                    break  # older than the buffer: read from the store, below
                rows = [row for row in self._buffer if row.id > after_id]
                if rows:
                    return rows
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._changed.wait(left)
            else:
                return []
        return self._source.read(lambda uow: uow.events.all(after_id, 500))
