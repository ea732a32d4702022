"""Measured start times for the planner's estimate (core/starttimes.py): medians over bounded windows, per host once
it has enough starts, else the cluster's, else the default; and the plan's ETA reads them after real restarts in the
simulator."""

from __future__ import annotations

import random

from kvmha.manager.core import capacityplan
from kvmha.manager.core.model import HostId
from kvmha.manager.core.starttimes import CLUSTER_WINDOW, DEFAULT_START_S, StartTimes
from kvmha.manager.sim.script import apply
from kvmha.manager.sim.simulator import Simulator
from kvmha.manager.sim.storm import build_cluster

SLOW_S = 2.0


def test_no_estimate_before_enough_starts() -> None:
    times = StartTimes()
    times.observe(HostId(1), 9.0)
    times.observe(HostId(1), 9.0)
    assert times.estimate().cluster_s == DEFAULT_START_S and times.estimate().samples == 0


def test_per_host_median_once_measured_there_else_the_cluster() -> None:
    times = StartTimes()
    for took in (2.0, 2.2, 30.0):  # one start that waited for something else does not move a median
        times.observe(HostId(1), took)
    times.observe(HostId(2), 5.0)
    estimate = times.estimate()
    assert estimate.on(HostId(1)) == 2.2
    assert estimate.on(HostId(2)) == estimate.cluster_s == 3.6  # h2 has one start: the cluster's median
    assert estimate.on(None) == estimate.cluster_s


def test_windows_are_bounded() -> None:
    times = StartTimes()
    for _ in range(CLUSTER_WINDOW):
        times.observe(HostId(1), 50.0)
    for _ in range(CLUSTER_WINDOW):
        times.observe(HostId(2), 1.0)
    assert times.estimate().cluster_s == 1.0 and times.estimate().samples == CLUSTER_WINDOW


def test_the_plan_estimates_from_starts_measured_in_the_simulator() -> None:
    hosts, vms = build_cluster(4, 3, random.Random(3), bmc_share=1.0)
    for host in hosts:
        host.extra_delay_s = SLOW_S  # every command reaches its host late: starts take ~2 s longer than the default
    sim = Simulator(hosts, vms, seed=1)
    try:
        sim.run_until(5.0)
        before = next(p for p in sim.core.plan_failure([HostId(2)]) if p.order == 1)
        detect = capacityplan.EARLY_NOTICE_S
        assert before.eta_s == detect + DEFAULT_START_S, before
        sim.schedule(6.0, apply, sim, "power h1 off")
        sim.run_until(40.0)
        measured = sim.core._sched.start_times.estimate()  # the test reads the core
        assert measured.samples >= 3 and measured.cluster_s >= DEFAULT_START_S + SLOW_S - 0.1, measured
        first = next(p for p in sim.core.plan_failure([HostId(2)]) if p.order == 1)
        names = {h.name: h.id for h in hosts}
        assert first.target is not None
        assert first.eta_s == detect + measured.on(names[first.target]), (first, measured)
    finally:
        sim.close()
