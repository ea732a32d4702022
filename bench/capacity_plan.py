"""Benchmark: what the what-if planner and admission control cost on the live core (issue 16).

    .venv/bin/python bench/capacity_plan.py [--hosts 50 500 1000] [--vms-per-host 10] [--repeat 3]

Boots simulated clusters (every host Up, VMs running; the simulator runs the production core), then times on that
core: one host's failure plan (Core.plan_failure), admission control for one more HA VM (the check an operator start
of an HA VM, or HA switched on, waits for), the same check planning every failure set (what admission did before
`capacityplan.surely_restarted`, measured in the same run), and the worst failure (kvmha capacity, the gauges). The
event loop is blocked for that long on a real manager. Two clusters per size: "roomy" (hosts with room for about 2.5x
their load: every failure set is settled without planning) and "tight" (one host in ten holds one HA VM of 90% of a
host's memory, which fits only on an empty host: those hosts' failures must be planned, and strand their VM).
Prints the medians and writes bench/results/capacity_plan.json and .png. CPU-heavy: run it under the lab lock on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvmha.manager.core import capacityplan
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import HostId, VmId, VmRecord, VmState, VmUuid
from kvmha.manager.sim.simulator import Simulator
from kvmha.manager.sim.storm import build_cluster

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ("roomy", "tight")


def _median_s(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@contextmanager
def _every_set_planned() -> Iterator[None]:
    """Admission as it was: no failure set settled without its plan."""
    shortcut = capacityplan.surely_restarted
    capacityplan.surely_restarted = lambda world, failed: False
    try:
        yield
    finally:
        capacityplan.surely_restarted = shortcut


def measure(hosts: int, vms_per_host: int, repeat: int, shape: str) -> dict[str, Any]:
    big = hosts // 10 if shape == "tight" else 0
    cluster_hosts, vms = build_cluster(hosts, vms_per_host, random.Random(1), big_vms=big)
    sim = Simulator(cluster_hosts, vms, seed=1)
    try:
        sim.run_until(5.0)
        core = sim.core
        new = VmRecord(VmId(10**7), VmUuid("uuid-bench"), "bench", VmState.STOPPED, ha_enabled=True, memory_mib=1024,
                       vcpus=1)
        verdict = _admission(core, new)
        with _every_set_planned():
            before = _median_s(lambda: _admission(core, new), repeat)
            assert _admission(core, new) == verdict  # the same answer, planned the long way
        return {
            "shape": shape,
            "hosts": hosts,
            "vms": len(vms),
            "admitted": verdict.ok,
            "plan_one_host_s": _median_s(lambda: core.plan_failure([HostId(1)]), repeat),
            "admission_s": _median_s(lambda: _admission(core, new), repeat),
            "admission_every_set_s": before,
            "worst_failure_s": _median_s(core.worst_failure, repeat),
        }
    finally:
        sim.close()


def _admission(core: Core, vm: VmRecord) -> capacityplan.Admission:
    world = capacityplan.world_of(core._ctx, core._sched.placement_cursor)  # the bench reads the core
    return capacityplan.admission(world, vm)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for shape, color in zip(SHAPES, ("#3182bd", "#e6550d"), strict=True):
        mine = [r for r in rows if r["shape"] == shape]
        sizes = [r["hosts"] for r in mine]
        ax.plot(sizes, [r["admission_s"] * 1000 for r in mine], "o-", color=color, label=f"admission, {shape}")
        ax.plot(sizes, [r["admission_every_set_s"] * 1000 for r in mine], "o--", color=color, alpha=0.5,
                label=f"every set planned (before), {shape}")
    ax.set_xlabel("hosts (10 VMs each)")
    ax.set_ylabel("ms the manager's loop is busy per HA start")
    ax.set_yscale("log")
    ax.set_title("admission control for one HA start (medians)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[50, 500, 1000])
    parser.add_argument("--vms-per-host", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        for hosts in args.hosts:
            row = measure(hosts, args.vms_per_host, args.repeat, shape)
            rows.append(row)
            ms = {key: row[key] * 1000 for key in row if key.endswith("_s")}
            print(f"{shape:>5} {row['hosts']:>5} hosts {row['vms']:>6} VMs: plan of one host "
                  f"{ms['plan_one_host_s']:7.1f} ms, admission {ms['admission_s']:8.1f} ms "
                  f"({'admitted' if row['admitted'] else 'refused'}; every set planned "
                  f"{ms['admission_every_set_s']:8.1f} ms), worst failure {ms['worst_failure_s']:8.1f} ms", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "capacity_plan.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, RESULTS / "capacity_plan.png")
    print(f"wrote {RESULTS / 'capacity_plan.json'} and {RESULTS / 'capacity_plan.png'}")


if __name__ == "__main__":
    main()
