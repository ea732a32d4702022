"""End-to-end tests: the real kvmha-manager in front of a namespace lab (real libvirtd, QEMU/KVM, virtlockd, agents,
ipmi_sim BMCs), with faults injected into the hosts. Every outcome is read from the hosts themselves (their /proc and
their libvirtd), not only from the manager, and a watcher samples every host's QEMUs throughout each failure.

Labs use prefix "kvmhae" and subnet 10.251.0.128/26, so a lab brought up by hand (10.251.0.0/24), the lab tests
(kvmhat, 10.251.0.192/26) and `make demo`/bench can run meanwhile. A module shares one lab; after each test the lab is
healed (faults undone, hosts powered on, maintenance off, every host Up again, every VM deleted and no QEMU left
anywhere). If that reset fails the lab is torn down and the next test builds a fresh one. Every lab is torn down also
when a test fails (`LabCluster.stop`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from kvmha.lab import Lab, proc
from kvmha.lab.harness import BIN, DuplicateWatch, LabCluster
from kvmha.lab.pki import ENV_FILE
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb

from ..lab.conftest import caps_cache, lab_prerequisites_missing

T = TypeVar("T")
E2E_PREFIX = "kvmhae"
E2E_SUBNET = "10.251.0.128/26"

# A fast manager (checked by CoreConfig.from_mapping: heartbeat.stale.after < ping.timeout - ping.interval, ...).
# A host is behind 3.5 s after its last ping, investigated within 2-3 s. flap.max.failures is high because the
# tests of a module fail the same hosts again and again: holding them out of placement is not what is tested here.
FAST_CONFIG: dict[str, str] = {
    "ping.interval": "1",
    "ping.timeout": "3.5",
    "heartbeat.stale.after": "2",
    "startup.grace": "4",
    "investigation.timeout": "3",
    "check.neighbor.timeout": "2",
    "investigate.retry.interval": "3",
    "restart.retry.interval": "2",
    "flap.max.failures": "1000",
}
AGENT_SETTINGS: dict[str, object] = {"heartbeat_interval_s": 1.0}

PING_TIMEOUT_S = float(FAST_CONFIG["ping.timeout"])
INVESTIGATION_S = float(FAST_CONFIG["investigation.timeout"])
# Longer than a silent host needs to be detected and investigated (and a wrong decision to show).
DECISION_WINDOW_S = PING_TIMEOUT_S + INVESTIGATION_S + 4.0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_prerequisites_missing()
    if reason is None:
        return
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


# ---------------------------------------------------------------------------------------------- the hosts' truth


@dataclass
class Timeline(DuplicateWatch):
    """A DuplicateWatch (every 0.1 s, all hosts' QEMUs from /proc) that also remembers, for each (VM, host), the
    first and last sample in which that host ran the VM: "the old copy was gone before the new one appeared" is
    then `last(vm, old) < first(vm, new)`."""

    seen: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    # (VM, host) -> when the QEMU first sampled there started (from /proc, to the clock tick): a QEMU that lived
    # between two samples is dated by the kernel, not by the sampler's pace.
    born: dict[tuple[str, str], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, at: float, by_vm: Mapping[str, list[str]],
               running: Mapping[str, list[str]] | None = None) -> None:
        with self._lock:
            super().record(at, by_vm, running)
            for vm, hosts in by_vm.items():
                for host in hosts:
                    if (vm, host) not in self.seen:
                        pid = self.qemus.get(host, {}).get(vm)
                        started = proc.started_at(pid) if pid else None
                        self.born[(vm, host)] = at if started is None else min(started, at)
                    self.seen.setdefault((vm, host), [at, at])[1] = at

    def started(self, vm: str, host: str) -> float | None:
        """When the first QEMU of the VM seen on the host started (not when the sampler first saw it)."""
        with self._lock:
            return self.born.get((vm, host))

    def first(self, vm: str, host: str) -> float | None:
        with self._lock:
            return self.seen[(vm, host)][0] if (vm, host) in self.seen else None

    def last(self, vm: str, host: str) -> float | None:
        with self._lock:
            return self.seen[(vm, host)][1] if (vm, host) in self.seen else None

    def hosts_of(self, vm: str) -> set[str]:
        with self._lock:
            return {host for (name, host) in self.seen if name == vm}


def libvirt_running(cluster: LabCluster) -> dict[str, set[str]]:
    """Host -> domains its libvirtd lists as running (`virsh list --name`), for every powered-on host whose
    libvirtd answers."""
    found: dict[str, set[str]] = {}
    for host in cluster.lab.hosts:
        if cluster.lab.init(host.name) is None:
            continue
        out = cluster.lab.exec(host.name, ["virsh", "-q", "-c", "qemu:///system", "list", "--name"], check=False)
        if out.returncode == 0:
            found[host.name] = {line.strip() for line in out.stdout.splitlines() if line.strip()}
    return found


def not_running_anywhere(cluster: LabCluster, vm: str) -> bool:
    """No host's /proc holds a QEMU for the VM and no host's libvirtd lists it as running."""
    return vm not in cluster.where() and not any(vm in names for names in libvirt_running(cluster).values())


def qemu_pids(cluster: LabCluster) -> dict[str, tuple[str, int]]:
    """VM -> (host, QEMU PID) for every running QEMU (from /proc)."""
    return {vm: (host, pid) for host, vms in cluster.lab.running_vms().items() for vm, pid in vms.items()}


# ---------------------------------------------------------------------------------------------- the manager


@dataclass
class E2E:
    """What a test gets: the cluster and the id of the last event before the test (for its own story)."""

    cluster: LabCluster
    since: int
    started: float

    @property
    def lab(self) -> Lab:
        return self.cluster.lab

    def events(self) -> list[apb.EventInfo]:
        return self.cluster.events(after_id=self.since)

    def story(self) -> str:
        """The manager's events during this test (seconds from the test's start) and the tail of its log."""
        try:
            lines = [
                f"{e.at - self.started:7.2f} {e.severity:7} {e.subject:8} {e.kind:16} {e.message}"
                for e in self.events()
            ]
        except Exception as error:  # the manager may be the thing that is down
            lines = [f"(events unavailable: {error})"]
        no_hosts: dict[str, apb.HostInfo] = {}
        no_vms: dict[str, apb.VmInfo] = {}
        hosts = {h.id: n for n, h in _safe(self.cluster.hosts, no_hosts).items()}
        vms = {v.id: n for n, v in _safe(self.cluster.vms, no_vms).items()}
        legend = ", ".join(
            [f"host:{i}={n}" for i, n in sorted(hosts.items())] + [f"vm:{i}={n}" for i, n in sorted(vms.items())]
        )
        return (
            "\n--- manager events (s since test start; "
            + legend
            + ")\n"
            + "\n".join(lines)
            + ("\n" + self.cluster.manager_logs(15) if self.cluster.peers
               else "\n--- manager log tail\n" + self.cluster.manager_log_tail(15))
        )

    def host_id(self, name: str) -> int:
        return int(self.cluster.hosts()[name].id)

    def vm_subject(self, name: str) -> str:
        return f"vm:{self.cluster.vms()[name].id}"

    def host_events(self, host: str, needle: str) -> list[apb.EventInfo]:
        subject = f"host:{self.host_id(host)}"
        return [e for e in self.events() if e.subject == subject and needle in e.message]

    def starts_of(self, names: list[str], after: float) -> list[apb.EventInfo]:
        """The manager's "starting on H" events for these VMs since `after` (epoch seconds)."""
        subjects = {self.vm_subject(n) for n in names}
        return [e for e in self.events() if e.kind == "vm.starting" and e.subject in subjects and e.at >= after]

    def maintenance(self, host: str, on: bool) -> None:
        self.cluster.admin().SetMaintenance(apb.SetMaintenanceRequest(host=host, on=on), timeout=10)

    def enabled(self, host: str, on: bool) -> None:
        """Disabled hosts take no new VMs (and, unlike maintenance, move none of theirs off)."""
        self.cluster.admin().SetHostEnabled(apb.SetHostEnabledRequest(host=host, enabled=on), timeout=10)


def _safe(call: Callable[[], T], default: T) -> T:
    try:
        return call()
    except Exception:
        return default


def wait_manager(e2e: E2E, predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    try:
        wait_for(predicate, timeout_s, what, interval_s=0.2)
    except TimeoutError as error:
        pytest.fail(f"{error}{e2e.story()}")


def vm_is(e2e: E2E, name: str, state: str, host: str | None = None, power: str | None = None) -> bool:
    vm = e2e.cluster.vms().get(name)
    return (
        vm is not None
        and vm.state == state
        and (host is None or vm.host == host)
        and (power is None or vm.power_state == power)
    )


def place(e2e: E2E, host: str, vms: Mapping[str, bool]) -> dict[str, int]:
    """Create VMs (name -> HA) through the manager so that they run on `host`: the other hosts are disabled
    meanwhile (placement only picks Enabled hosts; maintenance would migrate their VMs away). Returns VM -> QEMU
    PID, once the host's libvirtd and the manager both say they run there."""
    cluster = e2e.cluster
    others = [h.name for h in cluster.lab.hosts if h.name != host]
    for other in others:
        e2e.enabled(other, False)
    try:
        for name, ha in vms.items():
            cluster.create_vm(name, ha=ha)
        try:
            placed = cluster.wait_running(list(vms), 60)
        except TimeoutError as error:
            pytest.fail(f"set-up: {error}{e2e.story()}")
        assert set(placed.values()) == {host}, f"set-up: {placed}{e2e.story()}"
        wait_manager(
            e2e,
            lambda: all(vm_is(e2e, n, "Running", host, "PowerOn") for n in vms),
            f"the manager to see {list(vms)} Running on {host}",
        )
    finally:
        for other in others:
            e2e.enabled(other, True)
    pids = qemu_pids(cluster)
    return {name: pids[name][1] for name in vms}


def hold(e2e: E2E, seconds: float, check: Callable[[], str | None], interval_s: float = 0.5) -> None:
    """For `seconds`, check every `interval_s` that nothing wrong happened (`check` returns what went wrong)."""
    deadline = time.monotonic() + seconds
    while True:
        wrong = check()
        if wrong:
            pytest.fail(f"{wrong}{e2e.story()}")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval_s)


def kvmha_cli(cluster: LabCluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it against the lab: through the lab's env file (mutual TLS, admin role)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVMHA_")},
           "KVMHA_ENV_FILE": str(Path(cluster.lab.spec.state_dir) / ENV_FILE)}
    return subprocess.run(
        [str(BIN / "kvmha"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env,
    )


# ---------------------------------------------------------------------------------------------- life cycle


def restore_managers(cluster: LabCluster) -> None:
    """A lab with several managers: every cable restored, every paused manager resumed, every dead one started
    again (as a standby), every host powered on; admin calls then go to whoever holds the lease."""
    for slot in cluster.lab.managers:
        if cluster.lab.manager_cut(slot.name):
            cluster.lab.cut_manager(slot.name, False)
    for manager in cluster.all_managers:
        if manager.manager is not None and manager.manager_alive and proc.stopped(manager.manager.pid):
            os.kill(manager.manager.pid, signal.SIGCONT)
        if not manager.manager_alive:
            manager.close_admin()
            manager.start_manager()
    for host in cluster.lab.hosts:
        if cluster.lab.power_state(host.name) == "off":
            cluster.lab.power(host.name, "on")
    cluster.follow_holder()


def reset(cluster: LabCluster) -> None:
    """Bring a shared lab back to the start: manager running, every fault healed, every host powered on, Enabled and
    Up, no VM registered and no QEMU anywhere."""
    if cluster.lab.managers:
        restore_managers(cluster)
    elif not cluster.manager_alive:
        cluster.start_manager()
    for host in cluster.lab.hosts:
        if cluster.lab.faults(host.name):
            cluster.lab.heal(host.name)
    for name, info in cluster.hosts().items():
        if info.resource_state == "Disabled":
            cluster.admin().SetHostEnabled(apb.SetHostEnabledRequest(host=name, enabled=True), timeout=10)
        elif info.resource_state != "Enabled":
            cluster.admin().SetMaintenance(apb.SetMaintenanceRequest(host=name, on=False), timeout=10)
    cluster.wait_hosts_up(timeout_s=60)

    def clean() -> bool:
        # The manager deletes only VMs that are off: HA off (so that nothing is restarted), every QEMU destroyed
        # directly on its host (a graceful stop would wait for a guest that ignores ACPI), then delete what the
        # manager has seen off; a domain reported meanwhile as Unmanaged goes the same way on the next round.
        for vm in cluster.vms().values():
            if vm.ha_enabled:
                with contextlib.suppress(Exception):
                    cluster.admin().SetVmHa(apb.SetVmHaRequest(vm=str(vm.id), enabled=False), timeout=10)
        for host, names in cluster.lab.running_vms().items():
            for name in names:
                cluster.lab.virsh(host, "destroy", name, check=False)
        for vm in cluster.vms().values():
            with contextlib.suppress(Exception):
                cluster.admin().DeleteVm(apb.Ref(ref=str(vm.id)), timeout=10)
        return not cluster.vms() and not any(cluster.lab.running_vms().values())

    wait_for(clean, 60, "no VM left in the manager or on the hosts", interval_s=1.0)


@dataclass
class SharedCluster:
    """One lab + manager for a module; rebuilt when a reset fails."""

    factory: pytest.TempPathFactory
    core_config: dict[str, str]
    agent_settings: dict[str, object]
    hosts: int = 3
    cluster: LabCluster | None = None
    managers: int = 0  # > 0: that many managers, own namespaces, on the lab's PostgreSQL (test_managers.py)

    def get(self) -> LabCluster:
        if self.cluster is None:
            state_dir = self.factory.mktemp("e2e") / "state"
            self.cluster = LabCluster.start(
                self.hosts,
                state_dir=state_dir,
                prefix=E2E_PREFIX,
                subnet=E2E_SUBNET,
                core_config=self.core_config,
                agent_settings=self.agent_settings,
                cache_dir=caps_cache(self.factory),
                managers=self.managers,
            )
        return self.cluster

    def reset(self) -> None:
        if self.cluster is None:
            return
        try:
            reset(self.cluster)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.stop()


@contextlib.contextmanager
def shared_cluster(
    factory: pytest.TempPathFactory, core_config: Mapping[str, str], agent_settings: Mapping[str, object],
    managers: int = 0,
) -> Iterator[SharedCluster]:
    shared = SharedCluster(factory, dict(core_config), dict(agent_settings), managers=managers)
    try:
        yield shared
    finally:
        shared.stop()


@contextlib.contextmanager
def e2e_test(shared: SharedCluster) -> Iterator[E2E]:
    cluster = shared.get()
    events = cluster.events()
    yield E2E(cluster, events[-1].id if events else 0, time.time())
    shared.reset()
