"""`make demo`: a lab of 3 KVM hosts with the manager in front, 5 VMs, and a host that loses its power.

    python -m kvmha.lab.demo [--replace] [--bound 120]

What it does, step by step (each printed as it happens):

1. Brings up the lab (3 hosts, each with libvirtd, the agent and an IPMI BMC) and the real `kvmha-manager`
   with the product's defaults, under a *keeper* process that outlives this command: the lab stays up for the
   operator to look around, and `kvmha-lab down` ends the keeper, which stops the manager and tears the lab down.
   The manager's PID is also recorded in the lab's state (`companions`), so `down` ends it even if the keeper died.
2. Creates 4 HA VMs (different restart priorities, placed by the manager) and 1 non-HA VM (put on the busiest host,
   so the power loss shows what happens to a VM without HA), and waits until each runs — checked with virsh on its
   host.
3. Powers the busiest host off through its BMC (`ipmitool chassis power off`: every process of the host dies at
   once) and prints the manager's events as they come (detected, investigated, Down or fenced, each restart) next
   to what the hosts themselves say (virsh on the new host), with the seconds since the power-off, until every HA
   VM runs elsewhere and the non-HA VM is Stopped. Exit status 1 if that takes longer than the bound.
4. Prints how to look around and how to tear the lab down.

The manager serves its dashboard (docs/dashboard.md) on https://127.0.0.1:8443/ (another free port if that one is
taken): step 1 prints its address and a reader token, and the page shows the power loss and the recovery live.

Nothing here reaches beyond loopback and the lab's own subnet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from kvmha.lab import proc
from kvmha.lab.harness import DEFAULT_ADMIN_PORT, DuplicateWatch, LabCluster
from kvmha.lab.lab import DEFAULT_PREFIX, DEFAULT_SUBNET, Lab
from kvmha.lab.pki import ENV_FILE
from kvmha.lab.state import DEFAULT_STATE_DIR, STATE_FILE, LabError, LabSpec
from kvmha.proto.v1 import admin_pb2 as apb

HOSTS = 3
# (name, restart priority, memory MiB): a higher priority is restarted first when capacity is short. The manager
# places a VM on the host with the largest share of free memory, so with these sizes db and web get a host each
# and the three small ones (api, batch and the non-HA scratch) share the third: the busiest host, which loses power.
HA_VMS: tuple[tuple[str, int, int], ...] = (("db", 30, 128), ("web", 20, 96), ("api", 10, 32), ("batch", 0, 32))
NON_HA_VM = "scratch"
NON_HA_MEMORY_MIB = 32
RECOVERY_BOUND_S = 120.0
UP_BOUND_S = 300.0
PLACE_BOUND_S = 120.0
READY_FILE = "demo.json"  # in <state>/manager/, written by the keeper once the manager sees every host Up
DASHBOARD_PORT = 8443
BIN = Path(sys.executable).parent


# ------------------------------------------------------------------ pure helpers (tests/lab/test_demo.py)


def keeper_log(state_dir: Path) -> Path:
    """Where `kvmha-lab up` keeps its keeper's log, so `kvmha-lab down` removes ours too."""
    return state_dir.parent / f"{state_dir.name}.keeper.log"


def busiest(where: Mapping[str, Sequence[str]], ha: Sequence[str] = ()) -> str:
    """The host running the most VMs (ties: the most HA VMs, then the first name). `where`: VM -> hosts."""
    counts: dict[str, list[int]] = {}
    for vm, hosts in where.items():
        for host in hosts:
            count = counts.setdefault(host, [0, 0])
            count[0] += 1
            count[1] += vm in ha
    if not counts:
        raise ValueError("no VM runs anywhere")
    return min(counts, key=lambda h: (-counts[h][0], -counts[h][1], h))


def started_at_epoch(start_ticks: int, boot_time: float, ticks_per_s: int) -> float:
    """A process's start as epoch seconds, from /proc/PID/stat's start time and /proc/stat's btime."""
    return boot_time + start_ticks / ticks_per_s


def boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise OSError("no btime in /proc/stat")


@dataclass(frozen=True)
class Label:
    text: str  # the phase, e.g. "detected"
    style: str  # rich style; plain output ignores it


def label_for(kind: str, message: str) -> Label:
    """What an event means in the story of a failover."""
    if kind == "host.status":
        old, _, rest = message.partition(" -> ")
        new = rest.split(" ", 1)[0]
        if old == "Up":
            return Label("detected", "bold yellow")
        if old == "Investigating":
            return Label("investigated", "bold red" if new in ("Down", "Fenced", "Fencing") else "yellow")
        if new == "Fenced":
            return Label("fenced", "bold red")
        if new == "Down":
            return Label("down", "bold red")
        if new == "Up":
            return Label("up", "green")
        return Label("host", "yellow")
    if kind == "work.done":
        return Label("restarted", "bold green")
    if kind == "vm.starting":
        return Label("starting", "cyan")
    if kind.startswith("fence."):
        return Label("fence", "red")
    if kind == "agent.link":
        return Label("link", "yellow")
    if kind in ("vm.stopped", "vm.state", "vm.power"):
        return Label("vm", "magenta")
    if kind.startswith("work."):
        return Label("ha work", "dim")
    return Label(kind, "dim")


def format_line(seconds: float, label: str, subject: str, text: str) -> str:
    """One timeline line: seconds since the power-off, the phase, whom it is about, what happened."""
    return f"{seconds:+7.2f} s  {label:<13} {subject:<8} {text}"


def subject_name(subject: str, names: Mapping[str, str]) -> str:
    """"host:3" -> "h2" when known; the subject itself otherwise."""
    return names.get(subject, subject)


# ------------------------------------------------------------------ the keeper: owns the lab and the manager


def run_keeper(params: Mapping[str, Any]) -> int:
    """Bring up the lab and the manager, stay alive as their parent until SIGTERM (`kvmha-lab down`), then tear
    everything down. Runs in its own session, detached from the terminal that ran `make demo`."""
    stop = threading.Event()

    def on_stop(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    # Set before anything exists: a `down` while booting must still end in a clean machine.
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    state_dir = Path(params["state_dir"])
    cluster = LabCluster.start(HOSTS, state_dir=state_dir, prefix=params["prefix"], subnet=params["subnet"],
                               admin_port=params["admin_port"], as_keeper=True,
                               dashboard_port=params.get("dashboard_port", 0))
    try:
        assert cluster.manager is not None
        info = proc.info(cluster.manager.pid)
        assert info is not None
        ready = {"manager_pid": info.pid,
                 "manager_started_at": started_at_epoch(info.start_ticks, boot_time(), os.sysconf("SC_CLK_TCK")),
                 "admin": cluster.admin_address, "keeper_pid": os.getpid()}
        if cluster.dashboard is not None:
            ready |= {"dashboard_url": cluster.dashboard.url, "dashboard_token": cluster.dashboard.token,
                      "dashboard_cert": str(cluster.dashboard.cert)}
        (cluster.workdir / READY_FILE).write_text(json.dumps(ready))
        print(f"lab and manager up (manager pid {info.pid}); waiting for `kvmha-lab down`", flush=True)
        while not stop.wait(0.5):
            pass
        print("tearing the lab down", flush=True)
    finally:
        cluster.stop()
    return 0


# ------------------------------------------------------------------ the demo


class Out:
    """rich on a terminal (colours, a live status line), plain lines otherwise (CI logs)."""

    def __init__(self) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal

    def say(self, text: str = "", style: str = "") -> None:
        self.console.print(text, style=style or None, markup=False)

    def head(self, text: str) -> None:
        self.console.print()
        self.console.print(f"== {text}", style="bold", markup=False)

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if not self.live:  # plain, aligned, no box drawing: greppable CI logs
            widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
            self.say("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
            for row in rows:
                self.say("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
            return
        table = Table(title=title or None, title_justify="left", header_style="bold")
        for column in columns:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        self.console.print(table)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[Any]:
        if self.live:
            with self.console.status(text) as status:
                yield status
        else:
            self.say(text)
            yield None


def _update(status: Any, text: str) -> None:
    if status is not None:
        status.update(text)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _existing_lab(state_dir: Path) -> str | None:
    if not (state_dir / STATE_FILE).exists():
        return None
    try:
        spec = LabSpec.load(state_dir)
    except (OSError, ValueError, TypeError):
        return f"a lab (unreadable state) is in {state_dir}"
    hosts = " ".join(h.name for h in spec.hosts)
    return f"a lab is already up in {state_dir} (prefix {spec.prefix}, hosts {hosts}, subnet {spec.subnet})"


def start_keeper(out: Out, args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    params = {"state_dir": str(state_dir), "prefix": args.prefix, "subnet": args.subnet,
              "admin_port": args.admin_port, "dashboard_port": DASHBOARD_PORT if _port_free(DASHBOARD_PORT) else 0}
    log_path = keeper_log(state_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)  # --state-dir may name a folder whose parent is new
    with log_path.open("wb") as log:
        keeper = subprocess.Popen([sys.executable, "-m", "kvmha.lab.demo", "--keeper", json.dumps(params)],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # not ended by a Ctrl-C here; `kvmha-lab down` ends it
    ready = state_dir / "manager" / READY_FILE
    began = time.monotonic()
    with out.status("booting the hosts: libvirtd, the agent and a BMC each; then the manager") as status:
        while time.monotonic() - began < UP_BOUND_S:
            if keeper.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
                raise LabError(f"the lab did not come up (keeper exited {keeper.returncode}); {log_path}:\n{tail}")
            if ready.exists():
                with contextlib.suppress(ValueError):
                    found: dict[str, Any] = json.loads(ready.read_text())
                    found["keeper_pid"] = keeper.pid
                    return found
            _update(status, f"booting the hosts and the manager ({time.monotonic() - began:.0f} s)")
            time.sleep(0.3)
    raise LabError(f"the lab did not come up within {UP_BOUND_S:.0f} s; see {log_path} (tear down: kvmha-lab down)")


class EventFollower:
    """The manager's events as they are recorded (FollowEvents), into `sink`, until close()."""

    def __init__(self, cluster: LabCluster, after_id: int) -> None:
        self.cluster = cluster
        self.last = after_id
        self.sink: queue.Queue[apb.EventInfo] = queue.Queue()
        self._stop = threading.Event()
        self._stream: grpc.CallIterator[apb.EventInfo] | None = None
        self._thread = threading.Thread(target=self._run, name="follow-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stream = self.cluster.admin().FollowEvents(apb.ListEventsRequest(after_id=self.last))
            try:
                for event in self._stream:
                    self.last = event.id
                    self.sink.put(event)
            except grpc.RpcError:
                if not self._stop.is_set():
                    time.sleep(0.5)  # the stream broke (manager busy or restarting): follow again from `last`

    def close(self) -> None:
        self._stop.set()
        if self._stream is not None:
            self._stream.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leave RpcContext.cancel untyped
        self._thread.join(5)


class Reorder:
    """Timeline lines from two sources (the manager's event stream, our own look at the hosts) put in time order:
    a line is held `hold_s` before it is printed, so a late-streamed event still lands in its place."""

    def __init__(self, hold_s: float = 0.5) -> None:
        self.hold_s = hold_s
        self._held: list[tuple[float, int, str, str]] = []
        self._count = 0

    def add(self, seconds: float, line: str, style: str = "") -> None:
        self._count += 1
        self._held.append((seconds, self._count, line, style))

    def due(self, now_s: float | None = None) -> list[tuple[str, str]]:
        """(line, style) of every held line older than hold_s (all of them when now_s is None), in time order."""
        self._held.sort()
        cut = len(self._held) if now_s is None else sum(1 for h in self._held if h[0] <= now_s - self.hold_s)
        ready, self._held = self._held[:cut], self._held[cut:]
        return [(line, style) for _s, _n, line, style in ready]


class Story:
    """Names for the manager's subjects, and the timeline: events and our own observations, in time order."""

    def __init__(self, cluster: LabCluster, out: Out, t0: float) -> None:
        self.cluster = cluster
        self.out = out
        self.t0 = t0
        self.names: dict[str, str] = {}
        self.events: list[apb.EventInfo] = []
        self.firsts: dict[str, tuple[float, apb.EventInfo]] = {}  # label -> its first event, seconds since t0
        self.restarted: dict[str, float] = {}  # VM -> seconds of the manager's work.done
        self.lines = Reorder()
        self.off_at: float | None = None  # seconds until every process of the host was gone

    def refresh_names(self) -> None:
        admin = self.cluster.admin()
        with contextlib.suppress(grpc.RpcError):
            hosts = admin.ListHosts(apb.ListHostsRequest(), timeout=5).hosts
            self.names.update({f"host:{h.id}": h.name for h in hosts})
            self.names.update({f"vm:{v.id}": v.name for v in admin.ListVms(apb.ListVmsRequest(), timeout=5).vms})
            work = admin.ListHaWork(apb.ListHaWorkRequest(active_only=False), timeout=5).items
            self.names.update({f"work:{w.id}": w.vm for w in work})

    def event(self, event: apb.EventInfo) -> None:
        if event.subject not in self.names and event.subject != "manager":
            self.refresh_names()
        self.events.append(event)
        label = label_for(event.kind, event.message)
        seconds = event.at - self.t0
        subject = subject_name(event.subject, self.names)
        self.firsts.setdefault(label.text, (seconds, event))
        if label.text == "restarted":
            self.restarted.setdefault(subject, seconds)
        self.lines.add(seconds, format_line(seconds, label.text, subject, event.message), label.style)

    def mine(self, label: str, subject: str, text: str, style: str = "") -> float:
        seconds = time.time() - self.t0
        self.lines.add(seconds, format_line(seconds, label, subject, text), style)
        return seconds

    def flush(self, everything: bool = False) -> None:
        for line, style in self.lines.due(None if everything else time.time() - self.t0):
            self.out.say(line, style)


def place_vms(out: Out, cluster: LabCluster) -> tuple[dict[str, str], str]:
    """Create the VMs through the manager (it places them) and wait until each runs, checked with virsh on its host.
    Returns VM -> host and the busiest host."""
    ha = [name for name, _, _ in HA_VMS]
    for name, priority, memory in HA_VMS:
        vm = cluster.create_vm(name, ha=True, priority=priority, memory_mib=memory)
        out.say(f"  {name:<8} HA      priority {priority:>2}  {memory:>3} MiB  -> placed on {vm.host or '?'}")
    vm = cluster.create_vm(NON_HA_VM, ha=False, memory_mib=NON_HA_MEMORY_MIB)
    out.say(f"  {NON_HA_VM:<8} not HA              {NON_HA_MEMORY_MIB:>3} MiB  -> placed on {vm.host or '?'}")
    placed = cluster.wait_running([*ha, NON_HA_VM], PLACE_BOUND_S)
    return placed, busiest({vm: [host] for vm, host in placed.items()}, ha)


def show_vms(out: Out, cluster: LabCluster, placed: Mapping[str, str], title: str) -> None:
    vms = cluster.vms()
    priority = {name: prio for name, prio, _ in HA_VMS}
    rows = []
    for name in [*priority, NON_HA_VM]:
        host = placed.get(name, "")
        state = " ".join(cluster.lab.domstate(host, name)).strip() if host else "-"
        info = vms.get(name)
        rows.append([name, "yes" if name in priority else "no", str(priority.get(name, "-")), host or "-",
                     f"virsh on {host}: {state}" if host else "-", info.state if info else "?"])
    out.table(title, ["VM", "HA", "priority", "host (/proc)", "libvirt says", "manager says"], rows)


def recover(out: Out, cluster: LabCluster, victim: str, moving: Sequence[str],
            bound_s: float) -> tuple[bool, Story, dict[str, float]]:
    """Power the victim off through its BMC and print the story until every HA VM it ran (`moving`) runs on
    another host and the non-HA VM is Stopped (True), or until the bound (False)."""
    after_id = max((e.id for e in cluster.events()), default=0)
    t0 = time.time()
    story = Story(cluster, out, t0)
    story.refresh_names()
    follower = EventFollower(cluster, after_id)
    sink = follower.sink
    cluster.lab.power(victim, "off", wait=False)  # ipmitool chassis power off, to the host's BMC
    story.mine("power off", victim, f"ipmitool -I lanplus chassis power off -> {victim}'s BMC", "bold")
    off_seen = False
    running: dict[str, tuple[str, float]] = {}  # VM -> (host, seconds) once virsh on that host says running
    non_ha_stopped: float | None = None
    last_truth = 0.0
    done = False
    try:
        with out.status("following the manager's events and the hosts' own view (/proc, virsh)") as status:
            while time.time() - t0 < bound_s:
                story.flush()
                with contextlib.suppress(queue.Empty):
                    story.event(sink.get(timeout=0.1))
                    continue  # drain the events first
                now = time.time()
                if now - last_truth < 0.25:
                    continue
                last_truth = now
                if not off_seen and cluster.lab.init(victim) is None:
                    off_seen = True
                    power = cluster.lab.power_state(victim)
                    story.off_at = story.mine("host truth", victim, f"every process of {victim} is gone (the BMC "
                                              f"says power {power}); its VMs died with it", "bold")
                where = cluster.where()
                for name in moving:
                    hosts = where.get(name, [])
                    if name in running or len(hosts) != 1 or hosts[0] == victim:
                        continue
                    if cluster.running_on(name, hosts[0]):
                        seconds = story.mine("verified", name, f"virsh -c qemu:///system domstate {name} on "
                                             f"{hosts[0]}: running", "green")
                        running[name] = (hosts[0], seconds)
                if non_ha_stopped is None:
                    info = cluster.vms().get(NON_HA_VM)
                    if info is not None and info.state == "Stopped" and NON_HA_VM not in where:
                        non_ha_stopped = story.mine("verified", NON_HA_VM, "not HA: Stopped in the manager, "
                                                    "running on no host", "magenta")
                if len(running) == len(moving) and non_ha_stopped is not None:
                    done = True
                    break
                waiting = [n for n in moving if n not in running]
                _update(status, f"{now - t0:5.1f} s since the power-off; waiting for "
                        + (", ".join(waiting) if waiting else f"{NON_HA_VM} to be Stopped"))
        # Events recorded meanwhile (e.g. the last work.done) belong in the story too.
        end = time.time() + 1.0
        while time.time() < end:
            with contextlib.suppress(queue.Empty):
                story.event(sink.get(timeout=0.2))
    finally:
        follower.close()
        story.flush(everything=True)
    return done, story, {name: seconds for name, (_host, seconds) in running.items()}


def summary(story: Story, config: Mapping[str, str], victim: str, running: Mapping[str, float],
            after: Mapping[str, str]) -> list[str]:
    """The phases of the recovery, seconds since the power-off."""
    lines = [f"  {'power off':<13} {0.0:6.2f} s  ipmitool chassis power off to {victim}'s BMC"]
    if story.off_at is not None:
        lines.append(f"  {'host dead':<13} {story.off_at:6.2f} s  every process of {victim} gone (seen in /proc)")
    why = {"detected": f"ping.timeout {config.get('ping.timeout', '?')} s after {victim}'s last ping",
           "investigated": "", "fenced": "the BMC confirmed the power-off"}
    for label, reason in why.items():
        if label in story.firsts:
            seconds, event = story.firsts[label]
            lines.append(f"  {label:<13} {seconds:6.2f} s  {reason or event.message}")
    for vm, seconds in sorted(story.restarted.items(), key=lambda item: item[1]):
        seen = f"; virsh on {after.get(vm, '?')} said running at {running[vm]:.2f} s" if vm in running else ""
        lines.append(f"  {'restarted':<13} {seconds:6.2f} s  {vm} on {after.get(vm, '?')} (manager){seen}")
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvmha.lab.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--replace", action="store_true",
                        help="tear down a lab already up in the state dir first (default: refuse and say how)")
    parser.add_argument("--bound", type=float, default=RECOVERY_BOUND_S,
                        help=f"seconds the recovery may take before the demo fails (default {RECOVERY_BOUND_S:.0f})")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR), help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help=argparse.SUPPRESS)
    parser.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT, help=argparse.SUPPRESS)
    parser.add_argument("--keeper", metavar="JSON", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def venv_bin() -> str:
    """The venv's bin folder as the operator would type it: `.venv/bin` from the repository, absolute elsewhere."""
    return os.path.relpath(BIN, Path.cwd()) if str(BIN).startswith(str(Path.cwd()) + os.sep) else str(BIN)


def hint(out: Out, args: argparse.Namespace, dead: str | None = None,
         ready: Mapping[str, Any] | None = None) -> None:
    venv = venv_bin()
    flags = "" if args.admin_port == DEFAULT_ADMIN_PORT else f" --manager 127.0.0.1:{args.admin_port}"
    lab_flags = "" if args.state_dir == str(DEFAULT_STATE_DIR) else f" --state-dir {args.state_dir}"
    commands = [(f"{venv}/kvmha{flags} host list", "the hosts as the manager sees them"),
                (f"{venv}/kvmha{flags} vm list", "the VMs, where they run, HA or not"),
                (f"{venv}/kvmha{flags} events", "every decision with its reason"),
                (f"{venv}/kvmha-lab{lab_flags} status", "the hosts as the machine sees them"),
                (f"{venv}/kvmha-lab{lab_flags} exec {'h2' if dead == 'h1' else 'h1'} -- virsh list --all",
                 "virsh inside a host")]
    if dead:
        commands.append((f"{venv}/kvmha-lab{lab_flags} power {dead} on", f"{dead} boots again and rejoins, empty"))
    out.head("The lab stays up. Look around:")
    # The manager runs mutual TLS: the CLI takes the lab's admin certificate (and the address) from this file.
    out.say(f"  export KVMHA_ENV_FILE={Path(args.state_dir).absolute() / ENV_FILE}")
    for command, what in commands:
        out.say(f"  {command:<58} {what}")
    if ready and "dashboard_url" in ready:
        out.say(f"  {ready['dashboard_url'] + 'failures':<58} the recovery timeline, drawn from the events")
        show_dashboard(out, ready)
    out.say(f"Tear it all down (hosts, manager, bridge, mounts): {venv}/kvmha-lab{lab_flags} down", "bold")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keeper:
        return run_keeper(json.loads(args.keeper))
    out = Out()
    if os.geteuid() != 0:
        out.say("make demo needs root (network namespaces, mounts, libvirtd in each lab host): run it as root",
                "bold red")
        return 2
    state_dir = Path(args.state_dir).absolute()
    existing = _existing_lab(state_dir)
    if existing and not args.replace:
        out.say(f"{existing}.", "bold red")
        out.say(f"The demo needs a fresh lab: tear that one down with `{venv_bin()}/kvmha-lab down` and run "
                f"`make demo` again, or run `{venv_bin()}/python -m kvmha.lab.demo --replace` to do both.")
        return 2
    if existing:
        out.say(f"{existing}: tearing it down first (--replace)")
        Lab.attach(state_dir).down()
        keeper_log(state_dir).unlink(missing_ok=True)
    if not _port_free(args.admin_port):
        out.say(f"127.0.0.1:{args.admin_port} (the manager's admin port, where `kvmha` looks) is taken by another "
                "process: stop it first", "bold red")
        return 2

    try:
        out.head(f"1. A lab of {HOSTS} KVM hosts and the manager (product defaults)")
        cluster, config, ready = bring_up(out, args, state_dir)
        return run_story(out, args, cluster, config, ready)
    except KeyboardInterrupt:
        out.say("interrupted; the lab stays up (its keeper runs on its own)", "bold red")
        hint(out, args)
        return 130
    except (LabError, TimeoutError, grpc.RpcError) as error:
        out.say(f"the demo failed: {error}", "bold red")
        if not (state_dir / STATE_FILE).exists():
            out.say("the lab did not stay up: nothing is left to tear down")
            return 1
        out.say(f"keeper log: {keeper_log(state_dir)}; manager log: {state_dir / 'manager' / 'manager.log'}")
        hint(out, args)
        return 1


def bring_up(out: Out, args: argparse.Namespace,
             state_dir: Path) -> tuple[LabCluster, dict[str, str], dict[str, Any]]:
    """Start the keeper, wait for the lab and the manager, and return a client view of them."""
    began = time.monotonic()
    ready = start_keeper(out, args, state_dir)
    lab = Lab.attach(state_dir)
    cluster = LabCluster(lab=lab, workdir=state_dir / "manager", admin_port=args.admin_port, database="",
                         core_config={})  # a view: its manager field stays None, and nothing here calls stop()
    config = {c.name: c.value for c in cluster.admin().ListConfig(apb.ListConfigRequest(), timeout=5).items}
    hosts = cluster.hosts()
    out.table("", ["host", "address", "BMC (IPMI, UDP)", "manager says"],
              [[h.name, h.address, f"{h.bmc_address}:{h.bmc_port}", hosts[h.name].status if h.name in hosts else "?"]
               for h in lab.hosts])
    out.say(f"up in {time.monotonic() - began:.1f} s: manager pid {ready['manager_pid']} "
            f"(admin {ready['admin']}, agents on {lab.spec.manager}), keeper pid {ready['keeper_pid']}, "
            f"domains {lab.spec.domain_type}")
    out.say("manager config: " + ", ".join(f"{k} {config.get(k, '?')} s" for k in
                                            ("ping.interval", "ping.timeout", "investigation.timeout",
                                             "fence.timeout", "startup.grace")))
    show_dashboard(out, ready)
    return cluster, config, ready


def show_dashboard(out: Out, ready: Mapping[str, Any]) -> None:
    """Where to watch: the dashboard's address, a reader token, and a link that signs a browser in."""
    if "dashboard_url" not in ready:
        return
    url, token = ready["dashboard_url"], ready["dashboard_token"]
    out.say(f"dashboard: {url}  (reader token {token})", "bold")
    out.say(f"  open {url}?token={token} to watch the failover live (self-signed certificate "
            f"{ready['dashboard_cert']}: accept it in the browser, or curl --cacert it)")


def run_story(out: Out, args: argparse.Namespace, cluster: LabCluster, config: Mapping[str, str],
              ready: Mapping[str, Any]) -> int:
    out.head(f"2. {len(HA_VMS)} HA VMs and 1 non-HA VM, created through the manager")
    placed, victim = place_vms(out, cluster)
    show_vms(out, cluster, placed, "")

    grace = float(config.get("startup.grace", "20"))
    wait_s = float(ready["manager_started_at"]) + grace + 1.0 - time.time()
    if wait_s > 0:
        with out.status(f"waiting {wait_s:.0f} s: the manager fences nobody during its first {grace:.0f} s "
                        "(startup.grace)"):
            time.sleep(wait_s)

    ha = [name for name, _, _ in HA_VMS]
    on_victim = sorted(vm for vm, host in placed.items() if host == victim)
    out.head(f"3. Power loss: {victim} runs {', '.join(on_victim)}; its BMC turns it off")
    moving = [vm for vm in on_victim if vm in ha]
    if "dashboard_url" in ready:
        out.say(f"watch it live: {ready['dashboard_url']} (cluster) and {ready['dashboard_url']}failures (timeline)")
    with DuplicateWatch(cluster.lab) as watch:
        done, story, running = recover(out, cluster, victim, moving, args.bound)
    if not done:
        missing = [n for n in moving if n not in running]
        out.say(f"recovery did not complete within {args.bound:.0f} s: not yet running elsewhere: "
                f"{', '.join(missing) or '-'}", "bold red")
        out.say(f"manager log: {cluster.workdir / 'manager.log'}; the lab stays up for a look", "bold red")
        hint(out, args, victim, ready)
        return 1

    after = cluster.wait_running(ha, 10, not_on=victim)  # every HA VM, moved or not, checked with virsh again
    total = max(running.values(), default=0.0)
    out.head("4. Recovered")
    show_vms(out, cluster, after, "")
    for line in summary(story, config, victim, {vm: running[vm] for vm in moving}, after):
        out.say(line)
    moved = ", ".join(f"{vm} -> {after.get(vm, '?')}" for vm in moving)
    if watch.duplicates:
        at, vm, hosts = watch.duplicates[0]
        out.say(f"SPLIT BRAIN: {vm} ran on {' and '.join(hosts)} at once ({at - story.t0:+.2f} s)", "bold red")
        hint(out, args, victim, ready)
        return 1
    out.say(f"Recovered in {total:.1f} s: every HA VM of {victim} runs on another host ({moved}), verified with "
            f"virsh on those hosts; {NON_HA_VM} (not HA) is Stopped. No VM ran on two hosts at once "
            f"({watch.samples} samples of every host's QEMUs).", "bold green")
    hint(out, args, victim, ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
