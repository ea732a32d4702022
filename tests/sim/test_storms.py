"""Seeded fault storms over 1,000 simulated hosts (issue 7's proof in the simulator).

Each storm: 1,000 hosts x 10 VMs, faults of every kind for 10 simulated minutes (and a manager restart), then a
quiet period. Asserted: the invariant checker saw no VM on two hosts and no VM started elsewhere while its old host
was neither fenced nor proven dead; every HA VM whose host lost power runs again within the bound; every HA VM not
running at the end has a reason the operator can read (Stopped by its guest, Error, or a no-capacity event).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmha.manager.core import hostflow
from kvmha.manager.core.investigation import Verdict
from kvmha.manager.sim.script import load, run
from kvmha.manager.sim.storm import Storm, storm_simulator, unexplained_down_vms

HOSTS = 1000
VMS_PER_HOST = 10
FAULTS_UNTIL_S = 600.0
QUIET_S = 300.0
# Worst case by design: no BMC (or a dead one) -> wait isolation.after + margin (40 s) of stale heartbeat after the
# ping timeout, plus investigation/fence attempts and the restart; a manager restart adds its startup grace.
RESTART_BOUND_S = 150.0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_storm_keeps_fencing_safety_and_restarts(seed: int) -> None:
    sim, rng = storm_simulator(HOSTS, VMS_PER_HOST, seed)
    storm = Storm(sim, rng, rate_per_s=0.2, until_s=FAULTS_UNTIL_S)
    storm.start()
    sim.run_until(FAULTS_UNTIL_S + QUIET_S)

    assert sim.checker.violations == []
    assert sum(storm.injected.values()) >= 80, storm.injected  # the storm really happened
    assert storm.injected.get("power-loss", 0) + storm.injected.get("bmc-dead-power-loss", 0) >= 5
    assert sim.metrics.failure_to_running_s, "no VM was ever restarted after a host failure"
    slowest = max(sim.metrics.failure_to_running_s)
    assert slowest <= RESTART_BOUND_S, f"slowest restart {slowest:.1f} s"
    assert not sim.metrics.failed_at or sim.metrics.no_capacity_events, (
        f"{len(sim.metrics.failed_at)} HA VMs of failed hosts never ran again"
    )
    assert unexplained_down_vms(sim) == []


def test_the_checker_catches_a_core_that_restarts_on_hope(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself must be able to fail: a core that calls every silent host dead makes two copies."""
    monkeypatch.setattr(hostflow, "decide", lambda *_: (Verdict.DEAD, "broken on purpose"))
    scenario = load(Path(__file__).parents[1] / "scenarios" / "network_partition_vms_running")
    sim = run(scenario)
    assert any("while running on" in violation for violation in sim.checker.violations)


def test_the_checker_catches_a_start_before_the_old_host_is_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler that starts VMs while their host is still being investigated breaks rule 2 (host lost power)."""
    from kvmha.manager.core import scheduler
    from kvmha.manager.core.model import VmRecord

    original = scheduler.Scheduler._host_check

    def hasty(self: scheduler.Scheduler, vm: VmRecord) -> tuple[scheduler.Clearance, str]:
        clearance, why = original(self, vm)
        return (scheduler.Clearance.SAFE, why) if clearance is scheduler.Clearance.WAIT_HOST else (clearance, why)

    monkeypatch.setattr(scheduler.Scheduler, "_host_check", hasty)
    scenario = load(Path(__file__).parents[1] / "scenarios" / "bmc_dead_with_host")
    sim = run(scenario)
    assert any("neither fenced nor proven dead" in violation for violation in sim.checker.violations)
