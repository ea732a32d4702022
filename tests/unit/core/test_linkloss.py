"""Evidence at once (core/linkloss.py): a broken agent link makes the core ask the BMC now; only "off" decides."""

from __future__ import annotations

import pytest

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.investigation import Bmc
from kvmha.manager.core.linkloss import RECHECK_FOR_S, RECHECK_INTERVAL_S, RULES, Early
from kvmha.manager.core.model import HostId, HostStatus, RequestId
from tests.unit.core.harness import Harness, messages, of_type, starts, vm

H3 = HostId(3)


def lost_link(h: Harness, planned: bool = False, at: float = 10.0) -> list[a.QueryBmc]:
    h.tick_until(at, pinging=[1, 2, 3])
    return of_type(h.handle(f.AgentDisconnected(H3, planned=planned)), a.QueryBmc)


def cluster(bmc: bool = True) -> Harness:
    h = Harness(vms=[vm(1, on=3), vm(2, on=3, ha=False)], bmc=bmc)
    h.connect_all()
    return h


def test_the_table_decides_only_on_off() -> None:
    assert {power: early for power, (early, _) in RULES.items()} == {
        Bmc.OFF: Early.DOWN,
        Bmc.ON: Early.WAIT,
        Bmc.UNKNOWN: Early.WAIT,
    }


def test_a_broken_link_and_a_bmc_that_reads_off_is_down_and_restarts_at_once() -> None:
    h = cluster()
    [query] = lost_link(h)

    out = h.handle(f.BmcPowerReported(query.request_id, H3, "off"), at=10.3)

    assert h.core.host_status(H3) is HostStatus.DOWN
    [start] = starts(out)
    assert start.host_id != H3
    assert any("agent link broke and BMC says power is off" in m for m in messages(out))
    assert any("not HA-enabled, Stopped" in m for m in messages(out))
    # Nothing fires later for the dead host: no ping timeout, no second query.
    later = h.tick_until(30.0, pinging=[1, 2])
    assert not of_type(later, a.QueryBmc) and not of_type(later, a.Fence)


@pytest.mark.parametrize("power", ["on", "unknown"])
def test_any_other_answer_waits_for_the_ping_timeout_as_before(power: str) -> None:
    h = cluster()
    [query] = lost_link(h)

    out = h.handle(f.BmcPowerReported(query.request_id, H3, power), at=10.3)  # type: ignore[arg-type]

    assert h.core.host_status(H3) is HostStatus.UP
    assert not starts(out) and not of_type(out, a.Fence)
    h.tick_until(10.0 + h.core.config.ping_timeout_s, pinging=[1, 2])
    assert h.core.host_status(H3) is HostStatus.INVESTIGATING  # the usual path, unchanged


def test_no_answer_in_time_is_unknown_and_waits() -> None:
    h = cluster()
    lost_link(h)

    h.tick_until(10.0 + h.core.config.check_neighbor_timeout_s + 0.1, pinging=[1, 2])

    assert h.core.host_status(H3) is HostStatus.UP
    assert not starts(h.log[-20:])


def test_a_planned_goodbye_asks_nothing() -> None:
    assert lost_link(cluster(), planned=True) == []


def test_a_host_without_bmc_asks_nothing() -> None:
    assert lost_link(cluster(bmc=False)) == []


def test_a_stale_second_disconnect_asks_nothing_more() -> None:
    h = cluster()
    assert len(lost_link(h)) == 1
    assert of_type(h.handle(f.AgentDisconnected(H3, planned=False)), a.QueryBmc) == []


def test_off_after_the_agent_reconnected_is_a_contradiction_not_a_verdict() -> None:
    h = cluster()
    [query] = lost_link(h)
    h.connect(3, running=[1], at=10.2)

    out = h.handle(f.BmcPowerReported(query.request_id, H3, "off"), at=10.3)

    assert h.core.host_status(H3) is HostStatus.UP
    assert not starts(out)
    assert any("not acted upon" in m for m in messages(out))


def test_an_answer_that_comes_after_the_investigation_started_is_left_to_it() -> None:
    h = cluster()
    [query] = lost_link(h)
    h.tick_until(10.0 + h.core.config.ping_timeout_s + 0.1, pinging=[1, 2])
    assert h.core.host_status(H3) is HostStatus.INVESTIGATING

    # The early query timed out long ago: a very late answer matches nothing.
    out = h.handle(f.BmcPowerReported(RequestId(query.request_id), H3, "off"))

    assert h.core.host_status(H3) is HostStatus.INVESTIGATING
    assert not starts(out)


def test_a_bmc_that_reads_on_is_asked_again_for_a_few_seconds_and_off_then_decides() -> None:
    # A BMC-initiated power-off can close the host's sockets a moment before the BMC reads the chassis off.
    h = cluster()
    [query] = lost_link(h)
    h.handle(f.BmcPowerReported(query.request_id, H3, "on"), at=10.05)

    [again] = of_type(h.tick_until(10.05 + RECHECK_INTERVAL_S, pinging=[1, 2]), a.QueryBmc)
    out = h.handle(f.BmcPowerReported(again.request_id, H3, "off"), at=10.6)

    assert h.core.host_status(H3) is HostStatus.DOWN
    assert starts(out)


def test_rechecks_stop_after_their_window_and_at_a_reconnect() -> None:
    h = cluster()
    [query] = lost_link(h)
    asked = [query]
    while asked:
        h.handle(f.BmcPowerReported(asked[-1].request_id, H3, "on"), at=h.now + 0.05)
        asked = of_type(h.tick_until(h.now + RECHECK_INTERVAL_S, pinging=[1, 2]), a.QueryBmc)
        if asked:
            query = asked[-1]
        assert h.now < 10.0 + RECHECK_FOR_S + 1.0
    assert h.core.host_status(H3) is HostStatus.UP
    # Only one "nothing decided" event per broken link, however often the BMC was asked again.
    assert sum("BMC says power is on" in m for m in messages(h.log)) == 1

    h2 = cluster()
    [first] = lost_link(h2)
    h2.handle(f.BmcPowerReported(first.request_id, H3, "on"), at=10.05)
    h2.connect(3, running=[1], at=10.2)
    assert of_type(h2.tick_until(12.0, pinging=[1, 2, 3]), a.QueryBmc) == []


def test_a_bmc_that_does_not_answer_is_not_asked_again() -> None:
    h = cluster()
    [query] = lost_link(h)
    h.handle(f.BmcPowerReported(query.request_id, H3, "unknown"), at=13.0)

    assert of_type(h.tick_until(16.0, pinging=[1, 2]), a.QueryBmc) == []
