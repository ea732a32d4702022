"""FencerChain with fake fencers: order, failures, time shares, the race delay and the in-process guard."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import pytest

from kvmha.manager.adapters.fencer import FenceOutcome, FencerChain, FenceResult, PowerStatus, race_delay_s


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeFencer:
    """Answers with a fixed outcome after spending ``takes_s`` of fake time (never more than it was given)."""

    def __init__(
        self,
        name: str,
        outcome: FenceOutcome = FenceOutcome.FENCED,
        *,
        clock: FakeClock | None = None,
        takes_s: float = 0.0,
        status: PowerStatus = PowerStatus.ON,
        raises: bool = False,
        on_fence: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.outcome = outcome
        self.clock = clock
        self.takes_s = takes_s
        self.status = status
        self.raises = raises
        self.on_fence = on_fence
        self.fence_timeouts: list[float] = []
        self.status_calls = 0

    def power_status(self, timeout_s: float) -> PowerStatus:
        self.status_calls += 1
        return self.status

    def fence(self, timeout_s: float) -> FenceResult:
        self.fence_timeouts.append(timeout_s)
        if self.on_fence is not None:
            self.on_fence()
        if self.raises:
            raise RuntimeError("boom")
        spent = min(self.takes_s, timeout_s)
        if self.clock is not None:
            self.clock.now += spent
        return FenceResult(self.outcome, f"{self.outcome.value} by {self.name}", spent)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def chain_of(
    clock: FakeClock,
    *fencers: FakeFencer,
    race_delay_s: float = 0.0,
    race_jitter_s: float = 0.0,
    rng: random.Random | None = None,
) -> FencerChain:
    return FencerChain(
        list(fencers), race_delay_s, race_jitter_s=race_jitter_s, clock=clock, sleep=clock.sleep, rng=rng
    )


def test_the_first_success_wins_and_later_fencers_are_not_called(clock: FakeClock) -> None:
    first, second = FakeFencer("a", clock=clock, takes_s=1), FakeFencer("b", clock=clock)
    result = chain_of(clock, first, second).fence(30)
    assert result.outcome is FenceOutcome.FENCED
    assert result.detail == "a: fenced by a"
    assert result.elapsed_s == pytest.approx(1.0)
    assert second.fence_timeouts == []


def test_already_off_is_a_success(clock: FakeClock) -> None:
    result = chain_of(clock, FakeFencer("a", FenceOutcome.ALREADY_OFF)).fence(30)
    assert result.outcome is FenceOutcome.ALREADY_OFF and result.succeeded


def test_a_failed_fencer_falls_through_and_its_failure_is_kept(clock: FakeClock) -> None:
    result = chain_of(clock, FakeFencer("a", FenceOutcome.FAILED), FakeFencer("b")).fence(30)
    assert result.outcome is FenceOutcome.FENCED
    assert result.detail == "b: fenced by b (after: a: failed by a)"


def test_all_failing_is_a_failure_with_every_detail(clock: FakeClock) -> None:
    result = chain_of(clock, FakeFencer("a", FenceOutcome.FAILED), FakeFencer("b", FenceOutcome.FAILED)).fence(30)
    assert result.outcome is FenceOutcome.FAILED and not result.succeeded
    assert "a: failed by a" in result.detail and "b: failed by b" in result.detail


def test_a_fencer_that_raises_counts_as_failed_not_as_fenced(clock: FakeClock) -> None:
    result = chain_of(clock, FakeFencer("a", raises=True), FakeFencer("b", FenceOutcome.FAILED)).fence(30)
    assert result.outcome is FenceOutcome.FAILED
    assert "a: raised RuntimeError" in result.detail


def test_no_fencer_is_never_a_success(clock: FakeClock) -> None:
    assert chain_of(clock).fence(30).outcome is FenceOutcome.FAILED


def test_each_fencer_gets_a_fair_share_of_the_time_left(clock: FakeClock) -> None:
    # A dead first device uses up all it is given; the ones behind it still get their share.
    dead = FakeFencer("dead", FenceOutcome.FAILED, clock=clock, takes_s=1000)
    quick = FakeFencer("quick", FenceOutcome.FAILED, clock=clock, takes_s=1)
    last = FakeFencer("last", clock=clock)
    result = chain_of(clock, dead, quick, last).fence(30)
    assert result.outcome is FenceOutcome.FENCED
    assert dead.fence_timeouts == [pytest.approx(10)]
    assert quick.fence_timeouts == [pytest.approx(10)]
    assert last.fence_timeouts == [pytest.approx(19)]  # what quick did not use passes on


def test_the_race_delay_comes_before_the_first_fencer_and_counts_against_the_timeout(clock: FakeClock) -> None:
    fired_at: list[float] = []
    fencer = FakeFencer("a", on_fence=lambda: fired_at.append(clock.now))
    started = clock.now
    result = chain_of(clock, fencer, race_delay_s=3.0).fence(30)
    assert clock.sleeps == [3.0]
    assert fired_at == [started + 3.0]
    assert fencer.fence_timeouts == [pytest.approx(27)]
    assert result.elapsed_s == pytest.approx(3.0)


def test_a_race_delay_longer_than_the_timeout_fails_without_firing(clock: FakeClock) -> None:
    fencer = FakeFencer("a")
    result = chain_of(clock, fencer, race_delay_s=40.0).fence(30)
    assert result.outcome is FenceOutcome.FAILED and "race delay" in result.detail
    assert fencer.fence_timeouts == []


def test_jitter_adds_a_random_part_within_its_bound(clock: FakeClock) -> None:
    chain = chain_of(clock, FakeFencer("a"), race_delay_s=1.0, race_jitter_s=2.0, rng=random.Random(7))
    for _ in range(20):
        chain.fence(30)
    assert all(1.0 <= s < 3.0 for s in clock.sleeps)
    assert len(set(clock.sleeps)) > 1


def test_race_delay_is_fixed_per_key_and_spread_across_keys() -> None:
    assert race_delay_s("m1/h1", 5.0) == race_delay_s("m1/h1", 5.0)
    delays = {race_delay_s(f"m1/h{i}", 5.0) for i in range(50)}
    assert len(delays) == 50 and all(0 <= d < 5.0 for d in delays)
    assert race_delay_s("m1/h1", 0) == 0.0


def test_negative_delays_are_refused() -> None:
    with pytest.raises(ValueError):
        FencerChain([], race_delay_s=-1)


def test_power_status_is_the_first_definite_answer(clock: FakeClock) -> None:
    unknown = FakeFencer("a", status=PowerStatus.UNKNOWN)
    off = FakeFencer("b", status=PowerStatus.OFF)
    never = FakeFencer("c", status=PowerStatus.ON)
    assert chain_of(clock, unknown, off, never).power_status(10) is PowerStatus.OFF
    assert never.status_calls == 0
    assert chain_of(clock, unknown).power_status(10) is PowerStatus.UNKNOWN


class BlockingFencer:
    """A fencer that holds its fence until released, to overlap two calls for real (threads, real clock)."""

    def __init__(self, name: str = "slow") -> None:
        self.name = name
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fences = 0

    def power_status(self, timeout_s: float) -> PowerStatus:
        return PowerStatus.ON

    def fence(self, timeout_s: float) -> FenceResult:
        self.fences += 1
        self.entered.set()
        self.release.wait(5)
        return FenceResult(FenceOutcome.FENCED, "fenced by slow", 0.1)


def run_in_thread(target: Callable[[], FenceResult]) -> tuple[threading.Thread, list[FenceResult]]:
    out: list[FenceResult] = []
    thread = threading.Thread(target=lambda: out.append(target()))
    thread.start()
    return thread, out


@pytest.mark.parametrize("separate_chains", [False, True])
def test_a_second_fence_of_the_same_host_joins_the_first(separate_chains: bool) -> None:
    fencer = BlockingFencer()
    first_chain = FencerChain([fencer], guard_key="h1")
    second_chain = FencerChain([fencer], guard_key="h1") if separate_chains else first_chain
    first, first_out = run_in_thread(lambda: first_chain.fence(10))
    assert fencer.entered.wait(5)
    second, second_out = run_in_thread(lambda: second_chain.fence(10))
    fencer.release.set()
    first.join(5)
    second.join(5)
    assert fencer.fences == 1
    assert first_out[0].outcome is FenceOutcome.FENCED and second_out[0].outcome is FenceOutcome.FENCED
    assert second_out[0].detail.startswith("joined the fence already in progress")
    # Once finished, the next fence fires again (it is a guard, not a cache).
    first_chain.fence(10)
    assert fencer.fences == 2


def test_different_hosts_are_not_serialised() -> None:
    fencer = BlockingFencer()
    one, other = FencerChain([fencer], guard_key="h1"), FencerChain([fencer], guard_key="h2")
    first, _ = run_in_thread(lambda: one.fence(10))
    assert fencer.entered.wait(5)
    second, _ = run_in_thread(lambda: other.fence(10))
    fencer.release.set()
    first.join(5)
    second.join(5)
    assert fencer.fences == 2


def test_a_joiner_gives_up_as_failed_at_its_own_timeout() -> None:
    fencer = BlockingFencer()
    chain = FencerChain([fencer], guard_key="h-timeout")
    first, _ = run_in_thread(lambda: chain.fence(10))
    assert fencer.entered.wait(5)
    try:
        late = chain.fence(0.2)
    finally:
        fencer.release.set()
        first.join(5)
    assert late.outcome is FenceOutcome.FAILED
    assert "did not finish" in late.detail
    assert fencer.fences == 1
