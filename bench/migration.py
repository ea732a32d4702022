"""Migration benchmark: kvmha's live migration next to a bare `virsh migrate` in the same run, the guest-visible
pause at switchover, and the time to empty a host of N VMs by `kvmha host maintenance H on`.

One lab of 3 hosts (prefix kvmhmb, subnet 10.251.0.128/26 as the e2e tests': the lab lock keeps them apart; state
in /run/kvmha-migbench) with `kvmha-manager` in front, product defaults for every timing.

1. Migration runs on the same lab, the VMs going back and forth between h1 and h2: "kvmha" — AdminService.MigrateVm
   of a 32 MiB VM, timed from the call until the manager records vm.migrated (its record on the target); "virsh" —
   the same kind of VM (not registered: the manager sees it Unmanaged) migrated by a bare `virsh migrate --live
   --p2p --persistent --undefinesource --unsafe --tls` on its source (libvirt's TLS with the lab's host
   certificates, as the agents migrate), timed around the command.
2. Guest-visible pause of each: `virsh domjobinfo --completed` "Total downtime" (QEMU's own measure of the time the
   guest's vCPUs were stopped at switchover), read on the target.
3. Emptying: N VMs placed on h3 (the others disabled meanwhile), then `host maintenance h3 on`, timed until the
   manager has h3 in Maintenance; then maintenance off.

Usage: bench/migration.py [--runs 5] [--empty 4]
Prints per-run figures and medians; writes bench/results/migration.json and migration.png. Root only; tears
everything down, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from kvmha.lab.harness import DuplicateWatch, LabCluster
from kvmha.lab.host import migration_uri
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "kvmhmb"
SUBNET = "10.251.0.128/26"
STATE_DIR = Path("/run/kvmha-migbench")
RESULTS = ROOT / "bench" / "results"
MEMORY_MIB = 32
TIMEOUT_S = 120.0
_DOWNTIME = re.compile(r"Total downtime:\s+([0-9.]+)\s*ms")


def _vm_host(cluster: LabCluster, name: str) -> str:
    return cluster.vms()[name].host


def _events_after(cluster: LabCluster, after_id: int, kind: str, subject: str) -> list[apb.EventInfo]:
    return [e for e in cluster.events(after_id) if e.kind == kind and e.subject == subject]


def kvmha_migration(cluster: LabCluster, name: str, target: str) -> dict[str, float]:
    source = _vm_host(cluster, name)
    subject = f"vm:{cluster.vms()[name].id}"
    events = cluster.events()
    after = events[-1].id if events else 0
    began = time.monotonic()
    cluster.admin().MigrateVm(apb.MigrateVmRequest(vm=name, to_host=target), timeout=10)
    wait_for(lambda: bool(_events_after(cluster, after, "vm.migrated", subject))
             or bool(_events_after(cluster, after, "vm.migration.failed", subject)), TIMEOUT_S, "the migration")
    took_s = time.monotonic() - began
    if not _events_after(cluster, after, "vm.migrated", subject):
        raise RuntimeError(f"kvmha migration of {name} failed: {cluster.events(after)[-3:]}")
    return {"took_s": took_s, "downtime_ms": downtime_ms(cluster, name, target, source)}


def virsh_migration(cluster: LabCluster, name: str, source: str, target: str) -> dict[str, float]:
    address = next(h.address for h in cluster.lab.hosts if h.name == target)
    uri = migration_uri(next(h for h in cluster.lab.hosts if h.name == source), address)
    began = time.monotonic()
    # The same transport as the agents': libvirt's TLS between the libvirtds, QEMU's TLS for the stream.
    cluster.lab.exec(source, ["virsh", "-q", "-c", "qemu:///system", "migrate", "--live", "--p2p", "--persistent",
                              "--undefinesource", "--unsafe", "--tls", name, uri])
    took_s = time.monotonic() - began
    return {"took_s": took_s, "downtime_ms": downtime_ms(cluster, name, target, source)}


def downtime_ms(cluster: LabCluster, name: str, *hosts: str) -> float:
    """QEMU's measure of the guest's pause at switchover (`virsh domjobinfo --completed`: Total downtime), from the
    target (the source undefined the domain) or else the source."""
    for host in hosts:
        match = _DOWNTIME.search(cluster.lab.virsh(host, "domjobinfo", name, "--completed", check=False))
        if match:
            return float(match.group(1))
    return float("nan")


def place_on(cluster: LabCluster, host: str, names: list[str]) -> None:
    others = [h.name for h in cluster.lab.hosts if h.name != host]
    for other in others:
        cluster.admin().SetHostEnabled(apb.SetHostEnabledRequest(host=other, enabled=False), timeout=10)
    try:
        for name in names:
            cluster.create_vm(name, ha=True, memory_mib=MEMORY_MIB)
        cluster.wait_running(names, 90)
    finally:
        for other in others:
            cluster.admin().SetHostEnabled(apb.SetHostEnabledRequest(host=other, enabled=True), timeout=10)


def empty_host(cluster: LabCluster, host: str, count: int) -> float:
    names = [f"e{n}" for n in range(1, count + 1)]
    place_on(cluster, host, names)
    began = time.monotonic()
    cluster.admin().SetMaintenance(apb.SetMaintenanceRequest(host=host, on=True), timeout=10)
    wait_for(lambda: cluster.hosts()[host].resource_state in ("Maintenance", "ErrorInMaintenance"), 300,
             f"{host} emptied")
    took_s = time.monotonic() - began
    state = cluster.hosts()[host].resource_state
    cluster.admin().SetMaintenance(apb.SetMaintenanceRequest(host=host, on=False), timeout=10)
    if state != "Maintenance":
        raise RuntimeError(f"{host} ended in {state}")
    return took_s


def run(runs: int, empty: int) -> dict[str, Any]:
    cluster = LabCluster.start(3, state_dir=STATE_DIR, prefix=PREFIX, subnet=SUBNET, dashboard_port=None)
    try:
        place_on(cluster, "h1", ["mk"])
        cluster.lab.vm_create("mv", "h1", memory_mib=MEMORY_MIB)
        kvmha_runs: list[dict[str, float]] = []
        virsh_runs: list[dict[str, float]] = []
        with DuplicateWatch(cluster.lab) as watch:
            for index in range(runs):
                there, back = ("h2", "h1") if index % 2 == 0 else ("h1", "h2")
                kvmha_runs.append(kvmha_migration(cluster, "mk", there))
                virsh_runs.append(virsh_migration(cluster, "mv", back, there))
                print(f"run {index + 1}: kvmha {kvmha_runs[-1]['took_s']:.2f} s "
                      f"(pause {kvmha_runs[-1]['downtime_ms']:.0f} ms), virsh {virsh_runs[-1]['took_s']:.2f} s "
                      f"(pause {virsh_runs[-1]['downtime_ms']:.0f} ms)", flush=True)
            empty_s = empty_host(cluster, "h3", empty) if empty else float("nan")
        print(f"emptied a host of {empty} VMs in {empty_s:.1f} s; duplicates {len(watch.duplicates)}, "
              f"overlaps seen {watch.overlaps}", flush=True)
        return {"kvmha": kvmha_runs, "virsh": virsh_runs, "empty_vms": empty, "empty_s": empty_s,
                "duplicates": len(watch.duplicates), "overlaps": watch.overlaps}
    finally:
        cluster.stop()


def _median(values: list[float]) -> float:
    clean = [v for v in values if v == v]
    return statistics.median(clean) if clean else float("nan")


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    kvmha = [r["took_s"] for r in document["kvmha"]]
    virsh = [r["took_s"] for r in document["virsh"]]
    left.plot(range(1, len(kvmha) + 1), kvmha, "o-", label="kvmha vm migrate (to vm.migrated)")
    left.plot(range(1, len(virsh) + 1), virsh, "s-", label="bare virsh migrate")
    left.set_xlabel("run")
    left.set_ylabel("seconds")
    left.set_title("live migration of a 32 MiB lab VM")
    left.legend()
    pauses = [r["downtime_ms"] for r in document["kvmha"]]
    right.bar(range(1, len(pauses) + 1), pauses)
    right.set_xlabel("run")
    right.set_ylabel("ms")
    right.set_title(f"guest pause at switchover (empty {document['empty_vms']} VMs: {document['empty_s']:.1f} s)")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="migrations of each kind (default 5)")
    parser.add_argument("--empty", type=int, default=4, help="VMs on the host emptied by maintenance (default 4)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/migration.py needs root (it builds a lab); skipped")
        return 0

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_term)
    began = time.monotonic()
    document: dict[str, Any] = {"bench": "migration", "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "machine": {"cpus": os.cpu_count(), "kernel": platform.release()}}
    document.update(run(args.runs, args.empty))
    document["median"] = {
        "kvmha_s": _median([r["took_s"] for r in document["kvmha"]]),
        "virsh_s": _median([r["took_s"] for r in document["virsh"]]),
        "pause_ms": _median([r["downtime_ms"] for r in document["kvmha"]]),
    }
    document["took_s"] = round(time.monotonic() - began, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "migration.json").write_text(json.dumps(document, indent=2))
    plot(document, RESULTS / "migration.png")
    median = document["median"]
    print(f"median: kvmha {median['kvmha_s']:.2f} s, virsh {median['virsh_s']:.2f} s, pause "
          f"{median['pause_ms']:.0f} ms; wrote {RESULTS / 'migration.json'} and migration.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
