"""Host health on the tiles: every signal from what the manager holds, "unknown" when it has heard nothing."""

from __future__ import annotations

import pytest

from kvmha.manager.core.model import HostId, HostRecord, HostStatus, HostUuid
from kvmha.manager.dashboard.view import Health, host_health
from kvmha.manager.store import AgentInfo, HostDetails


def details(*, version: str = "0.1.0", bmc: bool = True, watchdog_s: float | None = None, detail: str = "",
            leases: str = "", status: HostStatus = HostStatus.UP) -> HostDetails:
    host = HostRecord(HostId(1), HostUuid("u"), "h1", "10.0.0.1", status=status, has_bmc=bmc,
                      watchdog_timeout_s=watchdog_s, watchdog_detail=detail, lease_manager=leases)
    return HostDetails(host, AgentInfo(agent_version=version), "m1", "10.0.1.1" if bmc else None, 623 if bmc else None)


def health(d: HostDetails, connected: bool = True, age_s: float | None = 1.0) -> dict[str, Health]:
    return {h.name: h for h in host_health(d, connected, age_s, ping_timeout_s=7.0)}


CASES = [
    # (details, connected, ping age) -> {signal: state}
    (details(watchdog_s=20.0, leases="lockd"), True, 1.0,
     {"agent": "ok", "ping": "ok", "bmc": "ok", "lease": "ok", "watchdog": "ok"}),
    (details(bmc=False, detail="daemon unreachable"), True, 1.0, {"bmc": "warn", "watchdog": "warn", "lease": "warn"}),
    (details(version=""), False, None, {"agent": "bad", "ping": "unknown", "lease": "unknown", "watchdog": "unknown"}),
    (details(), False, 30.0, {"agent": "bad", "ping": "bad"}),
    (details(status=HostStatus.REMOVED), False, 30.0, {"agent": "unknown"}),
]


@pytest.mark.parametrize(("d", "connected", "age_s", "want"), CASES)
def test_health_signals(d: HostDetails, connected: bool, age_s: float | None, want: dict[str, str]) -> None:
    got = health(d, connected, age_s)
    assert set(got) == {"agent", "ping", "bmc", "lease", "watchdog"}
    assert {name: got[name].state for name in want} == want
    assert all(h.detail for h in got.values())


def test_details_say_why() -> None:
    got = health(details(watchdog_s=20.0, leases="lockd"))
    assert "20 s" in got["watchdog"].detail and "lockd" in got["lease"].detail
    assert "daemon unreachable" in health(details(detail="daemon unreachable"))["watchdog"].detail
