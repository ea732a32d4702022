"""Keyed deadlines: one pending deadline per key, the earliest found in O(log n), no scan over all keys.

Rescheduling or cancelling a key leaves its old heap entry behind; entries are checked against the live table
when they come up (lazy deletion), which keeps every operation logarithmic even with thousands of hosts.
Keys are any hashable values; the core uses the typed keys of `routing.TimerKey`.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Timers(Generic[K]):
    def __init__(self) -> None:
        # The sequence number breaks ties, so keys themselves are never compared (they need not be ordered).
        self._heap: list[tuple[float, int, K]] = []
        self._live: dict[K, tuple[float, int]] = {}
        self._seq = 0

    def schedule(self, key: K, at: float) -> None:
        """Set (or move) the deadline of `key`."""
        self._seq += 1
        self._live[key] = (at, self._seq)
        heapq.heappush(self._heap, (at, self._seq, key))

    def cancel(self, key: K) -> None:
        self._live.pop(key, None)

    def due_at(self, key: K) -> float | None:
        entry = self._live.get(key)
        return entry[0] if entry else None

    def next_at(self) -> float | None:
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[K]:
        """Keys whose deadline is at or before `now`, earliest first; they are removed."""
        due: list[K] = []
        while True:
            self._drop_stale()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, key = heapq.heappop(self._heap)
            del self._live[key]
            due.append(key)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            at, seq, key = heap[0]
            if self._live.get(key) == (at, seq):
                return
            heapq.heappop(heap)

    def __len__(self) -> int:
        return len(self._live)
