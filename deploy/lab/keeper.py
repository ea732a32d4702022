"""The process that owns a lab made by `kvmha-lab up`: it builds the lab, stays alive as the parent of the BMC
simulators (so that they are reaped when they end, whatever the machine's PID 1 does with orphans), and tears the
lab down on SIGTERM or SIGINT (`kvmha-lab down` sends SIGTERM to it by PID). With "managers" > 0 it also runs the
lab's managers (kvmha.lab.harness.LabCluster: one per network namespace, on the lab's PostgreSQL) as their parent.

Run by the CLI as `python -m kvmha.lab.keeper <json>`, with the arguments of Lab.up as a JSON object.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from kvmha.lab.harness import LabCluster
from kvmha.lab.lab import Lab


def main(argv: list[str] | None = None) -> int:
    args = json.loads((sys.argv[1:] if argv is None else argv)[0])
    stop_requested = False

    def on_stop(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    # Set before the lab exists: a `down` while booting must still end in a clean machine.
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    managers = int(args.get("managers") or 0)
    if managers:
        cluster = LabCluster.start(
            args["hosts"], state_dir=Path(args["state_dir"]), prefix=args["prefix"], subnet=args["subnet"],
            agent_settings=args.get("agent_settings") or {}, as_keeper=True, managers=managers,
            bmc_subnet=args.get("bmc_subnet"), dashboard_port=None,
            watchdog_device_timeout_s=int(args.get("watchdog_device_timeout_s") or 0),
        )
        print(f"lab up: {len(cluster.lab.hosts)} hosts, {managers} managers in {cluster.lab.spec.state_dir}",
              flush=True)
        while not stop_requested:
            time.sleep(0.5)
        print("tearing the lab down", flush=True)
        cluster.stop()
        return 0
    lab = Lab.up(
        args["hosts"],
        subnet=args["subnet"],
        manager=args.get("manager"),
        state_dir=Path(args["state_dir"]),
        prefix=args["prefix"],
        agent_settings=args.get("agent_settings") or {},
        as_keeper=True,
        watchdog_device_timeout_s=int(args.get("watchdog_device_timeout_s") or 0),
        bmc_subnet=args.get("bmc_subnet"),
        stack=args.get("stack") or "kvmha",
        stack_profile=args.get("stack_profile") or "defaults",
    )
    print(f"lab up: {len(lab.hosts)} hosts in {lab.spec.state_dir}", flush=True)
    while not stop_requested:
        time.sleep(0.5)
    print("tearing the lab down", flush=True)
    lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
