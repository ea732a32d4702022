"""Benchmark: the real decision core driven by the simulator over a big cluster with random faults.

    .venv/bin/python bench/sim_bench.py [--hosts 5000] [--vms-per-host 20] [--duration 3600] [--seed 1]

Prints simulated seconds per wall second, core decisions (facts + timers handled) per wall second, and the
distribution of host-failure-to-VM-running and detection-to-VM-running times in simulated seconds.
"""

from __future__ import annotations

import argparse
import time

from kvmha.manager.sim.storm import Storm, storm_simulator


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def describe(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: no samples"
    figures = ", ".join(f"{label} {percentile(values, share):6.1f}" for label, share in
                        (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)))
    return f"{name} (n={len(values)}): {figures}, max {max(values):6.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5000)
    parser.add_argument("--vms-per-host", type=int, default=20)
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="faults per simulated second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    started = time.perf_counter()
    sim, rng = storm_simulator(args.hosts, args.vms_per_host, args.seed)
    storm = Storm(sim, rng, rate_per_s=args.fault_rate, until_s=args.duration - 300.0, manager_restarts=1)
    storm.start()
    built = time.perf_counter()
    sim.run_until(args.duration)
    wall_s = time.perf_counter() - built

    metrics = sim.metrics
    print(f"cluster: {args.hosts} hosts x {args.vms_per_host} VMs, {args.duration:.0f} simulated s, seed {args.seed}"
          f" (set-up {built - started:.1f} s wall)")
    print(f"faults injected: {sum(storm.injected.values())} {dict(sorted(storm.injected.items()))}")
    print(f"wall time: {wall_s:.1f} s; simulated s per wall s: {args.duration / wall_s:.1f}")
    print(f"core decisions: {sim.core.decisions} ({sim.core.decisions / wall_s:,.0f} per wall s); "
          f"simulator events: {sim.events_handled}")
    print(describe("host failure -> VM running elsewhere", metrics.failure_to_running_s))
    print(describe("detection -> VM running elsewhere", metrics.detection_to_running_s))
    print(f"invariant violations: {len(sim.checker.violations)}; VM starts {sim.checker.starts}; "
          f"no-capacity events {metrics.no_capacity_events}; HA VMs of failed hosts never restarted: "
          f"{len(metrics.failed_at)}")


if __name__ == "__main__":
    main()
