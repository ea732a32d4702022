"""The host side of issue 11 on real hosts: every lab host has a hardware watchdog (its power supply resets the host
when it expires), kvmha-watchdog drives it and the agent arms it. The real manager runs in front, every host's QEMUs
are sampled throughout (Timeline: never two copies), and every outcome is read from the hosts.

- the agent killed -> reset within the device timeout; frozen (SIGSTOP) -> within the agent's watchdog timeout;
  kvmha-watchdog killed -> within the device timeout;
- the agent restarted by the host's init within the device timeout -> no reset; a clean stop -> disarmed, no reset;
- libvirtd hung on a connected host -> no reset, its VMs PowerUnknown in the manager;
- an isolated host whose libvirtd hangs cannot complete its isolation response -> the watchdog resets it;
- the disk-lease probe against real virtlockd: a running VM's lease reads held from another host, free after destroy.

One lab for the module (prefix kvmhae like the other e2e modules: they never run at once), healed between tests.
The agents are configured with isolation.after_s 30; the manager's 6 s reaches them in Welcome and wins.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmha.lab import proc, watchdog
from kvmha.lab.fault import Fault
from kvmha.lab.harness import LabCluster
from kvmha.proto.v1 import admin_pb2 as apb

from ..lab.conftest import caps_cache
from .conftest import (
    AGENT_SETTINGS,
    DECISION_WINDOW_S,
    E2E,
    E2E_PREFIX,
    E2E_SUBNET,
    FAST_CONFIG,
    SharedCluster,
    Timeline,
    e2e_test,
    hold,
    place,
    qemu_pids,
    vm_is,
    wait_manager,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow]

DEVICE_S = 4  # the lab watchdog device's timeout
TIMEOUT_S = 2.0 * DEVICE_S  # the agents' watchdog.timeout_s (the lab's default: twice the device's)
ISOLATION_AFTER_S = 6.0
CONFIG = {**FAST_CONFIG, "isolation.after": str(ISOLATION_AFTER_S), "fence.timeout": "5"}
AGENTS = {**AGENT_SETTINGS, "isolation.policy": "destroy-vms", "isolation.after_s": 30.0}
SLACK_S = 1.5  # the device polls every 50 ms, the daemon pets every second; this machine is shared


class WatchdogCluster(SharedCluster):
    def get(self) -> LabCluster:
        if self.cluster is None:
            self.cluster = LabCluster.start(
                self.hosts, state_dir=self.factory.mktemp("e2e") / "state", prefix=E2E_PREFIX, subnet=E2E_SUBNET,
                core_config=self.core_config, agent_settings=self.agent_settings,
                cache_dir=caps_cache(self.factory), watchdog_device_timeout_s=DEVICE_S)
        return self.cluster


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCluster]:
    cluster = WatchdogCluster(tmp_path_factory, dict(CONFIG), dict(AGENTS))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def e2e(shared: SharedCluster) -> Iterator[E2E]:
    with e2e_test(shared) as test:
        yield test


def _armed(e2e: E2E, host: str) -> None:
    """The host's agent has armed kvmha-watchdog, which pets the device."""
    def live() -> bool:
        status = watchdog.daemon_status(e2e.lab, host)
        return bool(status["petting"]) and [c["state"] for c in status["clients"]] == ["live"]

    wait_manager(e2e, live, f"{host}'s agent armed", 20)
    assert watchdog.device_state(e2e.lab, host)["running"] is True


def _reset_within(e2e: E2E, host: str, since: float, low_s: float, high_s: float) -> float:
    reset = watchdog.wait_reset(e2e.lab, host, since, high_s + 5)
    if reset is None:
        pytest.fail(f"{host} was not reset within {high_s + 5:.0f} s{e2e.story()}")
    after_s = float(reset["at"]) - since
    assert low_s <= after_s <= high_s, f"reset {after_s:.1f} s after the fault (expected {low_s}-{high_s}){e2e.story()}"
    print(f"{host} reset {after_s:.2f} s after the fault: {reset['why']}")
    return float(reset["at"])


def _no_reset(e2e: E2E, host: str, since: float) -> None:
    assert not [r for r in watchdog.resets(e2e.lab, host) if float(r["at"]) >= since], e2e.story()


def _no_duplicates(e2e: E2E, watch: Timeline) -> None:
    assert watch.samples >= 3, f"the watcher did not run ({watch.samples} samples)"
    assert not watch.duplicates, f"a VM ran on two hosts at once: {watch.duplicates[:5]}{e2e.story()}"


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (the host's dead processes may wait a moment for their reaper)."""
    info = proc.info(pid)
    return info is not None and not info.zombie


def _settle(e2e: E2E) -> None:
    """Watch on for as long as the manager needs to detect and decide about the rebooting host (it may fence it,
    restart its HA VM after the reboot, ...: whatever it does, the Timeline around this must see no second copy)."""
    hold(e2e, DECISION_WINDOW_S, lambda: None)


def _agent_log(e2e: E2E, host: str) -> str:
    return (Path(e2e.lab.host(host).dir) / "log" / "kvmha-agent.log").read_text(errors="replace")


# ---------------------------------------------------------------------------------------------- lease evidence


def test_a_running_vms_disk_lease_reads_held_from_another_host_and_free_after_destroy(e2e: E2E) -> None:
    """virtlockd holds the lease of a running VM's disk on the shared storage; a neighbour sees it held (F_GETLK,
    without taking it) and, once the VM is destroyed, free. Asked from the VM's own host, the holder is that host's
    virtlockd."""
    c = e2e.cluster
    place(e2e, "h1", {"ls-vm": False})
    xml = Path(c.lab.spec.shared_dir) / "vms" / "ls-vm.xml"
    disk = f"{c.lab.spec.shared_dir}/disks/ls-vm.img"

    def probe(host: str) -> dict[str, Any]:
        out = c.lab.exec(host, [sys.executable, "-m", "kvmha.agent.lease", "--domain-xml", str(xml)])
        report: dict[str, Any] = json.loads(out.stdout)
        return report

    held = probe("h2")
    assert held["state"] == "held", held
    [lease] = held["disks"]
    assert lease["disk_path"] == disk
    assert lease["lease_path"] == f"{c.lab.spec.shared_dir}/leases/{hashlib.sha256(disk.encode()).hexdigest()}"
    assert lease["holder_pid"] == 0, "another host's virtlockd is not visible from h2's PID namespace"
    virtlockd = proc.info(c.lab.services("h1")["virtlockd"])
    assert virtlockd is not None
    own = probe("h1")
    assert own["state"] == "held" and own["disks"][0]["holder_pid"] == virtlockd.ns_pid, own
    c.lab.virsh("h1", "destroy", "ls-vm")
    freed = probe("h2")
    assert freed["state"] == "free", freed


# ---------------------------------------------------------------------------------------------- resets


def test_a_killed_agent_resets_its_host_within_the_device_timeout(e2e: E2E) -> None:
    c = e2e.cluster
    victim = "h1"
    pids = place(e2e, victim, {"wk-ha": True})
    _armed(e2e, victim)
    watch = Timeline(c.lab)
    with watch:
        killed_at = time.time()
        watchdog.crash_agent(c.lab, victim)
        reset_at = _reset_within(e2e, victim, killed_at, DEVICE_S - 1.0, DEVICE_S + SLACK_S)
        assert not pid_alive(pids["wk-ha"]), "the VM's QEMU survived its host's reset"
        last = watch.last("wk-ha", victim)
        assert last is not None and last <= reset_at, "the old QEMU ran after the reset"
        _settle(e2e)
    _no_duplicates(e2e, watch)


def test_a_frozen_agent_resets_its_host_within_its_watchdog_timeout(e2e: E2E) -> None:
    c = e2e.cluster
    victim = "h2"
    pids = place(e2e, victim, {"wf-ha": True})
    _armed(e2e, victim)
    watch = Timeline(c.lab)
    with watch:
        frozen_at = time.time()
        c.lab.fail(victim, "agent-freeze")
        # The last pet came up to one pet interval (0.8 s) before the SIGSTOP.
        _reset_within(e2e, victim, frozen_at, TIMEOUT_S - 1.5, TIMEOUT_S + SLACK_S)
        assert not pid_alive(pids["wf-ha"])
        _settle(e2e)
    _no_duplicates(e2e, watch)


def test_the_watchdog_daemon_killed_resets_its_host(e2e: E2E) -> None:
    c = e2e.cluster
    victim = "h3"
    pids = place(e2e, victim, {"wd-ha": True})
    _armed(e2e, victim)
    watch = Timeline(c.lab)
    with watch:
        killed_at = time.time()
        c.lab.fail(victim, "watchdog")
        _reset_within(e2e, victim, killed_at, DEVICE_S - 1.0, DEVICE_S + SLACK_S)
        assert not pid_alive(pids["wd-ha"])
        _settle(e2e)
    _no_duplicates(e2e, watch)


# ---------------------------------------------------------------------------------------------- no resets


def test_an_agent_restarted_within_the_device_timeout_takes_over_without_a_reset(e2e: E2E) -> None:
    """systemd's Restart=always (RestartSec=1) modelled by the host's init: the new agent arms the same identity
    before the device fires and continues; the host and its VM run on, never fenced."""
    c = e2e.cluster
    victim = "h1"
    pids = place(e2e, victim, {"wr-ha": True})
    _armed(e2e, victim)
    watch = Timeline(c.lab)
    with watch:
        crashed_at = time.time()
        watchdog.crash_agent(c.lab, victim, restart_after_s=1.0)

        def still_fine() -> str | None:
            if watchdog.resets(c.lab, victim) and float(watchdog.resets(c.lab, victim)[-1]["at"]) >= crashed_at:
                return f"{victim} was reset"
            return None if qemu_pids(c).get("wr-ha") == (victim, pids["wr-ha"]) else "the VM's QEMU changed"

        hold(e2e, TIMEOUT_S + 2.0, still_fine)
    _no_duplicates(e2e, watch)
    _armed(e2e, victim)
    log = _agent_log(e2e, victim)
    assert "event=watchdog_takeover" in log and "takeover=True" in log, log[-3000:]
    assert not e2e.host_events(victim, "-> Fencing"), e2e.story()


def test_a_clean_agent_stop_disarms_and_the_host_runs_on(e2e: E2E) -> None:
    c = e2e.cluster
    victim = "h2"
    pids = place(e2e, victim, {"ws-ha": True})
    _armed(e2e, victim)
    stopped_at = time.time()
    watchdog.stop_agent(c.lab, victim)
    assert "event=watchdog_disarmed confirmed=True" in _agent_log(e2e, victim)
    wait_manager(e2e, lambda: watchdog.device_state(c.lab, victim).get("running") is False,
                 "the device stopped (magic close)", 5)
    status = watchdog.daemon_status(c.lab, victim)
    assert status["clients"] == [] and not status["device_open"], status
    hold(e2e, TIMEOUT_S + 2.0, lambda: None if pid_alive(pids["ws-ha"]) else "the VM died")
    _no_reset(e2e, victim, stopped_at)


def test_a_hung_libvirtd_on_a_connected_host_is_reported_not_reset(e2e: E2E) -> None:
    """libvirtd stopped (SIGSTOP): the agent's libvirt keepalive gives up, it reports the hypervisor lost and the
    manager shows the VM PowerUnknown; the agent's loop runs on and keeps petting: no reset."""
    c = e2e.cluster
    victim = "h3"
    pids = place(e2e, victim, {"wl-ha": True})
    _armed(e2e, victim)
    watch = Timeline(c.lab)
    with watch:
        hung_at = time.time()
        c.lab.fail(victim, "libvirtd-hang")
        assert "libvirtd-hang" in c.lab.faults(victim)
        wait_manager(e2e, lambda: vm_is(e2e, "wl-ha", "Running", victim, "PowerUnknown"), "the VM PowerUnknown", 40)
        hold(e2e, max(0.0, hung_at + TIMEOUT_S + 3.0 - time.time()),
             lambda: None if pid_alive(pids["wl-ha"]) else "the VM died")
        assert watchdog.daemon_status(c.lab, victim)["petting"] is True
        _no_reset(e2e, victim, hung_at)
    _no_duplicates(e2e, watch)


# ---------------------------------------------------------------------------------------------- isolation


def test_an_isolated_host_whose_libvirtd_hangs_is_reset_by_its_watchdog(e2e: E2E) -> None:
    """Cut from network and storage with libvirtd hung: the agent declares isolation after the manager's
    isolation.after (6 s, from Welcome; its own configuration says 30) plus its own link-loss detection (up to
    ~12 s: HTTP/2 keepalive), withholds its pets because the destroy cannot complete, and the watchdog resets the
    host TIMEOUT_S after its last pet: the VM's QEMU dies with the host. The host is Disabled with the seed's rule
    (ha.disabled.hosts=false) so that the manager neither fences it nor restarts its VM (maintenance would move the
    VM off first): this is the host alone keeping the promise."""
    c = e2e.cluster
    victim = "h1"
    pids = place(e2e, victim, {"wi-ha": True})
    _armed(e2e, victim)
    assert "event=isolation_after_changed from_s=30.0 to_s=6.0 source=manager" in _agent_log(e2e, victim)
    c.admin().SetConfig(apb.SetConfigRequest(name="ha.disabled.hosts", value="false"), timeout=10)
    try:
        e2e.enabled(victim, False)
        _isolated_host_reset(e2e, victim, pids)
    finally:
        c.admin().SetConfig(apb.SetConfigRequest(name="ha.disabled.hosts", value="true"), timeout=10)


def _isolated_host_reset(e2e: E2E, victim: str, pids: dict[str, int]) -> None:
    c = e2e.cluster
    faults: tuple[Fault, ...] = ("network", "storage", "libvirtd-hang")
    watch = Timeline(c.lab)
    with watch:
        cut_at = time.time()
        for fault in faults:
            c.lab.fail(victim, fault)
        reset_at = _reset_within(e2e, victim, cut_at, ISOLATION_AFTER_S + TIMEOUT_S - 3.0,
                                 ISOLATION_AFTER_S + 12.0 + TIMEOUT_S + SLACK_S)
        assert not pid_alive(pids["wi-ha"]), "the VM outlived its host's reset"
        last = watch.last("wi-ha", victim)
        assert last is not None and last <= reset_at
    _no_duplicates(e2e, watch)
    log = _agent_log(e2e, victim)
    assert "event=isolation_response policy=destroy-vms" in log and "event=watchdog_pets_withheld" in log, log[-3000:]
