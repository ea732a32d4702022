"""Benchmark: what the what-if planner and admission control cost on the live core (issue 16).

    .venv/bin/python bench/capacity_plan.py [--hosts 100 500 1000] [--vms-per-host 10] [--repeat 5]

Boots a simulated cluster (every host Up, VMs running; the simulator runs the production core), then times on that
core: one host's failure plan (Core.plan_failure), admission control for one more HA VM (the check an operator start
of an HA VM waits for: a plan per Enabled host), and the worst failure (kvmha capacity, the gauges). The event loop is
blocked for that long on a real manager. Prints the medians and writes bench/results/capacity_plan.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from kvmha.manager.core.model import HostId, VmId, VmRecord, VmState, VmUuid
from kvmha.manager.sim.simulator import Simulator
from kvmha.manager.sim.storm import build_cluster

RESULTS = Path(__file__).resolve().parent / "results"


def _median_s(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(hosts: int, vms_per_host: int, repeat: int) -> dict[str, float]:
    cluster_hosts, vms = build_cluster(hosts, vms_per_host, random.Random(1))
    sim = Simulator(cluster_hosts, vms, seed=1)
    try:
        sim.run_until(5.0)
        core = sim.core
        new = VmRecord(VmId(10**7), VmUuid("uuid-bench"), "bench", VmState.STOPPED, ha_enabled=True, memory_mib=1024,
                       vcpus=1)
        return {
            "hosts": hosts,
            "vms": len(vms),
            "plan_one_host_s": _median_s(lambda: core.plan_failure([HostId(1)]), repeat),
            "admission_s": _median_s(lambda: _admission(core, new), repeat),
            "worst_failure_s": _median_s(core.worst_failure, repeat),
        }
    finally:
        sim.close()


def _admission(core: object, vm: VmRecord) -> None:
    from kvmha.manager.core import capacityplan
    from kvmha.manager.core.core import Core

    assert isinstance(core, Core)
    world = capacityplan.world_of(core._ctx, core._sched.placement_cursor)  # the bench reads the core
    capacityplan.admission(world, vm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--vms-per-host", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for hosts in args.hosts:
        row = measure(hosts, args.vms_per_host, args.repeat)
        rows.append(row)
        print(f"{row['hosts']:>5} hosts {row['vms']:>6} VMs: plan of one host {row['plan_one_host_s'] * 1000:8.1f} ms, "
              f"admission {row['admission_s'] * 1000:9.1f} ms, worst failure {row['worst_failure_s'] * 1000:9.1f} ms",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "capacity_plan.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
