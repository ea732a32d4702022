"""The investigation decision table, checked over every combination of evidence against its stated rules."""

from __future__ import annotations

import itertools

import pytest

from kvmha.manager.core.investigation import Bmc, Heartbeat, Investigation, Reach, Verdict, classify_heartbeat, decide
from kvmha.manager.core.model import HostId

COMBINATIONS = list(itertools.product(Bmc, Heartbeat, Reach))


def _proven_dead(bmc: Bmc, hb: Heartbeat, reach: Reach) -> bool:
    # Positive evidence only: the BMC says off (and the heartbeat does not contradict it), or nobody reaches the host
    # and its heartbeat is stale past the self-fence time while no BMC says it is on.
    by_bmc = bmc is Bmc.OFF and hb is not Heartbeat.FRESH
    by_silence = bmc is Bmc.UNKNOWN and hb is Heartbeat.STALE_LONG and reach is Reach.UNREACHED
    return by_bmc or by_silence


def _alive(bmc: Bmc, hb: Heartbeat, reach: Reach) -> bool:
    return bmc is not Bmc.OFF and (hb is Heartbeat.FRESH or reach is Reach.REACHED)


@pytest.mark.parametrize(("bmc", "hb", "reach"), COMBINATIONS)
def test_verdict_follows_the_rules(bmc: Bmc, hb: Heartbeat, reach: Reach) -> None:
    verdict, reason = decide(bmc, hb, reach)
    if _proven_dead(bmc, hb, reach):
        assert verdict is Verdict.DEAD
    elif _alive(bmc, hb, reach):
        assert verdict is Verdict.ALIVE
    else:
        assert verdict is Verdict.UNKNOWN
    assert reason


def test_no_dead_verdict_without_positive_evidence() -> None:
    for bmc, hb, reach in COMBINATIONS:
        if decide(bmc, hb, reach)[0] is Verdict.DEAD:
            assert bmc is Bmc.OFF or (hb is Heartbeat.STALE_LONG and reach is Reach.UNREACHED)


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
