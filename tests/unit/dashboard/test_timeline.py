"""Recovery timelines from the events the real core writes: golden scenarios run in the simulator (production driver,
in-memory store), then the timeline, its SVG and the views are built from that store as the dashboard would."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmha.manager.dashboard import svg, timeline
from kvmha.manager.dashboard.view import build_cluster, build_vm_page, matches, search_vms
from kvmha.manager.operations import LiveHosts
from kvmha.manager.sim.script import load, run
from kvmha.manager.sim.simulator import Simulator
from kvmha.manager.store import EventRow

SCENARIOS = Path(__file__).parents[2] / "scenarios"
SVG = "{http://www.w3.org/2000/svg}"


def simulated(name: str) -> Simulator:
    return run(load(SCENARIOS / name))


def failures_of(sim: Simulator) -> list[timeline.Failure]:
    with sim.store.unit_of_work() as uow:
        hosts: dict[int, str] = {h.id: h.name for h in uow.hosts.all()}
        vms: dict[int, str] = {v.id: v.name for v in uow.vms.all()}
        return timeline.failures(uow.events.all(0, 100_000), uow.works.all(), hosts, vms)


@pytest.fixture(scope="module")
def power_loss() -> Simulator:
    return simulated("host_power_loss")


def test_power_loss_timeline(power_loss: Simulator) -> None:
    # The golden log: h3 powered off at 30; its link breaks at 32.0 and the manager asks its BMC at once; at 32.3 the
    # BMC reads off: Up -> Down without waiting for ping.timeout; vm3 and vm4 start on h4 and h1, both confirmed at
    # 33.4; vm5 (not HA) has no work item.
    [failure] = failures_of(power_loss)
    assert failure.host == "h3" and failure.verdict == "Down" and failure.fencing_at is None
    assert failure.last_ping_at is None and failure.link_lost_at is not None
    assert failure.detected_at - failure.link_lost_at == pytest.approx(0.3, abs=0.05)
    assert failure.verdict_at == failure.detected_at and failure.origin == failure.link_lost_at
    assert failure.evidence == {"verdict": "agent link broke and BMC says power is off"}
    assert [m.status for m in failure.marks] == ["Down"]
    by_vm = {v.vm: v for v in failure.vms}
    assert set(by_vm) == {"vm3", "vm4"}
    assert (by_vm["vm3"].target, by_vm["vm4"].target) == ("h4", "h1")
    for vm in by_vm.values():
        assert vm.outcome == "Done" and vm.attempts == 1
        assert vm.started_at is not None and vm.confirmed_at is not None
        assert failure.detected_at <= vm.scheduled_at <= vm.started_at <= vm.confirmed_at
    figures = failure.durations_s()
    assert figures["detection_s"] == pytest.approx(0.3, abs=0.05)
    assert failure.recovered_at == max(v.confirmed_at or 0 for v in failure.vms)
    assert figures["recovery_s"] == pytest.approx(1.4, abs=0.05)


def test_silent_host_timeline_with_evidence() -> None:
    # driver_backlog: h3 loses its power while the driver is held up; the manager finds it silent (Investigating,
    # with the missed seconds counted from its last ping's arrival), its BMC says off (Down), and vm3 runs on h2.
    [failure] = failures_of(simulated("driver_backlog"))
    investigating = failure.marks[0]
    missed = float(investigating.reason.removeprefix("missed pings for ").split(" s")[0])
    assert failure.last_ping_at == pytest.approx(failure.detected_at - missed)
    assert failure.link_lost_at is not None and failure.origin == failure.last_ping_at
    assert failure.verdict == "Down" and failure.verdict_at is not None and failure.verdict_at >= failure.detected_at
    assert failure.evidence["bmc"] == "off" and failure.evidence["verdict"] == "BMC says power is off"
    assert "neighbours answered" in failure.evidence["neighbours"]
    assert [m.status for m in failure.marks] == ["Investigating", "Down"]
    assert {(v.vm, v.target, v.outcome) for v in failure.vms} == {("vm3", "h2", "Done")}
    assert failure.durations_s()["detection_s"] == pytest.approx(missed)


def test_fenced_host_timeline_has_a_fencing_phase() -> None:
    failures = failures_of(simulated("fence_failure_then_success"))
    assert failures, "no failure found"
    fenced = [f for f in failures if f.verdict == "Fenced"]
    assert fenced, [(f.host, f.verdict, [m.status for m in f.marks]) for f in failures]
    failure = fenced[0]
    assert failure.fencing_at is not None and failure.verdict_at is not None
    assert failure.fencing_at <= failure.verdict_at
    assert "Alert" in [m.status for m in failure.marks]  # the first fence failed


def test_a_host_that_comes_back_closes_its_failure() -> None:
    for failure in failures_of(simulated("flapping_host")):
        if failure.closed_at is not None and failure.verdict_at is None:
            assert failure.verdict in ("Up", "Connecting")
            return
    pytest.fail("flapping_host has no failure closed by the host coming back")


def test_svg_is_well_formed_and_described(power_loss: Simulator) -> None:
    [failure] = failures_of(power_loss)
    text = svg.render(failure, now=failure.detected_at + 60, element_id="t1")
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    title = root.find(f"{SVG}title")
    assert title is not None and "h3" in (title.text or "")
    desc = root.find(f"{SVG}desc")
    assert desc is not None and "vm3 ran again on h4" in (desc.text or "")
    assert "after its agent link broke" in (desc.text or "")
    phases = [r.get("class") for r in root.iter(f"{SVG}rect") if (r.get("class") or "").startswith("phase")]
    assert phases.count("phase confirmed") == 0  # confirmed is a mark, not a bar
    assert {"phase silent", "phase investigating", "phase waiting", "phase starting"} <= set(phases)
    assert "link lost" in text
    # Finished: nothing drawn as still open (dashed).
    assert "stroke-dasharray" not in text


def test_open_failure_is_drawn_open() -> None:
    rows = [EventRow(1, 100.0, "warning", "host:1", "host.status", "Up -> Investigating (missed pings for 7.0 s)")]
    [failure] = timeline.failures(rows, [], {1: "h1"}, {})
    assert failure.verdict == "Investigating" and failure.verdict_at is None and failure.closed_at is None
    text = svg.render(failure, now=110.0)
    assert "stroke-dasharray" in text and "still open" in text
    assert failure.durations_s() == {"detection_s": 7.0}


def test_views_from_the_simulated_store(power_loss: Simulator) -> None:
    with power_loss.store.unit_of_work() as uow:
        cluster = build_cluster(uow, LiveHosts(frozenset(), {}), now=power_loss.loop.time(), ping_timeout_s=7.0)
        tiles = {h.name: h for h in cluster.hosts}
        assert tiles["h3"].status == "Down" and tiles["h1"].status == "Up"
        assert {v.name for v in tiles["h4"].vms} >= {"vm3"}
        assert tiles["h4"].used_memory_mib >= 4096
        assert all(not h.connected for h in cluster.hosts)  # no live links given: never shown as connected
        assert {h.name: h.state for h in tiles["h1"].health}["agent"] == "bad"
        vm3 = uow.vms.find("vm3")
        assert vm3 is not None
        page = build_vm_page(uow, vm3)
        kinds = [e.kind for e in page.history]
        assert "vm.starting" in kinds and "work.done" in kinds
        assert page.work and page.work[0].step == "Done"
    assert [v.name for v in search_vms(cluster.vms, "h4 running")] == ["vm3"]
    assert search_vms(cluster.vms, "") == list(cluster.vms)


def test_stream_filter() -> None:
    row = EventRow(1, 0.0, "warning", "host:12", "host.status", "x")
    assert matches(row, "", "info") and matches(row, "host:", "warning") and matches(row, "host:12", "info")
    assert not matches(row, "host:1", "info") and not matches(row, "vm:", "info")
    assert not matches(row, "", "alert")


def test_evidence_carries_every_field_of_the_investigation() -> None:
    # lease_held_when_watchdog_failed: each investigation's summary names the BMC, heartbeat, neighbours,
    # self-fence and the leases (held by vm1's QEMU, then free): the failure keeps the last as its evidence, and
    # every mark keeps its own.
    [failure] = failures_of(simulated("lease_held_when_watchdog_failed"))
    assert {"bmc", "heartbeat", "neighbours", "self-fence", "leases", "verdict"} <= set(failure.evidence)
    assert failure.evidence["heartbeat"].startswith("stale-long")
    leases = [timeline.evidence_of(m.reason).get("leases", "") for m in failure.marks]
    assert any(text.startswith("held") and "vm1" in text for text in leases), leases
    assert timeline.evidence_of("Up -> Investigating (missed pings for 7.0 s)") == {}
