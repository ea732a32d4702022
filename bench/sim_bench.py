"""Benchmark: the real decision core driven by the simulator over a big cluster with random faults.

    .venv/bin/python bench/sim_bench.py [--hosts 5000] [--vms-per-host 20] [--duration 3600] [--seed 1]
    .venv/bin/python bench/sim_bench.py --liveness [--hosts 1000] [--vms-per-host 10] [--seeds 1 2 3]

Prints simulated seconds per wall second, core decisions (facts + timers handled) per wall second, and the
distribution of host-failure-to-VM-running and detection-to-VM-running times in simulated seconds.

--liveness runs today's storm and the compound-fault storm (the same plus sim/sequences.py's cascades, flapping hosts
then a failure, partition then power loss, manager restart mid-recovery, capacity freeing later) on the same clusters
and prints, side by side, safety and liveness violations and the time from losing its run to running again per cause
(sim/liveness.py); writes bench/results/sim_liveness.json and .png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from kvmha.manager.core import scheduler, targeting
from kvmha.manager.core.model import HostRecord, VmRecord
from kvmha.manager.sim.liveness import CAUSES
from kvmha.manager.sim.storm import DENSE_END_S, Storm, dense_storm, storm_simulator

RESULTS = Path(__file__).resolve().parent / "results"
BIG_VMS = 10


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def describe(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: no samples"
    figures = ", ".join(f"{label} {percentile(values, share):6.1f}" for label, share in
                        (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)))
    return f"{name} (n={len(values)}): {figures}, max {max(values):6.1f} s"


def liveness_storm(hosts: int, vms_per_host: int, seed: int, compound: int) -> dict[str, Any]:
    """One 15-minute storm (10 minutes of faults): violations and recovery times per cause."""
    big = BIG_VMS if compound else 0
    sim, rng = storm_simulator(hosts, vms_per_host, seed, big_vms=big)
    big_hosts = [f"h{n}" for n in range(hosts - big + 1, hosts + 1)]
    storm = Storm(sim, rng, rate_per_s=0.2, until_s=600.0, compound=compound, big_hosts=big_hosts)
    storm.start()
    began = time.perf_counter()
    try:
        sim.run_until(900.0)
    finally:
        sim.close()
    liveness = [v for v in sim.checker.violations if "liveness:" in v]
    return {
        "seed": seed,
        "wall_s": round(time.perf_counter() - began, 1),
        "faults": dict(sorted(storm.injected.items())),
        "safety_violations": len(sim.checker.violations) - len(liveness),
        "liveness_violations": len(liveness),
        "still_owed": len(sim.liveness.owed),
        "recovered_s": {cause: sorted(sim.liveness.recovered_s.get(cause, [])) for cause in CAUSES},
    }


def dense_violations(seeds: range, *, old_rules: bool) -> tuple[int, int]:
    """(liveness violations, seeds with any) over dense small-cluster storms; `old_rules`: the core as before
    issue 12 — flapping hosts excluded from placement, every HA restart counted toward the crash-loop limit."""
    saved = scheduler.own_death, targeting.Targeting.place
    if old_rules:
        scheduler.own_death = lambda reason: not reason.startswith(scheduler.OPERATOR_START)

        def excluding(self: targeting.Targeting, vm: VmRecord) -> tuple[HostRecord | None, str]:
            exclude = set(self.ctx.held.at(self.ctx.now))
            old = self.ctx.hosts.get(vm.host_id) if vm.host_id is not None else None
            if old is not None and old.status.value != "Up":
                exclude.add(old.id)
            ctx = self.ctx
            view = targeting.PlacementView(ctx.hosts, ctx.vms, ctx.up.ids, frozenset(exclude), frozenset(), ctx.config)
            target, why, _ = targeting.target_for(vm, view, self.cursor)
            return target, why

        targeting.Targeting.place = excluding  # type: ignore[method-assign]
    total = hit = 0
    try:
        for seed in seeds:
            sim, _storm = dense_storm(seed)
            sim.run_until(DENSE_END_S)
            sim.close()
            found = sum("liveness:" in v for v in sim.checker.violations)
            total, hit = total + found, hit + (found > 0)
    finally:
        scheduler.own_death, targeting.Targeting.place = saved  # type: ignore[method-assign]
    return total, hit


def liveness_report(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, Any]]] = {"today's storm": [], "compound storm": []}
    for seed in args.seeds:
        for name, compound in (("today's storm", 0), ("compound storm", 3)):
            run = liveness_storm(args.hosts, args.vms_per_host, seed, compound)
            runs[name].append(run)
            print(f"{name}, seed {seed}: {sum(run['faults'].values())} faults, {run['wall_s']} s wall, "
                  f"safety violations {run['safety_violations']}, liveness violations {run['liveness_violations']}, "
                  f"still owed {run['still_owed']}", flush=True)
    print(f"\n{args.hosts} hosts x {args.vms_per_host} VMs, 600 s of faults + 300 s quiet, seeds {args.seeds}")
    print("time from losing its run to running again (simulated s):")
    for name, series in runs.items():
        print(f"  {name}: safety violations {sum(r['safety_violations'] for r in series)}, "
              f"liveness violations {sum(r['liveness_violations'] for r in series)}")
        for cause in CAUSES:
            values = [x for r in series for x in r["recovered_s"][cause]]
            print(f"    {describe(cause, values)}")
    dense_seeds = range(1, 25)
    dense = {rules: dense_violations(dense_seeds, old_rules=rules == "before issue 12")
             for rules in ("issue 12", "before issue 12")}
    print(f"dense compound storms (12 hosts x 4 VMs, 25 min, seeds 1-{dense_seeds[-1]}): liveness violations "
          + "; ".join(f"{rules} rules: {n} in {hit} of {len(dense_seeds)} storms" for rules, (n, hit) in dense.items()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sim_liveness.json").write_text(json.dumps({"hosts": args.hosts, "vms_per_host": args.vms_per_host,
                                                           "runs": runs, "dense": dense}, indent=1))
    plot_liveness(runs, RESULTS / "sim_liveness.png")
    print(f"wrote {RESULTS / 'sim_liveness.json'} and {RESULTS / 'sim_liveness.png'}")


def plot_liveness(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CAUSES), figsize=(14, 3.6), sharey=True)
    for ax, cause in zip(axes, CAUSES, strict=True):
        for name, series in runs.items():
            values = sorted(x for r in series for x in r["recovered_s"][cause])
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                        label=f"{name} (n={len(values)})")
        ax.set_title(cause)
        ax.set_xlabel("s to running again")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of VMs")
    fig.suptitle("HA VMs: time from losing their run to running again, by cause (simulator, liveness checker)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5000)
    parser.add_argument("--vms-per-host", type=int, default=20)
    parser.add_argument("--duration", type=float, default=3600.0, help="simulated seconds")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="faults per simulated second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--liveness", action="store_true", help="today's storm vs the compound-fault storm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="with --liveness")
    args = parser.parse_args()
    if args.liveness:
        if args.hosts == 5000 and args.vms_per_host == 20:
            args.hosts, args.vms_per_host = 1000, 10  # the storms' size in tests/sim/test_storms.py
        liveness_report(args)
        return

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
    liveness = sum("liveness:" in violation for violation in sim.checker.violations)
    print(f"liveness violations: {liveness} (bound per cause: docs/decisions.md)")
    print(f"invariant violations: {len(sim.checker.violations)}; VM starts {sim.checker.starts}; "
          f"no-capacity events {metrics.no_capacity_events}; HA VMs of failed hosts never restarted: "
          f"{len(metrics.failed_at)}")


if __name__ == "__main__":
    main()
