"""The investigation decision table, checked over every combination of evidence against its stated rules."""

from __future__ import annotations

import itertools

import pytest

from kvmha.manager.core.investigation import (
    Bmc,
    Heartbeat,
    Investigation,
    Operator,
    Reach,
    SelfFence,
    Verdict,
    classify_heartbeat,
    decide,
    seconds_until_stale_long,
    self_fenced_after_s,
)
from kvmha.manager.core.model import HostId

COMBINATIONS = list(itertools.product(Bmc, Heartbeat, Reach, SelfFence, Operator))


def _signs_of_life(bmc: Bmc, hb: Heartbeat, reach: Reach) -> bool:
    return hb is Heartbeat.FRESH or reach is Reach.REACHED or bmc is Bmc.ON


def _proven_dead(bmc: Bmc, hb: Heartbeat, reach: Reach, fence: SelfFence, operator: Operator) -> bool:
    # Positive evidence only: the BMC says off (and the heartbeat does not contradict it); or nobody reaches the host
    # and its heartbeat is stale past a self-fence that a watchdog guarantees, while no BMC says it is on; or an
    # operator confirmed it is off and nothing shows it alive.
    by_bmc = bmc is Bmc.OFF and hb is not Heartbeat.FRESH
    by_silence = (
        bmc is Bmc.UNKNOWN and hb is Heartbeat.STALE_LONG and reach is Reach.UNREACHED and fence is SelfFence.BACKED
    )
    by_operator = operator is Operator.CONFIRMED and not _signs_of_life(bmc, hb, reach)
    return by_bmc or by_silence or by_operator


def _alive(bmc: Bmc, hb: Heartbeat, reach: Reach) -> bool:
    return bmc is not Bmc.OFF and (hb is Heartbeat.FRESH or reach is Reach.REACHED)


@pytest.mark.parametrize(("bmc", "hb", "reach", "fence", "operator"), COMBINATIONS)
def test_verdict_follows_the_rules(
    bmc: Bmc, hb: Heartbeat, reach: Reach, fence: SelfFence, operator: Operator
) -> None:
    verdict, reason = decide(bmc, hb, reach, fence, operator)
    if _proven_dead(bmc, hb, reach, fence, operator):
        assert verdict is Verdict.DEAD
    elif _alive(bmc, hb, reach):
        assert verdict is Verdict.ALIVE
    else:
        assert verdict is Verdict.UNKNOWN
    assert reason


def test_no_dead_verdict_by_silence_without_an_armed_watchdog() -> None:
    """Issue 11: silence is produced by the agent itself; without a watchdog it proves nothing, however long."""
    for bmc, hb, reach, _, operator in COMBINATIONS:
        if bmc is not Bmc.OFF and operator is Operator.NO:
            assert decide(bmc, hb, reach, SelfFence.NONE, operator)[0] is not Verdict.DEAD


def test_no_dead_verdict_without_positive_evidence() -> None:
    for bmc, hb, reach, fence, operator in COMBINATIONS:
        if decide(bmc, hb, reach, fence, operator)[0] is Verdict.DEAD:
            assert (
                bmc is Bmc.OFF
                or (hb is Heartbeat.STALE_LONG and reach is Reach.UNREACHED and fence is SelfFence.BACKED)
                or operator is Operator.CONFIRMED
            )


def test_the_self_fence_bound_counts_isolation_watchdog_and_margin() -> None:
    assert self_fenced_after_s(30.0, 10.0, 20.0) == 60.0
    # Heartbeat stale 60 s, but the agent spoke 65 s ago: with 10 s of link slack it needs 70 s of silence.
    assert classify_heartbeat(60.0, 65.0, 4.0, 60.0, link_slack_s=10.0) is Heartbeat.STALE
    assert classify_heartbeat(60.0, 70.0, 4.0, 60.0, link_slack_s=10.0) is Heartbeat.STALE_LONG
    assert seconds_until_stale_long(50.0, 65.0, 60.0, 10.0) == 10.0
    assert seconds_until_stale_long(59.0, 50.0, 60.0, 10.0) == 20.0


@pytest.mark.parametrize(
    ("age_s", "expected"),
    [
        (None, Heartbeat.UNKNOWN),
        (0.0, Heartbeat.FRESH),
        (5.9, Heartbeat.FRESH),
        (6.0, Heartbeat.STALE),
        (39.9, Heartbeat.STALE),
        (40.0, Heartbeat.STALE_LONG),
    ],
)
def test_heartbeat_classes(age_s: float | None, expected: Heartbeat) -> None:
    assert classify_heartbeat(age_s, 100.0, stale_after_s=6.0, self_fenced_after_s=40.0) is expected


def test_stale_long_needs_the_agent_silent_that_long_too() -> None:
    # The storage heartbeat died long ago but the agent spoke to the manager 10 s ago: its self-fence clock (which
    # needs both lost) started only then, so its VMs may still run.
    assert classify_heartbeat(300.0, 10.0, stale_after_s=6.0, self_fenced_after_s=40.0) is Heartbeat.STALE


def test_evidence_collection_keeps_the_freshest_heartbeat_and_any_reach() -> None:
    inv = Investigation(HostId(1), started_at=0.0, deadline_at=4.0)
    assert inv.reach() is Reach.UNKNOWN
    inv.add_neighbor(tcp=False, icmp=None, heartbeat_age_s=30.0, at=1.0)
    assert inv.reach() is Reach.UNREACHED
    inv.add_neighbor(tcp=False, icmp=True, heartbeat_age_s=2.0, at=1.0)
    assert inv.reach() is Reach.REACHED
    assert inv.heartbeat_age_s == 2.0
