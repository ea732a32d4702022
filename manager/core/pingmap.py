"""The ping map (CloudStack's `_pingMap`): host → time of its last ping, and the monitor's question "who is behind?".

Pings arrive in time order, so re-inserting a host on every ping keeps the dict ordered by last ping: the oldest
host is always first. Finding the hosts that are behind, and the time the next one will be, costs O(1) per host
found; the driver sleeps until `next_behind_at()` instead of scanning every ping interval. The timeout is passed in
by the caller at every question: it belongs to the configuration, which has one owner (the core's `Ctx.config`).
"""

from __future__ import annotations

from kvmha.manager.core.model import HostId


class PingMap:
    def __init__(self) -> None:
        self._last: dict[HostId, float] = {}

    def ping(self, host_id: HostId, at: float) -> None:
        """Insert or refresh a host (agent connected, or pinged). Arrival stamps come in order (the driver's inbox
        keeps it); should one ever be older than the newest entry, it is counted as that newest time: a host is
        then judged later, never earlier, and the map stays ordered."""
        self._last.pop(host_id, None)
        if self._last:
            at = max(at, next(reversed(self._last.values())))
        self._last[host_id] = at

    def refresh_all(self, at: float) -> None:
        """Every host's silence counts from `at` at the earliest (a fresh window for everyone, order kept)."""
        fresh = {host_id: at for host_id, last in self._last.items() if last < at}
        fresh.update((host_id, last) for host_id, last in self._last.items() if last >= at)
        self._last = fresh

    def remove(self, host_id: HostId) -> None:
        self._last.pop(host_id, None)

    def last_ping_at(self, host_id: HostId) -> float | None:
        return self._last.get(host_id)

    def __contains__(self, host_id: object) -> bool:
        return host_id in self._last

    def __len__(self) -> int:
        return len(self._last)

    def next_behind_at(self, timeout_s: float) -> float | None:
        """When the least recently pinged host will be behind, or None for an empty map."""
        for last in self._last.values():
            return last + timeout_s
        return None

    def take_behind(self, now: float, timeout_s: float) -> list[tuple[HostId, float]]:
        """Remove and return the hosts behind at `now` (last ping < now - timeout) with their silence in seconds."""
        behind: list[tuple[HostId, float]] = []
        while self._last:
            host_id, last = next(iter(self._last.items()))
            if last + timeout_s > now:  # the very expression next_behind_at() returns: no float mismatch
                break
            del self._last[host_id]
            behind.append((host_id, now - last))
        return behind
