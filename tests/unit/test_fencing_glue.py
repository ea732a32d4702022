"""The glue between the core's Fence/QueryBmc actions and the fencers: a failure never reads as a success."""

from __future__ import annotations

import pytest

from kvmha.manager.adapters.fencer import FenceOutcome, FencerChain, FenceResult, PowerStatus
from kvmha.manager.core import actions
from kvmha.manager.core.model import HostId, RequestId
from kvmha.manager.fencing import fence_host, ipmi_factory, query_bmc
from kvmha.manager.store import BmcCredentials

CREDS = BmcCredentials("127.0.0.1", 6230, "admin", "s3cret-pw")
FENCE = actions.Fence(request_id=RequestId("r1"), host_id=HostId(3))
QUERY = actions.QueryBmc(request_id=RequestId("r2"), host_id=HostId(3))


class FakeFencer:
    name = "fake"

    def __init__(self, outcome: FenceOutcome, status: PowerStatus = PowerStatus.ON) -> None:
        self.outcome, self.status, self.fences = outcome, status, 0

    def power_status(self, timeout_s: float) -> PowerStatus:
        return self.status

    def fence(self, timeout_s: float) -> FenceResult:
        self.fences += 1
        return FenceResult(self.outcome, f"fake says {self.outcome}", 0.01)


@pytest.mark.parametrize(("outcome", "ok", "already_off"), [
    (FenceOutcome.FENCED, True, False),
    (FenceOutcome.ALREADY_OFF, True, True),
    (FenceOutcome.FAILED, False, False),
])
def test_fence_outcomes_map_to_facts(outcome: FenceOutcome, ok: bool, already_off: bool) -> None:
    fencer = FakeFencer(outcome)
    fact = fence_host(lambda _c: FencerChain([fencer]), CREDS, FENCE, timeout_s=5)
    assert (fact.ok, fact.already_off, fact.host_id, fact.request_id) == (ok, already_off, 3, "r1")
    assert fencer.fences == 1


def test_no_bmc_is_a_failed_fence_and_an_unknown_power() -> None:
    assert not fence_host(lambda _c: FencerChain([]), None, FENCE, 5).ok
    assert query_bmc(lambda _c: FencerChain([]), None, QUERY, 5).power == "unknown"


def test_a_fencer_that_raises_is_a_failure_without_its_message() -> None:
    def broken(_credentials: BmcCredentials) -> FencerChain:
        raise RuntimeError(f"could not log in with {CREDS.password}")

    fact = fence_host(broken, CREDS, FENCE, 5)
    assert not fact.ok and "RuntimeError" in fact.detail and CREDS.password not in fact.detail
    report = query_bmc(broken, CREDS, QUERY, 5)
    assert report.power == "unknown" and CREDS.password not in report.detail


@pytest.mark.parametrize(("status", "power"), [(PowerStatus.ON, "on"), (PowerStatus.OFF, "off"),
                                               (PowerStatus.UNKNOWN, "unknown")])
def test_bmc_status_maps(status: PowerStatus, power: str) -> None:
    report = query_bmc(lambda _c: FencerChain([FakeFencer(FenceOutcome.FAILED, status)]), CREDS, QUERY, 5)
    assert report.power == power and CREDS.password not in report.detail


def test_factory_caches_one_chain_per_bmc_with_a_race_delay_below_the_bound() -> None:
    factory = ipmi_factory("m1", race_delay_max_s=1.0)
    first, again = factory(CREDS), factory(CREDS)
    other = factory(BmcCredentials("127.0.0.1", 6231, "admin", "x"))
    assert first is again and other is not first
    assert 0.0 <= first.race_delay_s < 1.0
    assert ipmi_factory("m2", 1.0)(CREDS).race_delay_s != first.race_delay_s  # two managers fire apart
    assert CREDS.password not in repr(first)
