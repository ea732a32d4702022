from __future__ import annotations

from kvmha.manager.core.model import HostId
from kvmha.manager.core.pingmap import PingMap
from kvmha.manager.core.timers import Timers


def test_behind_after_timeout_oldest_first() -> None:
    pings = PingMap()
    pings.ping(HostId(1), 0.0)
    pings.ping(HostId(2), 1.0)
    pings.ping(HostId(1), 2.0)  # refreshed: now the newest
    assert pings.next_behind_at(7.0) == 8.0
    assert pings.take_behind(7.9, 7.0) == []
    assert pings.take_behind(9.5, 7.0) == [(HostId(2), 8.5), (HostId(1), 7.5)]
    assert len(pings) == 0 and pings.next_behind_at(7.0) is None


def test_removed_host_is_never_behind() -> None:
    pings = PingMap()
    pings.ping(HostId(1), 0.0)
    pings.remove(HostId(1))
    assert pings.take_behind(100.0, 7.0) == []


def test_timers_reschedule_and_cancel() -> None:
    timers: Timers[str] = Timers()
    timers.schedule("a", 5.0)
    timers.schedule("b", 3.0)
    timers.schedule("a", 1.0)  # moved earlier
    timers.schedule("c", 2.0)
    timers.cancel("c")
    assert timers.next_at() == 1.0
    assert timers.pop_due(3.0) == ["a", "b"]
    assert timers.next_at() is None and len(timers) == 0
