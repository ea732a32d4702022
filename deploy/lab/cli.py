"""`kvmha-lab`: several real libvirt/KVM hosts on one machine, with power through IPMI and fault injection.

    kvmha-lab up --hosts 3 [--manager default|ADDR[:PORT]]   build it (a keeper process owns it until `down`)
                 [--managers N]                             N managers, a network namespace each, on the lab's
                                                            own PostgreSQL (the keeper runs them)
    kvmha-lab manager m1 cut|restore|pause|resume|kill      a fault of one manager (cut: both its cables)
                 [--watchdog SECONDS]                       a hardware watchdog per host, armed by the agents
    kvmha-lab status [--json]                               hosts, addresses, BMC ports, power, faults, PIDs, VMs
    kvmha-lab fail h2 --network                             --power --network --storage --agent --libvirtd --bmc
                                                            --agent-freeze --libvirtd-hang --watchdog
    kvmha-lab heal h2                                       undo every fault of h2
    kvmha-lab power h1 off                                  chassis power through the host's BMC (IPMI lanplus)
    kvmha-lab vm-create vm1 --host h1                       define + start a small VM with virsh on h1
    kvmha-lab vm-kill vm1 | guest-shutdown vm1              a QEMU crash | a power-off asked by the guest
    kvmha-lab guest-busy vm1                                the guest dirties 512 KiB of memory until destroyed
    kvmha-lab exec h1 -- virsh list --all                   any command inside h1's namespaces
    kvmha-lab down                                          remove everything, leave the machine as it was
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvmha.lab import pacemaker, proc
from kvmha.lab.bmc import BmcError
from kvmha.lab.fault import FAULTS, Fault
from kvmha.lab.guest import DISK_FORMATS
from kvmha.lab.lab import DEFAULT_PREFIX, DEFAULT_SUBNET, Lab
from kvmha.lab.pki import ENV_FILE
from kvmha.lab.state import DEFAULT_STATE_DIR, STATE_FILE, LabError, LabSpec

UP_TIMEOUT_S = 300.0
FAULT_HELP = {
    "power": "chassis power off through the BMC: every process of the host dies at once",
    "network": "cut the host's cable (its veth on the bridge); the host and its VMs run on",
    "storage": "the shared storage turns read-only in this host only",
    "agent": "SIGKILL the kvmha agent alone",
    "libvirtd": "SIGKILL libvirtd alone; its VMs run on",
    "bmc": "the BMC hangs (ipmi_sim stopped): IPMI requests time out",
    "agent-freeze": "SIGSTOP the kvmha agent (hung): with a watchdog, the host resets",
    "libvirtd-hang": "SIGSTOP libvirtd (hung); its VMs run on, the agent reports them unknown",
    "watchdog": "SIGKILL kvmha-watchdog: its device stays armed and resets the host",
}


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).absolute()


def _keeper_log(state_dir: Path) -> Path:
    """Next to the state dir, not in it: a lab that fails to come up removes its state dir, not the story why."""
    return state_dir.parent / f"{state_dir.name}.keeper.log"


def _setting(text: str) -> tuple[str, object]:
    """KEY=VALUE for the agents' TOML; numbers stay numbers ("isolation.after_s=10")."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    value: object = raw
    for kind in (int, float):
        try:
            value = kind(raw)
            break
        except ValueError:
            continue
    return key.strip(), value


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    params = {
        "hosts": args.hosts,
        "subnet": args.subnet,
        "manager": args.manager,
        "state_dir": str(state_dir),
        "prefix": args.prefix,
        "agent_settings": dict(args.agent_setting or []),
        "watchdog_device_timeout_s": args.watchdog or 0,
        "bmc_subnet": args.bmc_subnet,
        "stack": args.stack,
        "stack_profile": args.profile,
        "managers": args.managers,
    }
    if (state_dir / STATE_FILE).exists():
        print(f"a lab is already up in {state_dir} (kvmha-lab down first)", file=sys.stderr)
        return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "kvmha.lab.keeper", json.dumps(params)]
    if args.foreground:
        os.execv(sys.executable, argv)  # the keeper itself, in this terminal: Ctrl-C tears the lab down
    log_path = _keeper_log(state_dir)
    with open(log_path, "ab") as log:
        keeper = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + UP_TIMEOUT_S
    while time.monotonic() < deadline:
        if keeper.poll() is not None:
            print(f"the lab did not come up; {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}")
            return 1
        try:
            # With managers the keeper writes cli.env last, once they run and the hosts' BMCs are registered.
            if LabSpec.load(state_dir).ready and (not args.managers or (state_dir / ENV_FILE).exists()):
                _print_status(Lab.attach(state_dir).status())
                print(f"\nkeeper pid {keeper.pid}, log {log_path}; tear down with: kvmha-lab down")
                if args.managers:
                    print(f"the CLI: KVMHA_ENV_FILE={state_dir / ENV_FILE} kvmha manager list")
                return 0
        except (FileNotFoundError, ValueError):
            pass  # not written yet, or caught mid-write
        time.sleep(0.3)
    print(f"the lab did not come up within {UP_TIMEOUT_S:.0f} s; see {log_path}", file=sys.stderr)
    return 1


def cmd_down(args: argparse.Namespace) -> int:
    try:
        lab = Lab.attach(_state_dir(args))
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 0  # nothing to tear down is what was asked for
    lab.down()
    _keeper_log(Path(lab.spec.state_dir)).unlink(missing_ok=True)
    print("lab down")
    return 0


def _print_status(status: dict[str, Any]) -> None:
    print(f"lab {status['state_dir']}  bridge {status['bridge']} {status['bridge_address']} ({status['subnet']})  "
          f"bmc net {status.get('bmc_subnet') or '-'}  manager {status['manager'] or '-'}  "
          f"shared {status['shared_dir']}  domains {status['domain_type']}  stack {status.get('stack', 'kvmha')}")
    for host in status["hosts"]:
        pids = " ".join(f"{k}={v}" for k, v in host["pids"].items() if v)
        vms = ",".join(host["vms"]) or "-"
        faults = ",".join(host["faults"]) or "-"
        print(f"  {host['name']:<4} {host['address']:<15} bmc {host['bmc']['address']}:{host['bmc']['port']:<4} "
              f"power {host['power']:<4} faults {faults:<16} vms {vms:<12} {pids}")
    if status.get("managers"):
        print(f"  database {status['database']}")
    for manager in status.get("managers", []):
        state = "cut" if manager["cut"] else "paused" if manager["paused"] else "running" if manager["pid"] else "down"
        print(f"  {manager['name']:<4} {manager['address']:<15} netns {manager['netns']}  bmc net "
              f"{manager['bmc_address']}  pid {manager['pid'] or '-'}  {state}")


def cmd_manager(args: argparse.Namespace) -> int:
    lab = Lab.attach(_state_dir(args))
    lab.spec.manager_slot(args.name)  # an unknown name fails here, with the list
    if args.action in ("cut", "restore"):
        lab.cut_manager(args.name, args.action == "cut")
    else:
        ref = lab.spec.companions.get(f"manager-{args.name}")
        if ref is None or not proc.alive(ref.pid, ref.start_ticks):
            raise LabError(f"manager {args.name} is not running")
        sig = {"pause": signal.SIGSTOP, "resume": signal.SIGCONT, "kill": signal.SIGKILL}[args.action]
        proc.kill(ref.pid, ref.start_ticks, sig)
    print(f"manager {args.name}: {args.action}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    lab = Lab.attach(_state_dir(args))
    status = lab.status()
    if args.json:
        # For scripts that register the hosts with a manager: they need the BMC credentials too.
        status["bmc_password"] = lab.spec.bmc_password
        print(json.dumps(status, indent=2))
    else:
        _print_status(status)
    return 0


def cmd_fail(args: argparse.Namespace) -> int:
    chosen: list[Fault] = [f for f in FAULTS if getattr(args, f.replace("-", "_"))]
    lab = Lab.attach(_state_dir(args))
    for fault in chosen:
        lab.fail(args.host, fault)
    print(f"{args.host}: faults now {', '.join(lab.faults(args.host)) or 'none'}")
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    healed = Lab.attach(_state_dir(args)).heal(args.host)
    print(f"{args.host}: healed {', '.join(healed) or 'nothing (no fault)'}")
    return 0


def cmd_power(args: argparse.Namespace) -> int:
    lab = Lab.attach(_state_dir(args))
    if args.action == "status":
        print(lab.power_state(args.host))
    else:
        lab.power(args.host, args.action)
        print(f"{args.host}: power {lab.power_state(args.host)}")
    return 0


def cmd_vm_create(args: argparse.Namespace) -> int:
    lab = Lab.attach(_state_dir(args))
    if lab.spec.stack == pacemaker.STACK:  # the cluster places and starts it; --host is not Pacemaker's to take
        pacemaker.add_vm(lab, args.name, args.memory_mib)
        pacemaker.wait_settled(lab)
        print(f"{args.name}: a VirtualDomain resource, running on {', '.join(lab.vm_hosts(args.name)) or 'none'}")
        return 0
    lab.vm_create(args.name, args.host, args.memory_mib, not args.no_start, args.disk_format)
    print(f"{args.name}: {'defined' if args.no_start else 'running'} on {args.host}")
    return 0


def cmd_vm_kill(args: argparse.Namespace) -> int:
    print(f"{args.name}: QEMU killed on {Lab.attach(_state_dir(args)).vm_kill(args.name)}")
    return 0


def cmd_guest_shutdown(args: argparse.Namespace) -> int:
    print(f"{args.name}: guest powered off on {Lab.attach(_state_dir(args)).guest_shutdown(args.name)}")
    return 0


def cmd_guest_busy(args: argparse.Namespace) -> int:
    host = Lab.attach(_state_dir(args)).guest_busy(args.name)
    print(f"{args.name}: the guest rewrites 512 KiB of memory continuously on {host}")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("exec: a command is needed (kvmha-lab exec h1 -- virsh list --all)", file=sys.stderr)
        return 2
    done = Lab.attach(_state_dir(args)).exec(args.host, argv, check=False, timeout_s=3600)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmha-lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=os.environ.get("KVMHA_LAB_STATE_DIR", str(DEFAULT_STATE_DIR)),
                        help="where the lab keeps its state (env KVMHA_LAB_STATE_DIR; default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="build a lab")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--subnet", default=DEFAULT_SUBNET)
    up.add_argument("--bmc-subnet", help="the lab's BMC network (default: the subnet shifted by 256 addresses, "
                    "10.251.0.0/24 -> 10.251.1.0/24)")
    up.add_argument("--stack", choices=["kvmha", "pacemaker"], default="kvmha",
                    help="kvmha (libvirt + agents) or pacemaker (corosync + Pacemaker, fence_ipmilan, VirtualDomain)")
    up.add_argument("--profile", choices=["defaults", "tuned"], default="defaults",
                    help="the pacemaker stack's configuration (kvmha.lab.pacemaker.PROFILES)")
    up.add_argument("--manager", help="'default' (the bridge address) or ADDR[:PORT] (port 50051): start agents")
    up.add_argument("--prefix", default=DEFAULT_PREFIX, help="names of bridge, namespaces, veths")
    up.add_argument("--agent-setting", type=_setting, action="append", metavar="KEY=VALUE",
                    help="agent.toml override, e.g. isolation.policy=destroy-vms (repeatable)")
    up.add_argument("--foreground", action="store_true", help="stay in the foreground; Ctrl-C tears down")
    up.add_argument("--watchdog", type=int, metavar="SECONDS", default=0,
                    help="a hardware watchdog per host with this timeout, driven by kvmha-watchdog and armed by the "
                         "agents (needs --manager); when it expires, the host is reset (docs/watchdog.md)")
    up.add_argument("--managers", type=int, default=0, metavar="N",
                    help="run N managers, each in its own network namespace on the lab bridge and the BMC network, "
                         "on a PostgreSQL server the lab starts itself (issue 15; docs/managers.md)")
    up.set_defaults(func=cmd_up)

    manager = sub.add_parser("manager", help="a fault of one of the lab's managers (labs with --managers)")
    manager.add_argument("name", help="m1, m2, ...")
    manager.add_argument("action", choices=["cut", "restore", "pause", "resume", "kill"],
                         help="cut/restore both its cables; pause/resume (SIGSTOP/SIGCONT); kill (SIGKILL)")
    manager.set_defaults(func=cmd_manager)

    sub.add_parser("down", help="tear the lab down").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="hosts, power, faults, PIDs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    fail = sub.add_parser("fail", help="inject a fault into a host")
    fail.add_argument("host")
    kinds = fail.add_mutually_exclusive_group(required=True)
    for fault in FAULTS:
        kinds.add_argument(f"--{fault}", action="store_true", help=FAULT_HELP[fault])
    fail.set_defaults(func=cmd_fail)

    heal = sub.add_parser("heal", help="undo every fault of a host")
    heal.add_argument("host")
    heal.set_defaults(func=cmd_heal)

    power = sub.add_parser("power", help="chassis power through the host's BMC")
    power.add_argument("host")
    power.add_argument("action", choices=["on", "off", "status"])
    power.set_defaults(func=cmd_power)

    vm_create = sub.add_parser("vm-create", help="define and start a lab VM on a host (virsh)")
    vm_create.add_argument("name")
    vm_create.add_argument("--host", required=True, help="ignored by the pacemaker stack (Pacemaker places it)")
    vm_create.add_argument("--memory-mib", type=int, default=32)
    vm_create.add_argument("--disk-format", choices=DISK_FORMATS, default="raw")
    vm_create.add_argument("--no-start", action="store_true", help="only define it")
    vm_create.set_defaults(func=cmd_vm_create)

    for name, func, text in (("vm-kill", cmd_vm_kill, "SIGKILL the VM's QEMU"),
                             ("guest-shutdown", cmd_guest_shutdown, "ask the guest to power off (ACPI)"),
                             ("guest-busy", cmd_guest_busy,
                              "put the guest under load: it rewrites 512 KiB of memory until destroyed")):  # fmt: skip
        vm_parser = sub.add_parser(name, help=text)
        vm_parser.add_argument("name")
        vm_parser.set_defaults(func=func)

    exec_parser = sub.add_parser("exec", help="run a command inside a host: exec h1 -- virsh list --all")
    exec_parser.add_argument("host")
    exec_parser.add_argument("argv", nargs=argparse.REMAINDER)
    exec_parser.set_defaults(func=cmd_exec)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (LabError, BmcError, FileNotFoundError, KeyError) as exc:
        print(f"kvmha-lab: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
