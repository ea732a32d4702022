"""Takeover benchmark: the manager holding the lease is SIGKILLed; how long until a standby acts for every host.

Real processes on 127.0.0.1 (no lab, no root): two kvmha-manager processes on one PostgreSQL database (the
machine's server, a fresh database per run of the bench, dropped at the end), four hosts — kvmha-agent processes
with libvirt's test driver in-process, each powered by an IPMI BMC simulator — and one HA VM per host. The product's
timings everywhere (lease 6 s with a 2 s margin, standbys poll every 1 s; ping 2 s, ping.timeout 7 s; the agents'
reconnect back-off up to 8 s), none lifted.

Two series, alternating, the killed manager restarted as the new standby after each run:
- "kill": the holder is SIGKILLed. Measured from the kill: `lease` (the standby holds the lease, as ListManagers on
  it says), `hosts` (every host Up, connected and owned by the new holder: pinging it again; in "kill+host" every
  surviving host).
- "kill+host": the holder and one host (its agent and VM; its BMC then reads off) are SIGKILLed at the same instant.
  Also `vm` (that host's HA VM runs on another host, as the new holder reports from the agents).

Usage: bench/takeover.py [--runs 5]. Prints per-run figures and medians; writes bench/results/takeover.json and the
timeline plot bench/results/takeover.png. Ends every process it started, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kvmha.lab.domain import domain_xml
from kvmha.lab.harness import ManagerHarness
from kvmha.lab.testing.databases import DatabaseUnavailable, fresh_database
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
HOSTS = ("h1", "h2", "h3", "h4")
POLL_S = 0.1
BOUND_S = 120.0


def _holder(manager: ManagerHarness) -> str:
    try:
        reply = manager.admin().ListManagers(apb.ListManagersRequest(), timeout=2)
    except Exception:  # a manager that was just killed or is starting
        return ""
    return str(reply.lease_holder)


def _all_owned(manager: ManagerHarness, except_host: str = "") -> bool:
    hosts = {name: h for name, h in manager.hosts().items() if name != except_host}
    return len(hosts) == len(HOSTS) - bool(except_host) and all(
        h.status == "Up" and h.connected and h.manager_id == manager.manager_id for h in hosts.values())


def _moved(manager: ManagerHarness, vm: str, dead: str) -> bool:
    info = manager.vms().get(vm)
    return info is not None and info.state == "Running" and info.power_state == "PowerOn" and info.host != dead


def _until(predicate: Any, began: float) -> float:
    wait_for(predicate, BOUND_S, "the takeover", interval_s=POLL_S)
    return time.monotonic() - began


def one_run(cluster: LocalCluster, managers: list[ManagerHarness], with_host: bool) -> dict[str, Any]:
    holder = next(m for m in managers if _holder(m) == m.manager_id)
    standby = next(m for m in managers if m is not holder)
    vms = standby.vms()
    victim = next((h for h in HOSTS if any(v.host == h and v.state == "Running" for v in vms.values())), HOSTS[0])
    vm = next(name for name, v in vms.items() if v.host == victim)
    began = time.monotonic()
    holder.kill_manager()
    if with_host:
        cluster.kill_host(victim)
    lease_s = _until(lambda: _holder(standby) == standby.manager_id, began)
    result: dict[str, Any] = {"mode": "kill+host" if with_host else "kill", "from": holder.manager_id,
                              "to": standby.manager_id, "lease_s": round(lease_s, 2)}
    dead = victim if with_host else ""
    result["hosts_s"] = round(_until(lambda: _all_owned(standby, dead), began), 2)
    if with_host:
        result["vm_s"] = round(_until(lambda: _moved(standby, vm, victim), began), 2)
        result["host"], result["vm"] = victim, vm
        cluster.bmcs[victim].chassis_power("on")  # its agent comes back (not measured)
        wait_for(lambda: _all_owned(standby), BOUND_S, f"{victim} back Up")
    holder.close_admin()
    holder.start_manager()  # back as the standby of the next run
    return result


def run(runs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvmha-takeover-") as folder, \
            fresh_database("postgresql", Path(folder)) as url:
        cluster = LocalCluster(Path(folder), url)
        try:
            m2 = cluster.add_manager("m2")
            cluster.start_manager()
            for name in HOSTS:
                cluster.start_powered_agent(name)
            wait_for(lambda: _all_owned(cluster), 60, "every host Up")
            cluster.register_bmcs()
            for index in range(len(HOSTS)):
                cluster.admin().CreateVm(apb.CreateVmRequest(domain_xml=domain_xml(f"t{index}", domain_type="test"),
                                                             ha_enabled=True, start=True), timeout=10)
            m2.start_manager()
            rows = []
            for index in range(runs * 2):
                row = one_run(cluster, [cluster, m2], with_host=index % 2 == 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
                time.sleep(3.0)  # the restarted manager registers; the hosts settle
        finally:
            cluster.close()
    return {"rows": rows, "medians": _medians(rows), "machine": platform.platform(), "cpus": os.cpu_count(),
            "hosts": len(HOSTS), "lease_s": 6.0, "margin_s": 2.0, "ping_timeout_s": 7.0}


def _medians(rows: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for mode in ("kill", "kill+host"):
        for key in ("lease_s", "hosts_s", "vm_s"):
            values = [r[key] for r in rows if r["mode"] == mode and key in r]
            if values:
                out[f"{mode} {key}"] = round(statistics.median(values), 2)
    return out


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = document["rows"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    for y, row in enumerate(rows):
        ax.barh(y, row["hosts_s"], color="#9ecae1", label="every host owned and Up" if y == 0 else None)
        ax.barh(y, row["lease_s"], color="#3182bd", label="lease taken" if y == 0 else None)
        if "vm_s" in row:
            ax.plot(row["vm_s"], y, "k*", markersize=10, label="failed host's VM running" if y == 1 else None)
    ax.set_yticks(range(len(rows)), [f"{r['mode']} {r['from']}→{r['to']}" for r in rows])
    ax.set_xlabel("seconds after the holder's SIGKILL")
    medians = document["medians"]
    ax.set_title(f"takeover (lease 6 s): median lease {medians.get('kill lease_s', 0):.1f} s, "
                 f"hosts {medians.get('kill hosts_s', 0):.1f} s, VM {medians.get('kill+host vm_s', 0):.1f} s")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each series (default 5)")
    args = parser.parse_args(argv)
    try:
        document = run(args.runs)
    except DatabaseUnavailable as reason:
        print(f"bench/takeover.py needs PostgreSQL: {reason}")
        return 1
    for key, value in document["medians"].items():
        print(f"median {key}: {value:.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "takeover.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(document, RESULTS / "takeover.png")
    print(f"wrote {RESULTS / 'takeover.json'} and {RESULTS / 'takeover.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
