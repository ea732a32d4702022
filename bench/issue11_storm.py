"""Benchmark: issue 11's compound faults in the simulator, on the current rule and on the rule before it.

    .venv/bin/python bench/issue11_storm.py [--hosts 1000] [--vms-per-host 5] [--seeds 11 12] [--nfs-seeds 13]

Each run is a storm of only issue 11's faults (the agent dies / freezes / libvirtd hangs while its host is cut off
with its BMC dead, the watchdog daemon killed, a watchdog that reports armed but never fires) plus the plain failures
they must not be confused with, over clusters where one host in ten runs without a watchdog (tests/sim/test_issue11.py
asserts the same storms). Printed per run: faults injected, safety and liveness violations, HA VMs running again per
cause (simulated seconds from losing their run: p50 / p99 / max), and the VMs still waiting at the end because their
host can be neither fenced nor proven dead by silence (they wait for `kvmha host confirm-down`). The same storm on the
rule before issue 11 (silence proves death after isolation.after + margin, whatever guarantees it; no lease probe)
shows the second copies it makes. Writes bench/results/issue11_storm.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from kvmha.manager.core import hostflow, leaseprobe
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.investigation import Investigation, LeaseEvidence, SelfFence
from kvmha.manager.core.model import HostRecord, VmUuid
from kvmha.manager.sim.storm import FAULTS, ISSUE_11_FAULTS, Storm, storm_simulator, waits_for_the_operator

RESULTS = Path(__file__).resolve().parent / "results"
FAULTS_UNTIL_S, END_S = 400.0, 700.0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def _old_self_fence(self: hostflow.HostFlow, host: HostRecord) -> tuple[SelfFence, float]:
    config = self.ctx.config
    return SelfFence.BACKED, config.isolation_after_s + config.isolation_margin_s


def _no_lease_probe(ctx: Ctx, host: HostRecord, inv: Investigation) -> None:
    inv.leases = LeaseEvidence(note="not probed (the rule before issue 11)")


def run(hosts: int, vms_per_host: int, seed: int, lease_mode: str, old_rule: bool) -> dict[str, Any]:
    saved = (hostflow.HostFlow.self_fence, leaseprobe.start)
    if old_rule:
        hostflow.HostFlow.self_fence = _old_self_fence  # type: ignore[method-assign]
        leaseprobe.start = _no_lease_probe
    try:
        started = time.perf_counter()
        sim, rng = storm_simulator(hosts, vms_per_host, seed)
        sim.world.lease_mode = lease_mode
        storm = Storm(sim, rng, rate_per_s=0.25, until_s=FAULTS_UNTIL_S, database_outages=0, database_stalls=0)
        faults = [name for name in ISSUE_11_FAULTS if lease_mode == "posix" or name != "watchdog-broken-agent-dies"]
        storm.weights = {name: FAULTS[name][0] for name in faults}
        storm.start()
        try:
            sim.run_until(END_S)
        finally:
            sim.close()
        wall_s = time.perf_counter() - started
    finally:
        hostflow.HostFlow.self_fence, leaseprobe.start = saved  # type: ignore[method-assign]
    waiting = [
        uuid
        for uuid, vm in sim.world.vms.items()
        if vm.ha
        and (record := sim.core.vm(vm.id)) is not None
        and record.host_id is not None
        and waits_for_the_operator(sim, record.host_id)
        and not sim.world.where(VmUuid(uuid))
    ]
    duplicates = [v for v in sim.checker.violations if "while running on" in v]
    return {
        "seed": seed,
        "lease_mode": lease_mode,
        "rule": "before issue 11" if old_rule else "current",
        "injected": dict(sorted(storm.injected.items())),
        "violations": len(sim.checker.violations),
        "duplicates": len(duplicates),
        "liveness_violations": sum("liveness:" in v for v in sim.checker.violations),
        "recovered_s": {cause: sorted(times) for cause, times in sim.liveness.recovered_s.items()},
        "waiting_for_operator": len(waiting),
        "hosts_without_watchdog": sum(not h.watchdog for h in sim.world.hosts.values()),
        "wall_s": round(wall_s, 1),
    }


def show(result: dict[str, Any]) -> None:
    compound = {k: v for k, v in result["injected"].items() if k in ISSUE_11_FAULTS[:5]}
    print(f"seed {result['seed']} ({result['lease_mode']} leases, {result['rule']} rule): "
          f"{sum(compound.values())} compound faults {compound}; "
          f"violations {result['violations']} (second copies {result['duplicates']}, "
          f"liveness {result['liveness_violations']}); {result['waiting_for_operator']} HA VMs wait for the operator "
          f"({result['hosts_without_watchdog']} hosts without watchdog); {result['wall_s']} s wall")
    for cause, times in result["recovered_s"].items():
        print(f"    running again after {cause}: n={len(times)} p50 {percentile(times, 0.5):.1f} s, "
              f"p99 {percentile(times, 0.99):.1f} s, max {max(times):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--vms-per-host", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="*", default=[11, 12])
    parser.add_argument("--nfs-seeds", type=int, nargs="*", default=[13])
    args = parser.parse_args()
    results = []
    runs = [(seed, "posix", False) for seed in args.seeds] + [(seed, "nfs", False) for seed in args.nfs_seeds]
    runs += [(seed, "posix", True) for seed in args.seeds[:1]]
    for seed, mode, old in runs:
        result = run(args.hosts, args.vms_per_host, seed, mode, old)
        show(result)
        results.append(result)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "issue11_storm.json"
    out.write_text(json.dumps({"hosts": args.hosts, "vms_per_host": args.vms_per_host, "runs": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
