"""The investigation decision table, checked over every combination of evidence against its stated rules."""

from __future__ import annotations

import itertools

import pytest

from kvmha.manager.core.investigation import (
    Bmc,
    Heartbeat,
    Investigation,
    Lease,
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

COMBINATIONS = list(itertools.product(Bmc, Heartbeat, Reach, SelfFence, Operator, Lease))


def _signs_of_life(bmc: Bmc, hb: Heartbeat, reach: Reach) -> bool:
    return hb is Heartbeat.FRESH or reach is Reach.REACHED or bmc is Bmc.ON


def _by_silence_or_operator(bmc: Bmc, hb: Heartbeat, reach: Reach, fence: SelfFence, operator: Operator) -> bool:
    by_silence = (
        bmc is Bmc.UNKNOWN and hb is Heartbeat.STALE_LONG and reach is Reach.UNREACHED and fence is SelfFence.BACKED
    )
    by_operator = operator is Operator.CONFIRMED and not _signs_of_life(bmc, hb, reach)
    return by_silence or by_operator


def _proven_dead(bmc: Bmc, hb: Heartbeat, reach: Reach, fence: SelfFence, operator: Operator, lease: Lease) -> bool:
    # Positive evidence only: the BMC says off (and the heartbeat does not contradict it); or nobody reaches the host
    # and its heartbeat is stale past a self-fence that a watchdog guarantees, while no BMC says it is on; or an
    # operator confirmed it is off and nothing shows it alive. The last two only once the disk leases were probed and
    # none is held.
    by_bmc = bmc is Bmc.OFF and hb is not Heartbeat.FRESH
    probed_free = lease in (Lease.FREE, Lease.UNKNOWN)
    return by_bmc or (probed_free and _by_silence_or_operator(bmc, hb, reach, fence, operator))


def _alive(bmc: Bmc, hb: Heartbeat, reach: Reach) -> bool:
    return bmc is not Bmc.OFF and (hb is Heartbeat.FRESH or reach is Reach.REACHED)


@pytest.mark.parametrize(("bmc", "hb", "reach", "fence", "operator", "lease"), COMBINATIONS)
def test_verdict_follows_the_rules(
    bmc: Bmc, hb: Heartbeat, reach: Reach, fence: SelfFence, operator: Operator, lease: Lease
) -> None:
    verdict, reason = decide(bmc, hb, reach, fence, operator, lease)
    if _proven_dead(bmc, hb, reach, fence, operator, lease):
        assert verdict is Verdict.DEAD
    elif _alive(bmc, hb, reach):
        assert verdict is Verdict.ALIVE
    elif bmc is not Bmc.OFF and lease is Lease.UNTESTED and _by_silence_or_operator(bmc, hb, reach, fence, operator):
        assert verdict is Verdict.CHECK_LEASES  # dead only after the leases were probed
    else:
        assert verdict is Verdict.UNKNOWN
    assert reason


def test_a_held_lease_always_keeps_a_host_from_down_unless_its_power_is_off() -> None:
    for bmc, hb, reach, fence, operator, _ in COMBINATIONS:
        verdict, _ = decide(bmc, hb, reach, fence, operator, Lease.HELD)
        assert verdict is not Verdict.DEAD or bmc is Bmc.OFF


def test_no_dead_verdict_by_silence_without_an_armed_watchdog() -> None:
    """Issue 11: silence is produced by the agent itself; without a watchdog it proves nothing, however long."""
    for bmc, hb, reach, _, operator, lease in COMBINATIONS:
        if bmc is not Bmc.OFF and operator is Operator.NO:
            assert decide(bmc, hb, reach, SelfFence.NONE, operator, lease)[0] not in (
                Verdict.DEAD,
                Verdict.CHECK_LEASES,
            )


def test_no_dead_verdict_without_positive_evidence() -> None:
    for bmc, hb, reach, fence, operator, lease in COMBINATIONS:
        if decide(bmc, hb, reach, fence, operator, lease)[0] is Verdict.DEAD:
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
