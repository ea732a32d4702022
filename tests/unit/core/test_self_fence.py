"""Issue 11, the manager side: a silent host is dead by silence only when a watchdog armed at its last contact
guarantees its self-fence, after isolation.after + the watchdog's bound + margin (and the link slack of silence);
otherwise it stays Alert, its HA VMs wait, one event tells the operator why and what to do, and
`kvmha host confirm-down` is evidence that signs of life still override."""

from __future__ import annotations

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.model import HostId, HostStatus, WatchdogReport
from tests.unit.core.harness import Harness, of_type, starts, vm

CONFIG = CoreConfig(startup_grace_s=1.0)  # isolation.after 30, margin 10, link slack 10
UNARMED = WatchdogReport(armed=False, detail="kvmha-watchdog unreachable")
DIED_AT = 0.0  # h1's last ping and last heartbeat write


def _silent_host(
    h: Harness,
    until_s: float,
    heartbeat_age: float | None = None,
    reached: bool = False,
    first: list[a.Action] | None = None,
) -> list[a.Action]:
    """Run until `until_s` with h1 silent since DIED_AT: neighbours read its heartbeat as stale since then (and
    answer the questions in `first`, actions already returned)."""
    out: list[a.Action] = []
    step_at = h.now
    new = first or []
    while True:
        for command in of_type(new, a.SendCommand):
            if isinstance(command.command, a.CheckNeighbor):
                age = h.now - DIED_AT if heartbeat_age is None else heartbeat_age
                new += h.answer(command, payload=f.NeighborCheck(HostId(1), reached, reached, age))
        out += new
        if step_at >= until_s:
            return out
        step_at += 1.0
        new = h.tick_until(step_at, pinging=(2, 3))


def _kinds(actions: list[a.Action], kind: str) -> list[str]:
    return [e.message for e in of_type(actions, a.RecordEvent) if e.kind == kind]


def test_an_armed_host_without_bmc_is_dead_only_after_isolation_plus_watchdog_plus_margin() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False)  # armed, T = 20 s
    h.connect_all()
    # Heartbeat stale 60 s (30 + 20 + 10) is not enough: the agent must also be silent 70 s (+ link slack).
    out = _silent_host(h, 69.0)
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT and starts(out) == []
    out = _silent_host(h, 90.0)
    assert h.core.host_status(HostId(1)) is HostStatus.DOWN
    assert len(starts(out)) == 1
    assert _kinds(h.log, "host.needs.operator") == []


def test_an_unarmed_host_without_bmc_is_never_dead_by_silence_and_the_operator_is_told_once() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False, watchdog=UNARMED)
    h.connect_all()
    out = _silent_host(h, 600.0)
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT
    assert starts(out) == [] and of_type(out, a.Fence) == []
    told = _kinds(h.log, "host.needs.operator")
    assert len(told) == 1, told  # re-investigated every 10 s, told once
    assert "kvmha-watchdog unreachable" in told[0] and "kvmha host confirm-down h1" in told[0]


def test_the_watchdog_state_at_the_last_contact_counts() -> None:
    """Armed at Hello, then a ping says the daemon is gone: the host's silence proves nothing any more."""
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False)
    h.connect_all()
    h.handle(f.HeartbeatReceived(HostId(1), 1, True, True, UNARMED), at=0.0)
    assert any("watchdog not armed" in m for m in _kinds(h.log, "host.watchdog"))
    assert h.core.hosts[HostId(1)].watchdog_timeout_s is None
    out = _silent_host(h, 300.0)
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT and starts(out) == []


def test_a_longer_watchdog_bound_makes_the_manager_wait_longer() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False, watchdog=WatchdogReport(armed=True, timeout_s=60.0))
    h.connect_all()
    _silent_host(h, 105.0)  # 30 + 60 + 10 = 100 s of heartbeat, 110 s of silence
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT
    _silent_host(h, 130.0)
    assert h.core.host_status(HostId(1)) is HostStatus.DOWN


def test_confirm_down_releases_an_unarmed_hosts_vms_and_records_who() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False, watchdog=UNARMED)
    h.connect_all()
    _silent_host(h, 40.0)
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT
    out = _silent_host(h, 50.0, first=h.handle(f.HostConfirmedDown(HostId(1), "alice")))
    assert h.core.host_status(HostId(1)) is HostStatus.DOWN and len(starts(out)) == 1
    assert any("alice" in m for m in _kinds(h.log, "host.confirmed.down"))
    down = [e.message for e in of_type(h.log, a.RecordEvent) if "-> Down" in e.message]
    assert down and "confirm-down by alice" in down[0]


def test_confirm_down_does_not_override_signs_of_life() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=False, watchdog=UNARMED)
    h.connect_all()
    _silent_host(h, 20.0, reached=True)  # a neighbour reaches it: alive, its link is lost
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT
    out = _silent_host(h, 60.0, reached=True, first=h.handle(f.HostConfirmedDown(HostId(1), "bob")))
    assert h.core.host_status(HostId(1)) is HostStatus.ALERT and starts(out) == []
    refused = _kinds(h.log, "host.confirm.refused")
    assert refused and "bob" in refused[0] and "neighbour reaches" in refused[0]


def test_confirm_down_of_a_connected_host_is_ignored() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG)
    h.connect_all()
    out = h.handle(f.HostConfirmedDown(HostId(1), "carol"))
    assert h.core.host_status(HostId(1)) is HostStatus.UP
    assert any("carol" in m and "ignored" in m for m in _kinds(out, "host.confirm.refused"))


def test_a_host_whose_bmc_fails_and_without_watchdog_waits_for_the_operator() -> None:
    h = Harness(vms=[vm(1, on=1)], config=CONFIG, bmc=True, watchdog=UNARMED)
    h.connect_all()
    out: list[a.Action] = []
    for step_at in range(8, 400, 1):
        new = h.tick_until(float(step_at), pinging=(2, 3))
        for fence in of_type(new, a.Fence):
            new += h.handle(f.FenceCompleted(fence.request_id, fence.host_id, False, False, "BMC does not answer"))
        for query in of_type(new, a.QueryBmc):
            new += h.handle(f.BmcPowerReported(query.request_id, query.host_id, "unknown", "no answer"))
        for command in of_type(new, a.SendCommand):
            if isinstance(command.command, a.CheckNeighbor):
                new += h.answer(command, payload=f.NeighborCheck(HostId(1), False, False, h.now))
        out += new
    assert h.core.host_status(HostId(1)) is not HostStatus.DOWN and starts(out) == []
    told = _kinds(h.log, "host.needs.operator")
    assert len(told) == 1 and "its BMC does not answer" in told[0]
