"""Agent benchmark: kill-to-delta latency and the agent's own cost.

1. Latency: a real `kvmha-agent` on a private libvirtd (real QEMU, KVM if /dev/kvm works, else TCG) streams to an
   in-process fake manager. For each of N rounds a VM is started by a StartVm command, its QEMU is killed with
   SIGKILL (by PID, from libvirt's pid file), and the time until the manager receives the STOPPED delta is taken.
2. Cost: the agent with 50 running domains at a 1 s ping interval, CPU share and RSS over a measuring window.
   Domains come from libvirt's test driver (`test:///default`) inside the agent: 50 real QEMUs would measure QEMU on
   this 2-core machine, not the agent. The agent's work per ping and per resync is the same either way.

Usage: bench/agent_latency.py [--rounds 20] [--domains 50] [--window-s 30]
Prints a summary and writes bench/results/agent_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kvmha.lab.domain import domain_xml
from kvmha.lab.testing.fake_manager import FakeManager
from kvmha.lab.testing.libvirtd import PrivateLibvirtd, available
from kvmha.lab.testing.local import AgentProcess
from kvmha.proto.v1 import agent_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def new_uuid() -> str:
    return str(uuid.uuid4())


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure_latency(rounds: int, workdir: Path) -> dict[str, object]:
    with PrivateLibvirtd(prefix="kvmha-bench-lv-") as lv:
        manager = FakeManager(ping_interval_s=1.0).start()
        agent = AgentProcess(workdir, [manager.address], libvirt_uri=lv.uri).start()
        latencies_ms: list[float] = []
        try:
            manager.wait_for(lambda r: r.kind == "power" and r.msg.power.full, timeout_s=20)
            vm, name = new_uuid(), f"bench-{new_uuid()[:8]}"
            xml = domain_xml(name, vm, domain_type=lv.domain_type)
            for i in range(rounds):
                started = manager.command(f"start-{i}", start_vm=pb.StartVm(vm_uuid=vm, domain_xml=xml))
                if not started.ok:
                    raise RuntimeError(f"start failed: {started.message}")
                time.sleep(0.3)  # let QEMU settle: measure the kill, not a half-started guest
                mark = manager.mark()
                pid = lv.qemu_pid(name)
                killed_at = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                delta = manager.wait_for(
                    lambda r: r.kind == "power" and bool(r.msg.power.domains) and r.msg.power.domains[0].uuid == vm
                    and r.msg.power.domains[0].state == pb.POWER_OFF, since=mark, timeout_s=10)
                latencies_ms.append((delta.at - killed_at) * 1000)
            lv.virsh("undefine", vm, check=False)
        finally:
            agent.stop()
            manager.close()
    return {
        "rounds": rounds, "domain_type": lv.domain_type,
        "median_ms": round(statistics.median(latencies_ms), 1),
        "p90_ms": round(sorted(latencies_ms)[int(0.9 * (len(latencies_ms) - 1))], 1),
        "min_ms": round(min(latencies_ms), 1), "max_ms": round(max(latencies_ms), 1),
    }


def measure_cost(domains: int, window_s: float, workdir: Path) -> dict[str, object]:
    manager = FakeManager(ping_interval_s=1.0).start()
    agent = AgentProcess(workdir, [manager.address], libvirt_uri="test:///default",
                         storage_paths=[str(workdir / "shared")], heartbeat_interval_s=2.0).start()
    try:
        manager.wait_for(lambda r: r.kind == "power" and r.msg.power.full, timeout_s=20)
        for i in range(domains - 1):  # test:///default already runs one domain, "test"
            vm = new_uuid()
            result = manager.command(f"d-{i}", start_vm=pb.StartVm(vm_uuid=vm, domain_xml=domain_xml(f"b{i}", vm)))
            if not result.ok:
                raise RuntimeError(result.message)
        time.sleep(2.0)
        ping = manager.messages("ping")[-1].msg.ping
        assert ping.domains_running == domains, ping
        cpu_before, at_before, mark = cpu_s(agent.pid), time.monotonic(), manager.mark()
        time.sleep(window_s)
        cpu_used_s, elapsed_s = cpu_s(agent.pid) - cpu_before, time.monotonic() - at_before
        pings = len(manager.messages("ping", since=mark))
        fulls = len([r for r in manager.received[mark:] if r.kind == "power" and r.msg.power.full])
        return {
            "domains": domains, "ping_interval_s": 1.0, "window_s": round(elapsed_s, 1),
            "cpu_percent_of_one_core": round(100 * cpu_used_s / elapsed_s, 2), "rss_mib": round(rss_mib(agent.pid), 1),
            "pings_in_window": pings, "full_reports_in_window": fulls, "libvirt_uri": "test:///default",
        }
    finally:
        agent.stop()
        manager.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--domains", type=int, default=50)
    parser.add_argument("--window-s", type=float, default=30.0)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kvmha-bench-") as tmp:
        why_not = available()
        if why_not is None:
            results["kill_to_delta"] = measure_latency(args.rounds, Path(tmp))
        else:
            results["kill_to_delta"] = {"skipped": why_not}
        results["agent_cost"] = measure_cost(args.domains, args.window_s, Path(tmp))
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "agent_latency.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
