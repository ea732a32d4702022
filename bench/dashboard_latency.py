"""Dashboard benchmark: event-to-screen latency, from the manager recording an event to a browser showing it.

A real `kvmha-manager` (SQLite, dashboard on, its own self-signed certificate) with two agents on libvirt's test
driver, all on 127.0.0.1; headless Chromium (Debian's) signed in on /events, its live stream open. Events are made
by the operator API: a host's maintenance switched on and off (each switch records host.resource events).

For each event: `at` (the wall-clock time the manager's core decided it, as stored) and the time the row entered the
page's DOM (`data-shown-at-ms`, set by dashboard.js from `performance.timeOrigin + performance.now()`: the same
machine's clock). The difference covers the commit, the journal's wake-up, the dashboard's event follower, the SSE
write, the browser's parse and the DOM insert.

Two series: paced (one switch every --pace-s) and burst (switches back to back, as fast as the admin API answers).
Also: the same paced series with --viewers extra streams open (curl-like readers), to see the fan-out's cost.

Then the other direction: what the dashboard costs the driver. The dashboard runs in the manager's process (its own
threads, but one interpreter lock), so heavy page rendering competes with the driver for the CPU. Measured as the
round trip of an operator change through the driver (SetMaintenance: admin API -> driver.run -> core -> commit ->
answer), with the dashboard idle and with --hammer threads fetching the cluster page and the cluster JSON back to
back (plus the viewers' streams open).

Usage: bench/dashboard_latency.py [--events 40] [--pace-s 0.3] [--viewers 10] [--hammer 4]
Prints a summary, writes bench/results/dashboard_latency.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kvmha.lab import browser
from kvmha.lab.bmc import find_free_port
from kvmha.lab.dashboard import LabDashboard
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = {"ping.interval": "1", "ping.timeout": "3.5", "startup.grace": "4", "heartbeat.stale.after": "2"}
SHOWN = ("return Array.from(document.querySelectorAll('table[data-stream] tbody tr'))"
         ".filter(tr => tr.dataset.shownAtMs).map(tr => [Number(tr.dataset.id), Number(tr.dataset.shownAtMs)]);")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def summary(latencies_ms: list[float]) -> dict[str, float | int]:
    return {"n": len(latencies_ms), "p50_ms": round(statistics.median(latencies_ms), 1),
            "p95_ms": round(percentile(latencies_ms, 0.95), 1), "max_ms": round(max(latencies_ms), 1),
            "min_ms": round(min(latencies_ms), 1)}


def switch(cluster: LocalCluster, on: bool) -> None:
    cluster.admin().SetMaintenance(apb.SetMaintenanceRequest(host="h2", on=on), timeout=10)


def series(cluster: LocalCluster, driver: Any, dashboard: LabDashboard, switches: int, pace_s: float) -> list[float]:
    """Latencies (ms) of every event recorded during `switches` maintenance switches."""
    before = max((e.id for e in cluster.events()), default=0)
    for number in range(switches):
        switch(cluster, on=number % 2 == 0)
        if pace_s:
            time.sleep(pace_s)
    if switches % 2:
        switch(cluster, on=False)
    events = {e.id: e.at for e in cluster.events(after_id=before)}
    shown: dict[int, float] = {}

    def all_shown() -> bool:
        shown.update({int(i): t for i, t in driver.execute_script(SHOWN) if int(i) in events})
        return set(events) <= set(shown)

    wait_for(all_shown, 30, "every event on the page")
    return [shown[i] - events[i] * 1000.0 for i in sorted(events)]


def open_viewers(dashboard: LabDashboard, count: int, stop: threading.Event) -> list[threading.Thread]:
    """`count` extra SSE readers (no browser): what the fan-out costs the one that is measured."""

    def read() -> None:
        with dashboard.client().open_stream("/api/v1/events/stream", timeout_s=60) as stream:
            while not stop.is_set():
                if not stream.readline():
                    return

    threads = [threading.Thread(target=read, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def operation_rtts_ms(cluster: LocalCluster, rounds: int) -> list[float]:
    """Round trips (ms) of maintenance switches through the driver, one at a time."""
    rtts = []
    for number in range(rounds):
        began = time.perf_counter()
        switch(cluster, on=number % 2 == 0)
        rtts.append((time.perf_counter() - began) * 1000.0)
        time.sleep(0.05)
    if rounds % 2:
        switch(cluster, on=False)
    return rtts


def hammer(dashboard: LabDashboard, stop: threading.Event, served: list[int]) -> None:
    client = dashboard.client()
    while not stop.is_set():
        for path in ("/", "/api/v1/cluster"):
            if client.get(path).status == 200:
                served[0] += 1


def driver_cost(cluster: LocalCluster, dashboard: LabDashboard, rounds: int, threads: int) -> dict[str, Any]:
    idle = operation_rtts_ms(cluster, rounds)
    stop, served = threading.Event(), [0]
    workers = [threading.Thread(target=hammer, args=(dashboard, stop, served), daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    began = time.monotonic()
    loaded = operation_rtts_ms(cluster, rounds)
    pages_per_s = served[0] / (time.monotonic() - began + 1.0)
    stop.set()
    for worker in workers:
        worker.join(10)
    return {"idle": {**summary(idle), "rtts_ms": [round(x, 1) for x in idle]},
            "under_load": {**summary(loaded), "rtts_ms": [round(x, 1) for x in loaded], "hammer_threads": threads,
                           "pages_per_s": round(pages_per_s, 1)}}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cost) = plt.subplots(1, 2, figsize=(12, 4))
    names = [n for n in ("paced", "burst", "paced_with_viewers") if n in results]
    ax.boxplot([results[n]["latencies_ms"] for n in names], tick_labels=names, showfliers=True)
    ax.set_ylabel("event recorded → row on screen (ms)")
    ax.set_title("event-to-screen latency (headless Chromium, SSE)")
    ax.grid(axis="y", alpha=0.3)
    if "driver_cost" in results:
        parts = results["driver_cost"]
        cost.boxplot([parts["idle"]["rtts_ms"], parts["under_load"]["rtts_ms"]],
                     tick_labels=["dashboard idle", f"{parts['under_load']['pages_per_s']} pages/s"])
        cost.set_ylabel("operator change through the driver, round trip (ms)")
        cost.set_title("what the dashboard costs the driver")
        cost.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=40, help="maintenance switches per series")
    parser.add_argument("--pace-s", type=float, default=0.3)
    parser.add_argument("--viewers", type=int, default=10, help="extra SSE streams in the third series")
    parser.add_argument("--hammer", type=int, default=4, help="threads fetching pages back to back (driver cost)")
    args = parser.parse_args()
    why_not = browser.missing()
    if why_not:
        print(f"skipped: {why_not}")
        return 0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kvmha-dash-bench-") as tmp:
        work = Path(tmp)
        dashboard = LabDashboard.make(work / "dash", find_free_port())
        cluster = LocalCluster(work, f"sqlite:///{work / 'kvmha.sqlite'}", core_config=CONFIG)
        cluster.dashboard_toml = dashboard.toml()
        stop = threading.Event()
        try:
            cluster.start_manager()
            for name in ("h1", "h2"):
                cluster.start_agent(name)
            cluster.wait_hosts_up(["h1", "h2"], 30)
            with browser.chromium(work) as driver:
                driver.get(dashboard.login_url)
                driver.get(dashboard.url + "events")
                wait_for(lambda: driver.find_element("id", "live-state").text == "live", 15, "stream connected")
                for name, pace in (("paced", args.pace_s), ("burst", 0.0)):
                    latencies = series(cluster, driver, dashboard, args.events, pace)
                    results[name] = {**summary(latencies), "latencies_ms": [round(x, 1) for x in latencies]}
                    print(f"{name:20} {json.dumps(summary(latencies))}")
                open_viewers(dashboard, args.viewers, stop)
                time.sleep(1.0)
                latencies = series(cluster, driver, dashboard, args.events, args.pace_s)
                results["paced_with_viewers"] = {**summary(latencies), "viewers": args.viewers,
                                                 "latencies_ms": [round(x, 1) for x in latencies]}
                print(f"{'paced + ' + str(args.viewers) + ' viewers':20} {json.dumps(summary(latencies))}")
                results["driver_cost"] = driver_cost(cluster, dashboard, args.events, args.hammer)
                for name, part in results["driver_cost"].items():
                    shown = {k: v for k, v in part.items() if k != "rtts_ms"}
                    print(f"{'driver RTT ' + name:20} {json.dumps(shown)}")
        finally:
            stop.set()
            cluster.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": "dashboard_latency", "events_per_series": args.events, "pace_s": args.pace_s,
                "machine_cpus": os.cpu_count(), "results": results}
    (RESULTS / "dashboard_latency.json").write_text(json.dumps(document, indent=2) + "\n")
    plot(results, RESULTS / "dashboard_latency.png")
    print(f"wrote {RESULTS / 'dashboard_latency.json'} and {RESULTS / 'dashboard_latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
