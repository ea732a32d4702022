"""Host health on the tiles: every signal from what the manager holds, "unknown" when it has heard nothing."""

from __future__ import annotations

from importlib import resources

import pytest

from kvmha.manager.core.model import (
    HostId,
    HostRecord,
    HostStatus,
    HostUuid,
    ResourceState,
    VmId,
    VmRecord,
    VmState,
    VmUuid,
)
from kvmha.manager.dashboard.pages import css_token, host_tile
from kvmha.manager.dashboard.view import Health, HostTile, build_vm_page, host_health, recent_of
from kvmha.manager.sim.memstore import MemoryStore
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


def test_vm_history_is_its_own_even_when_its_id_was_used_before() -> None:
    store = MemoryStore(wall=lambda: 100.0)
    with store.unit_of_work() as uow:
        old = VmRecord(VmId(1), VmUuid("u-old"), "old", VmState.STOPPED)
        uow.vms.add(old, 1.0)
        uow.events.add(1.0, "info", "vm:1", "vm.registered", "registered old")
        uow.events.add(2.0, "info", "vm:1", "vm.deleted", "old deleted")
        uow.vms.delete(VmId(1))
        uow.vms.add(VmRecord(VmId(1), VmUuid("u-new"), "new", VmState.RUNNING), 3.0)
        uow.events.add(3.0, "info", "vm:1", "vm.registered", "registered new")
        for second in range(1200):  # more than one page of the store's listing
            uow.events.add(4.0 + second, "info", "vm:1", "vm.power", f"power {second}")
        uow.commit()
    with store.unit_of_work() as uow:
        new = uow.vms.find("new")
        assert new is not None
        page = build_vm_page(uow, new, history_limit=10)
        assert [e.message for e in page.history] == [f"power {n}" for n in range(1190, 1200)]
        everything = build_vm_page(uow, new, history_limit=5000)
        assert everything.history[0].message == "registered new"
        assert all("old" not in e.message for e in everything.history)
        assert len(recent_of(uow, "vm:1", 3)) == 3


def test_every_host_status_and_resource_state_has_its_look() -> None:
    """Each status the core has is a colour (CSS) and a word on the tile; each resource state but Enabled is a mark."""
    css = resources.files("kvmha.manager.dashboard").joinpath("static", "dashboard.css").read_text()
    for status in HostStatus:
        assert f".status-{css_token(status.value)} " in css, status
    for state in ResourceState:
        tile = HostTile(id=1, uuid="u", name="h1", address="a", status="Up", resource_state=state.value, role="Routing",
                        connected=True, last_ping_at=None, last_ping_age_s=None, cpus=4, memory_mib=1024,
                        used_vcpus=1, used_memory_mib=256, agent_version="", bmc="", health=(), vms=())
        html = host_tile(tile)
        assert (f'class="resource resource-{css_token(state.value)}">{state.value}<' in html) == (
            state is not ResourceState.ENABLED), state
        if state is not ResourceState.ENABLED:
            assert f".resource-{css_token(state.value)}" in css, state
