"""The hearing's transit lag (kvmha.manager.hearing): how late the manager reads the pings its agents send, from
their own build times. Per stream the smallest (arrival - sent) is the baseline; the lag is the lower median of
the streams' latest excess over theirs, each capped; an ended stream is forgotten."""

from __future__ import annotations

from kvmha.manager.hearing import TRANSIT_CAP_S, Hearing


class StillClock:
    def monotonic(self) -> float:
        return 0.0

    def time(self) -> float:
        return 0.0


def _hearing() -> Hearing:
    return Hearing(StillClock(), period_s=0.0)  # type: ignore[arg-type]


def test_a_stream_read_as_fast_as_ever_adds_no_lag_whatever_its_clock() -> None:
    hearing = _hearing()
    for n in range(5):  # agent clocks far from ours, and different from each other
        hearing.ping_read(1, 5000.0 + n, 10.0 + n)
        hearing.ping_read(2, 3.0 + n, 10.2 + n)
    hearing.update_transit()
    assert hearing.transit_lag_s == 0.0 and hearing.lag_s(0.0) == 0.0


def test_reading_every_stream_late_is_the_lag() -> None:
    hearing = _hearing()
    for stream in (1, 2, 3):
        hearing.ping_read(stream, 100.0, 100.1)  # quickest path seen: 0.1 s
        hearing.ping_read(stream, 102.0, 104.6)  # read 2.5 s later than that
    hearing.update_transit()
    assert abs(hearing.transit_lag_s - 2.5) < 1e-9
    assert abs(hearing.lag_s(0.0) - 2.5) < 1e-9
    for stream in (1, 2, 3):  # caught up: the next pings come as fast as the first
        hearing.ping_read(stream, 104.0, 104.1)
    hearing.update_transit()
    assert hearing.transit_lag_s == 0.0


def test_a_minority_of_slow_or_lying_streams_does_not_move_the_lag() -> None:
    hearing = _hearing()
    for stream in range(5):
        hearing.ping_read(stream, 0.0, 1.0)
        hearing.ping_read(stream, 2.0, 3.0)
    hearing.ping_read(3, 4.0, 40.0)  # one stream 35 s late
    hearing.ping_read(4, -1e6, 10.0)  # one agent lying about its clock: capped
    hearing.update_transit()
    assert hearing.transit_lag_s == 0.0
    hearing.ping_read(2, 4.0, 9.0)  # a third of five: now the lower median is 4 s
    hearing.update_transit()
    assert hearing.transit_lag_s == 4.0
    hearing.forget(3)
    hearing.forget(4)
    hearing.update_transit()  # streams 0, 1, 2 left: 0, 0, 4 -> 0
    assert hearing.transit_lag_s == 0.0


def test_one_excess_counts_at_most_the_cap_and_no_stream_means_no_lag() -> None:
    hearing = _hearing()
    hearing.ping_read(7, 0.0, 0.0)
    hearing.ping_read(7, 1.0, 1e6)
    hearing.update_transit()
    assert hearing.transit_lag_s == TRANSIT_CAP_S
    hearing.forget(7)
    hearing.update_transit()
    assert hearing.transit_lag_s == 0.0
