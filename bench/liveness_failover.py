"""Liveness benchmark (issue 12): compound host failures on a real 4-host lab, time from host death to running again.

One lab of 4 hosts (prefix kvmhab, subnet 10.251.0.64/26, state in /run/kvmha-bench-liveness; run under the lab lock,
never beside bench/failover.py) with `kvmha-manager` on the product's defaults for everything — flap detection
included, so the repeated runs make the hosts flap and placement has to use them anyway — and 4 HA VMs (32 MiB).
Two kinds of run, alternating:

- cascade: the busiest host is powered off through its BMC; the moment the manager records one of its VMs Starting on
  another host, that target is powered off too. Measured from the target's death (the second, later death) until
  every VM of both hosts runs on a host left, as that host's virsh says.
- double: the busiest host is powered off and the next busiest loses its cable (network and the storage path behind
  it) at the same instant; the second is fenced through its BMC. Measured from that instant until every VM of both
  runs elsewhere.

The duplicate sampler (kvmha.lab.harness.DuplicateWatch) runs through every run. Then both hosts are healed and
powered on and the run ends when the manager has every host Up. The target: running again within ping.timeout + 10 s
of the death. Prints per-run figures and medians; writes bench/results/liveness_failover.json and .png. Root only;
tears the lab down, also on failure.

Usage: bench/liveness_failover.py [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmha.lab.demo import busiest
from kvmha.lab.harness import DuplicateWatch, LabCluster
from kvmha.lab.lab import Lab
from kvmha.lab.state import STATE_FILE
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PREFIX = "kvmhab"
SUBNET = "10.251.0.64/26"
STATE_DIR = Path("/run/kvmha-bench-liveness")
VMS = ("l1", "l2", "l3", "l4")
MEMORY_MIB = 32
BOUND_S = 120.0  # a run that takes longer failed
POLL_S = 0.1


@dataclass
class Run:
    index: int
    kind: str  # cascade | double
    first: str
    second: str = ""
    moved: list[str] = field(default_factory=list)
    second_after_s: float | None = None  # cascade: first death -> the target's death
    running_s: float | None = None  # the (last) death -> every moved VM running elsewhere (virsh)
    placed: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0


def placement(cluster: LabCluster, names: list[str], dead: set[str]) -> dict[str, str] | None:
    """VM -> host when each VM runs as one QEMU outside `dead` and that host's libvirtd says running."""
    where = cluster.where()
    placed: dict[str, str] = {}
    for name in names:
        hosts = where.get(name, [])
        if len(hosts) != 1 or hosts[0] in dead:
            return None
        placed[name] = hosts[0]
    for name, host in placed.items():
        if cluster.lab.domstate(host, name)[0] != "running":
            return None
    return placed


def cascade(cluster: LabCluster, index: int) -> Run:
    where = cluster.where()
    first = busiest(where)
    run = Run(index, "cascade", first, moved=sorted(vm for vm, hosts in where.items() if first in hosts))
    with DuplicateWatch(cluster.lab) as watch:
        t0 = time.time()
        cluster.lab.power(first, "off", wait=False)

        def target() -> str | None:
            vms = cluster.vms()
            chosen = [v.host for n in run.moved if (v := vms.get(n)) and v.state == "Starting" and v.host != first]
            return chosen[0] if chosen else None

        run.second = wait_for(target, BOUND_S, f"a restart target for {first}'s VMs", interval_s=0.05)
        run.moved = sorted(set(run.moved) | {vm for vm, hosts in cluster.where().items() if run.second in hosts})
        t1 = time.time()
        cluster.lab.power(run.second, "off", wait=False)
        run.second_after_s = t1 - t0
        dead = {first, run.second}
        run.placed = wait_for(lambda: placement(cluster, run.moved, dead), BOUND_S, "all moved VMs running", POLL_S)
        run.running_s = time.time() - t1
    run.duplicates = len(watch.duplicates)
    return run


def double(cluster: LabCluster, index: int) -> Run:
    where = cluster.where()
    first = busiest(where)
    second = busiest({vm: [h for h in hosts if h != first] for vm, hosts in where.items()})
    if second == first or not any(second in hosts for hosts in where.values()):
        second = next(h.name for h in cluster.lab.hosts if h.name != first)
    run = Run(index, "double", first, second)
    run.moved = sorted(vm for vm, hosts in where.items() if first in hosts or second in hosts)
    with DuplicateWatch(cluster.lab) as watch:
        t0 = time.time()
        cluster.lab.power(first, "off", wait=False)
        cluster.lab.fail(second, "network")
        cluster.lab.fail(second, "storage")
        dead = {first, second}
        run.placed = wait_for(lambda: placement(cluster, run.moved, dead), BOUND_S, "all moved VMs running", POLL_S)
        run.running_s = time.time() - t0
    run.duplicates = len(watch.duplicates)
    return run


def heal(cluster: LabCluster, run: Run) -> None:
    for host in (run.first, run.second):
        if host and cluster.lab.faults(host):
            cluster.lab.heal(host)
        if host and cluster.lab.power_state(host) == "off":
            cluster.lab.power(host, "on")
    cluster.wait_hosts_up(timeout_s=120)


def summarize(runs: list[Run], ping_timeout_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"target_s": ping_timeout_s + 10.0, "runs": [asdict(r) for r in runs]}
    for kind in ("cascade", "double"):
        times = [r.running_s for r in runs if r.kind == kind and r.running_s is not None]
        if times:
            out[kind] = {"median_s": statistics.median(times), "max_s": max(times), "n": len(times)}
            print(f"{kind}: death -> every VM running elsewhere: median {statistics.median(times):.1f} s, "
                  f"max {max(times):.1f} s (n={len(times)}; target {ping_timeout_s + 10.0:.0f} s)")
    print(f"duplicates: {sum(r.duplicates for r in runs)}")
    return out


def plot(runs: list[Run], target_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for offset, kind in enumerate(("cascade", "double")):
        times = [r.running_s for r in runs if r.kind == kind and r.running_s is not None]
        ax.scatter(times, [offset] * len(times), label=kind, s=40)
    ax.axvline(target_s, color="grey", linestyle="--", label=f"target ping.timeout + 10 s = {target_s:.0f} s")
    ax.set_yticks([0, 1], ["cascade\n(from the target's death)", "power loss + cable cut\n(same instant)"])
    ax.set_xlabel("s from host death to every HA VM running elsewhere (virsh)")
    ax.set_xlim(left=0)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind")
    args = parser.parse_args(argv)
    if (STATE_DIR / STATE_FILE).exists():
        Lab.attach(STATE_DIR).down()
    began = time.monotonic()
    cluster = LabCluster.start(4, state_dir=STATE_DIR, prefix=PREFIX, subnet=SUBNET)
    runs: list[Run] = []
    try:
        config = {c.name: c.value for c in cluster.admin().ListConfig(apb.ListConfigRequest(), timeout=5).items}
        ping_timeout_s = float(config["ping.timeout"])
        print(f"lab of 4 up in {time.monotonic() - began:.1f} s; product defaults (ping.timeout {ping_timeout_s:g} s,"
              f" flap.max.failures {config['flap.max.failures']})")
        for vm in VMS:
            cluster.create_vm(vm, ha=True, memory_mib=MEMORY_MIB)
        cluster.wait_running(list(VMS), 120)
        time.sleep(float(config["startup.grace"]))  # no fencing during the manager's startup grace
        for i in range(1, args.runs + 1):
            for kind in ("cascade", "double"):
                run = cascade(cluster, i) if kind == "cascade" else double(cluster, i)
                runs.append(run)
                second = f" +{run.second_after_s:.1f} s {run.second}" if run.second_after_s is not None else ""
                print(f"  {i} {kind:<7} {run.first}{second or ' & ' + run.second}: {len(run.moved)} VMs running "
                      f"again {run.running_s:.1f} s after the death, on {run.placed}"
                      + (f"  DUPLICATES {run.duplicates}" if run.duplicates else ""), flush=True)
                heal(cluster, run)
        result = summarize(runs, ping_timeout_s)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "liveness_failover.json").write_text(json.dumps(result, indent=1))
        plot(runs, ping_timeout_s + 10.0, RESULTS / "liveness_failover.png")
        print(f"wrote {RESULTS / 'liveness_failover.json'} and .png")
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
