"""kvmha against a peer: Pacemaker on the same lab, the same VMs, the same faults, measured the same way.

Each series is a fresh lab of 3 hosts (prefix kvmhab, subnet 10.251.0.64/26, BMC network 10.251.1.64/26, state in
/run/kvmha-bench) with 4 VMs (32 MiB, raw disk on the shared storage, virtlockd leases), run either by kvmha (the
real manager in front, agents in the hosts) or by Pacemaker + corosync (`--stack pacemaker`: VirtualDomain resources,
fence_ipmilan stonith to the same ipmi_sim BMCs over the lab's BMC network). The series alternate between the two
systems: kvmha defaults, Pacemaker defaults, kvmha tuned, Pacemaker tuned.

Both are measured from outside by the lab's own host truth: a QEMU in a host's PID namespace (/proc) whose libvirtd
says `running` (virsh domstate), sampled every 0.1 s, with the lab's DuplicateWatch (kvmha.lab.harness) looking for
any VM on two hosts at once during every run.
1. Power loss: the busiest host is powered off through its BMC (`ipmitool chassis power off`); measured until every
   VM it ran is running on another host. Then the host is powered on (Pacemaker's default fencing reboots it itself)
   and the system is left to settle (kvmha: the host Up again; Pacemaker: every node online, no pending action).
2. QEMU kill: one VM's QEMU is SIGKILLed; measured until a new QEMU runs it anywhere (both restart it in place).
Each system's own record explains the number: kvmha's events, Pacemaker's pacemaker.log of every host
(detection, fencing, placement, start); docs/peer-comparison.md reads them.

Configurations (the tuning is written down in kvmha.lab.pacemaker.PROFILES and in SERIES below):
- kvmha defaults: the product's defaults; kvmha tuned: ping 1 s, ping.timeout 3 s (bench/failover.py --fast).
  Both lift the per-VM restart cap and the flapping-host count, as bench/failover.py does (repeating one failover
  must not turn into "this host flaps"); Pacemaker has neither by default (migration-threshold INFINITY).
- Pacemaker defaults / tuned: kvmha.lab.pacemaker.PROFILES (corosync token, stonith-action, monitor, power_wait).

Usage: bench/peer_failover.py [--runs 5] [--kills 5] [--series NAME,...] [--append]
           run the series (root; alone on the machine, as every lab bench; about 12 minutes for all four)
       bench/peer_failover.py --report
           print kvmha's and Pacemaker's medians, defaults and tuned, from the saved results
Writes bench/results/peer_failover.json (series are merged by name, so a comparison can be split over several locked
runs with --series; --append adds another round, a fresh lab, to the series' runs) and bench/results/peer_failover.png
(both systems' timelines side by side). Tears every lab down, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from kvmha.lab import pacemaker
from kvmha.lab.demo import busiest
from kvmha.lab.harness import DuplicateWatch, LabCluster
from kvmha.lab.lab import Lab
from kvmha.lab.peerlog import kvmha_phases, pacemaker_phases
from kvmha.lab.state import STATE_FILE
from kvmha.lab.wait import wait_for

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PREFIX = "kvmhab"
SUBNET = "10.251.0.64/26"
STATE_DIR = Path("/run/kvmha-bench")
HOSTS = 3
VMS = ("b1", "b2", "b3", "b4")
MEMORY_MIB = 32
BOUND_S = 180.0
POLL_S = 0.1
NO_CAPS = {"restart.max.per.window": "1000", "flap.max.failures": "1000"}
KVMHA_TUNED = {"ping.interval": "1", "ping.timeout": "3", "heartbeat.stale.after": "1.5"}
SERIES = ("kvmha-defaults", "pacemaker-defaults", "kvmha-tuned", "pacemaker-tuned")  # the order they run in


@dataclass
class Run:
    kind: str  # "power" | "kill"
    index: int
    victim: str  # power: the host powered off; kill: the VM's host
    vms: list[str]  # the VMs that had to run again
    recovered_s: float | None = None  # every one of them running (elsewhere, for power), as virsh says
    running_s: dict[str, float] = field(default_factory=dict)
    new_host: dict[str, str] = field(default_factory=dict)
    host_dead_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)  # detect / fenced / start ... from the system's own record
    story: list[tuple[float, str, str]] = field(default_factory=list)  # seconds, source, line (the system's record)
    duplicates: int = 0
    note: str = ""  # e.g. "victim was the DC"
    round: int = 1  # which fresh lab of the series (--append adds rounds)
    load_1m: float | None = None  # the machine's 1-minute load average at the fault (2 cores, shared with others)


class KvmhaStack:
    def __init__(self, tuned: bool) -> None:
        self.overrides = KVMHA_TUNED if tuned else {}
        self.cluster = LabCluster.start(HOSTS, state_dir=STATE_DIR, prefix=PREFIX, subnet=SUBNET,
                                        core_config={**NO_CAPS, **self.overrides})
        self.lab = self.cluster.lab
        for vm in VMS:
            self.cluster.create_vm(vm, ha=True, memory_mib=MEMORY_MIB)
        self.cluster.wait_running(list(VMS), 120)
        grace = float(self.config().get("startup.grace", "20"))
        print(f"  waiting {grace:.0f} s: kvmha fences nobody in its first {grace:.0f} s (startup.grace)")
        time.sleep(grace + 1)
        self._after_id = 0

    def config(self) -> dict[str, str]:
        from kvmha.proto.v1 import admin_pb2 as apb

        return {c.name: c.value for c in self.cluster.admin().ListConfig(apb.ListConfigRequest(), timeout=5).items}

    def mark(self) -> None:
        self._after_id = max((e.id for e in self.cluster.events()), default=0)

    def settle(self, victim: str | None) -> None:
        if victim is not None:
            self.lab.power(victim, "on")
            self.cluster.wait_hosts_up([victim], 120)
        self.cluster.wait_running(list(VMS), 120)
        time.sleep(1.0)

    def phases(self, run: Run, t0: float) -> None:
        run.phases, run.story = kvmha_phases(self.cluster, run.kind, run.victim, run.vms, t0, self._after_id)

    def describe(self) -> str:
        config = self.config()
        keys = ("ping.interval", "ping.timeout", "investigation.timeout", "heartbeat.stale.after", "fence.timeout")
        return ", ".join(f"{k} {config.get(k)}" for k in keys) + (" (product defaults)" if not self.overrides else
                                                                  f" (changed: {', '.join(self.overrides)})")

    def stop(self) -> None:
        self.cluster.stop()


class PacemakerStack:
    def __init__(self, profile: str) -> None:
        self.lab = Lab.up(HOSTS, state_dir=STATE_DIR, prefix=PREFIX, subnet=SUBNET, stack=pacemaker.STACK,
                          stack_profile=profile)
        try:
            for vm in VMS:
                pacemaker.add_vm(self.lab, vm, MEMORY_MIB)
            pacemaker.wait_settled(self.lab)
            wait_for(lambda: all(len(self.lab.vm_hosts(vm)) == 1 for vm in VMS), 60, "every VM running")
        except BaseException:
            self.lab.down()
            raise

    def mark(self) -> None:
        pass

    def settle(self, victim: str | None) -> None:
        if victim is not None:
            if self.lab.init(victim) is None:  # "off" fencing (tuned) leaves it off; "reboot" powered it on
                self.lab.power(victim, "on")
            else:
                self.lab.wait_ready(victim)
            pacemaker.wait_formed(self.lab)
        pacemaker.wait_settled(self.lab)
        wait_for(lambda: all(len(self.lab.vm_hosts(vm)) == 1 for vm in VMS), 120, "every VM running once")
        time.sleep(1.0)

    def phases(self, run: Run, t0: float) -> None:
        run.phases, run.story = pacemaker_phases(self.lab, run.kind, run.victim, run.vms, t0)

    def describe(self) -> str:
        return pacemaker.describe(self.lab.spec)

    def stop(self) -> None:
        self.lab.down()


def recovered(lab: Lab, run: Run, t0: float, old: dict[str, int], elsewhere: bool) -> None:
    """Sample until every VM of the run runs (on another host than the victim when `elsewhere`), per /proc + virsh."""
    while time.time() - t0 < BOUND_S and len(run.running_s) < len(run.vms):
        began = time.time()
        if run.host_dead_s is None and elsewhere and lab.init(run.victim) is None:
            run.host_dead_s = began - t0
        for host, vms in lab.running_vms().items():
            for vm in run.vms:
                if vm in run.running_s or vm not in vms or (elsewhere and host == run.victim):
                    continue
                if vms[vm] != old.get(vm) and lab.domstate(host, vm)[0] == "running":
                    run.running_s[vm], run.new_host[vm] = time.time() - t0, host
        time.sleep(max(0.0, POLL_S - (time.time() - began)))
    if len(run.running_s) < len(run.vms):
        raise RuntimeError(f"{run.kind} run {run.index}: {sorted(set(run.vms) - set(run.running_s))} not running "
                           f"again within {BOUND_S:.0f} s")
    run.recovered_s = max(run.running_s.values())


def power_run(stack: KvmhaStack | PacemakerStack, index: int) -> Run:
    lab = stack.lab
    where: dict[str, list[str]] = {}
    for host, vms in lab.running_vms().items():
        for vm in vms:
            where.setdefault(vm, []).append(host)
    victim = busiest({vm: hosts for vm, hosts in where.items() if vm in VMS}, VMS)
    run = Run("power", index, victim, sorted(vm for vm, hosts in where.items() if victim in hosts))
    if isinstance(stack, PacemakerStack):
        run.note = "victim was the DC" if pacemaker.any_view(lab).dc == victim else ""
    stack.mark()
    with DuplicateWatch(lab) as watch:
        t0 = time.time()
        run.load_1m = os.getloadavg()[0]
        lab.power(victim, "off", wait=False)
        recovered(lab, run, t0, {}, elsewhere=True)
    run.duplicates = len(watch.duplicates)
    time.sleep(3.0)  # the systems' own "started" records come after the VM runs (Pacemaker: after a monitor)
    stack.phases(run, t0)
    stack.settle(victim)
    return run


def kill_run(stack: KvmhaStack | PacemakerStack, index: int) -> Run:
    lab = stack.lab
    vm = VMS[(index - 1) % len(VMS)]
    running = lab.running_vms()
    host = next(h for h, vms in running.items() if vm in vms)
    run = Run("kill", index, host, [vm])
    stack.mark()
    with DuplicateWatch(lab) as watch:
        t0 = time.time()
        run.load_1m = os.getloadavg()[0]
        lab.vm_kill(vm)
        recovered(lab, run, t0, {vm: running[host][vm]}, elsewhere=False)
    run.duplicates = len(watch.duplicates)
    time.sleep(3.0)
    stack.phases(run, t0)
    stack.settle(None)
    return run


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"n": len(values), "median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.fmean(values)}


def fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.2f}"


def summarize(series: dict[str, Any]) -> None:
    """Medians and duplicates over every run of the series (also runs appended from another locked run)."""
    for kind in ("power", "kill"):
        series[kind] = stats([r["recovered_s"] for r in series["runs"]
                              if r["kind"] == kind and r["recovered_s"] is not None])
    series["duplicates"] = sum(r["duplicates"] for r in series["runs"])
    series["load_1m"] = stats([r["load_1m"] for r in series["runs"] if r.get("load_1m")])  # absent: not recorded


def run_series(name: str, runs: int, kills: int) -> dict[str, Any]:
    system, _, profile = name.partition("-")
    if (STATE_DIR / STATE_FILE).exists():
        print(f"a lab from an earlier bench is still in {STATE_DIR}: tearing it down first")
        Lab.attach(STATE_DIR).down()
    began = time.monotonic()
    stack: KvmhaStack | PacemakerStack = KvmhaStack(profile == "tuned") if system == "kvmha" else \
        PacemakerStack(profile)
    try:
        described = stack.describe()
        print(f"\n== {name}: lab up with {len(VMS)} VMs in {time.monotonic() - began:.0f} s "
              f"({stack.lab.spec.domain_type}); {described}")
        results: list[Run] = []
        for i in range(1, runs + 1):
            run = power_run(stack, i)
            results.append(run)
            print(f"  power {i}: {run.victim} off, {','.join(run.vms)} running elsewhere after "
                  f"{fmt(run.recovered_s)} s; " + ", ".join(f"{k} {v:.2f}" for k, v in run.phases.items())
                  + (f"; {run.note}" if run.note else "") + (f"  DUPLICATES {run.duplicates}" if run.duplicates
                                                               else ""))
        for i in range(1, kills + 1):
            run = kill_run(stack, i)
            results.append(run)
            print(f"  kill {i}: {run.vms[0]} on {run.victim}, running again on {run.new_host[run.vms[0]]} after "
                  f"{fmt(run.recovered_s)} s; " + ", ".join(f"{k} {v:.2f}" for k, v in run.phases.items())
                  + (f"  DUPLICATES {run.duplicates}" if run.duplicates else ""))
    finally:
        stack.stop()

    series = {"series": name, "system": system, "profile": profile, "config": described,
              "domain_type": stack.lab.spec.domain_type, "at": [time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())],
              "runs": [asdict(r) for r in results]}
    summarize(series)
    return series


def load() -> dict[str, Any]:
    path = RESULTS / "peer_failover.json"
    return json.loads(path.read_text()) if path.exists() else {"bench": "peer_failover", "series": {}}


def report(document: dict[str, Any]) -> None:
    series = document["series"]
    print("\nmedian recovery (s), same lab, same faults, measured from the hosts (/proc + virsh):")
    print(f"  {'':<42}{'kvmha':>8}{'Pacemaker':>11}{'P / kvmha':>11}   runs (k/P)  duplicates (k/P)")
    for fault, label in (("power", "power loss -> running elsewhere"), ("kill", "QEMU kill -> running again")):
        for profile in ("defaults", "tuned"):
            k, p = series.get(f"kvmha-{profile}"), series.get(f"pacemaker-{profile}")
            km = k[fault].get("median") if k else None
            pm = p[fault].get("median") if p else None
            ratio = f"{pm / km:.1f}x" if km and pm else "-"
            runs = f"{k[fault].get('n', 0) if k else 0}/{p[fault].get('n', 0) if p else 0}"
            dups = f"{k['duplicates'] if k else '-'}/{p['duplicates'] if p else '-'}"
            print(f"  {label + ', ' + profile:<42}{fmt(km):>8}{fmt(pm):>11}{ratio:>11}   {runs:<11} {dups}")
    for name in SERIES:
        if name in series:
            found = series[name]
            rounds = sorted({r.get("round", 1) for r in found["runs"]})
            per_round = "; ".join(
                f"round {n}: " + ", ".join(
                    f"{kind} {statistics.median(v):.2f}" for kind in ("power", "kill")
                    if (v := [r["recovered_s"] for r in found["runs"] if r.get("round", 1) == n
                              and r["kind"] == kind and r["recovered_s"] is not None]))
                for n in rounds)
            load = found.get("load_1m") or {}
            loads = f"; load average {load['min']:.1f}-{load['max']:.1f} at the {load['n']:.0f} faults recording it" \
                if load else ""
            print(f"  {name}: {found['config']}\n      medians per fresh lab: {per_round}{loads}")

COLORS = {"detect": "#f0a030", "fence": "#d04040", "start": "#40a060"}


def segments(run: dict[str, Any]) -> list[tuple[float, float, str]]:
    """(left, width, kind): detect until the system noticed, fence until the host was proven dead or fenced (power
    loss), start until the VMs ran again as the hosts say (measured from outside)."""
    phases, end = run["phases"], run["recovered_s"]
    if end is None:
        return []
    out: list[tuple[float, float, str]] = []
    left = 0.0
    for kind, key in (("detect", "detect"), ("fence", "fenced")):
        at = phases.get(key)
        if at is not None and left <= at <= end:
            out.append((left, at - left, kind))
            left = at
    out.append((left, end - left, "start"))
    return out


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = document["series"]
    rows = {system: [(f"{profile}: {r['kind']} {r['index']}", r) for profile in ("defaults", "tuned")
                     if (found := series.get(f"{system}-{profile}")) for r in found["runs"]]
            for system in ("kvmha", "pacemaker")}
    height = max(len(v) for v in rows.values()) if any(rows.values()) else 1
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.32 * height + 2.6), sharex=True)
    for ax, system in zip(axes, ("kvmha", "pacemaker"), strict=True):
        seen: set[str] = set()
        for y, (_label, run) in enumerate(rows[system]):
            for left, width, kind in segments(run):
                ax.barh(y, width, left=left, height=0.6, color=COLORS[kind], label=None if kind in seen else kind)
                seen.add(kind)
            done = run["phases"].get("done")
            if done is not None:
                ax.plot([done, done], [y - 0.35, y + 0.35], color="black", linewidth=1)
        ax.set_yticks(range(len(rows[system])), [label for label, _r in rows[system]], fontsize=7)
        ax.invert_yaxis()
        medians = [f"{profile} {fault} {found[fault].get('median', 0):.1f} s"
                   for profile in ("defaults", "tuned") if (found := series.get(f"{system}-{profile}"))
                   for fault in ("power", "kill")]
        ax.set_title(("kvmha" if system == "kvmha" else "Pacemaker + corosync") + "\nmedians: " + ", ".join(medians),
                     fontsize=9)
        ax.set_xlabel("s after the fault (BMC power-off / SIGKILL of QEMU) until running again (/proc + virsh)",
                      fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        if seen:
            ax.legend(loc="lower right", fontsize=7)
    fig.suptitle("Same 3-host lab, same 4 VMs, same faults; black tick: the system's own 'started' record",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="power-loss runs per series (default 5)")
    parser.add_argument("--kills", type=int, default=5, help="QEMU-kill runs per series (default 5)")
    parser.add_argument("--series", default=",".join(SERIES), help=f"comma-separated, from {', '.join(SERIES)}")
    parser.add_argument("--report", action="store_true", help="only print the medians from the saved results")
    parser.add_argument("--append", action="store_true",
                        help="add the runs to the saved series of the same name (another round, on a fresh lab)")
    args = parser.parse_args(argv)
    if args.report:
        report(load())
        return 0
    chosen = [s.strip() for s in args.series.split(",") if s.strip()]
    if unknown := [s for s in chosen if s not in SERIES]:
        parser.error(f"unknown series {unknown}")
    if os.geteuid() != 0:
        print("bench/peer_failover.py needs root (it builds labs: namespaces, mounts, libvirtd); skipped")
        return 0

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        raise SystemExit(143)  # unwinds through the finally blocks: the lab is torn down

    signal.signal(signal.SIGTERM, on_term)
    began = time.monotonic()
    document = load()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in [s for s in SERIES if s in chosen]:
        fresh = run_series(name, args.runs, args.kills)
        old = document["series"].get(name)
        if args.append and old is not None and old.get("config") == fresh["config"]:
            for r in fresh["runs"]:  # numbered on from the earlier runs of the same kind
                r["index"] += sum(1 for o in old["runs"] if o["kind"] == r["kind"])
                r["round"] = len(old.get("at", [])) + 1
            fresh["runs"] = old["runs"] + fresh["runs"]
            fresh["at"] = list(old.get("at", [])) + fresh["at"]
            summarize(fresh)
        document["series"][name] = fresh
        document["machine"] = {"cpus": os.cpu_count(), "kernel": platform.release(),
                               "python": platform.python_version()}
        (RESULTS / "peer_failover.json").write_text(json.dumps(document, indent=2))  # each series as it ends
    plot(document, RESULTS / "peer_failover.png")
    report(document)
    print(f"\nwrote {RESULTS / 'peer_failover.json'} and {RESULTS / 'peer_failover.png'} "
          f"({time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
