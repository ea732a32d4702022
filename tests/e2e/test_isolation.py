"""Hosts the manager cannot fence (issue 7 points 4 and 6): their BMC is dead, so only time proves them dead — and
only because a watchdog guarantees the self-fence (issue 11).

Every lab host has a hardware watchdog (device timeout 4 s; the agents arm kvmha-watchdog with 8 s). The agents run
the isolation response destroy-vms after 8 s without both the manager and their storage heartbeat (agent setting
isolation.after_s); the manager is told the same (isolation.after 8), adds the watchdog's bound (8 s) and a margin of
3 s: a silent, unreachable host without a working BMC is taken for dead only once its heartbeat is stale for 19 s and
its agent silent for that + isolation.link.slack (3 s), and never earlier. fence.timeout is short (5 s) so that a
fence attempt on a dead BMC fails fast; the lab's BMC answers a working power-off in about 2 s.

The hypervisor's own guard — a start of an already running VM's disk on another host refused by virtlockd, tried
directly with virsh — is tested in tests/lab/test_power.py
(test_virtlockd_refuses_a_second_start_and_a_dead_host_releases_the_lease).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kvmha.lab.harness import LabCluster

from ..lab.conftest import caps_cache
from .conftest import (
    AGENT_SETTINGS,
    E2E,
    E2E_PREFIX,
    E2E_SUBNET,
    FAST_CONFIG,
    SharedCluster,
    Timeline,
    e2e_test,
    place,
    vm_is,
    wait_manager,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ISOLATION_AFTER_S = 8.0
MARGIN_S = 3.0
DEVICE_S = 4  # the lab watchdog device's timeout
WATCHDOG_S = 2.0 * DEVICE_S  # the agents' watchdog.timeout_s (the lab's default: twice the device's)
CONFIG = {
    **FAST_CONFIG,
    "isolation.after": str(ISOLATION_AFTER_S),
    "isolation.margin": str(MARGIN_S),
    "isolation.link.slack": "3",
    "fence.timeout": "5",
}
AGENTS = {**AGENT_SETTINGS, "isolation.policy": "destroy-vms", "isolation.after_s": ISOLATION_AFTER_S}


class WatchdogCluster(SharedCluster):
    """Without a watchdog a lab host's silence proves nothing (it would wait in Alert for the operator)."""

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


def _restarted_not_before_the_bound(
    e2e: E2E, watch: Timeline, names: list[str], victim: str, cut_at: float, settled_at: float
) -> None:
    """The manager's last ping from the host came while the faults were being made (a power-off takes ~1.5 s, the
    pings come every second), and no VM of the host started anywhere before last ping + isolation.after + the
    watchdog's bound + margin."""
    c = e2e.cluster
    last_ping = c.hosts()[victim].last_ping_at
    assert cut_at - 1.5 <= last_ping <= settled_at + 0.5, (
        f"last ping {last_ping - cut_at:+.1f} s from the cut, faults done after {settled_at - cut_at:.1f} s"
        f"{e2e.story()}"
    )
    bound = last_ping + ISOLATION_AFTER_S + WATCHDOG_S + MARGIN_S
    starts = e2e.starts_of(names, cut_at)
    assert len(starts) == len(names), e2e.story()
    for start in starts:
        assert start.at >= bound, f"started {bound - start.at:.1f} s before the self-fence bound{e2e.story()}"
    placed = c.where()
    for name in names:
        [host] = placed[name]
        appeared = watch.first(name, host)
        assert appeared is not None and appeared >= bound, f"{name} ran on {host} before the bound{e2e.story()}"
    assert not e2e.host_events(victim, "-> Fenced"), f"a dead BMC cannot confirm a fence{e2e.story()}"
    assert not watch.duplicates, f"a VM ran on two hosts at once: {watch.duplicates[:5]}{e2e.story()}"
    print(f"restarted {min(s.at for s in starts) - last_ping:.1f} s after the last ping (bound {bound - last_ping} s)")


def test_host_dead_with_its_bmc_is_waited_out_then_its_vms_restart(e2e: E2E) -> None:
    """The host loses power together with its BMC (`fail bmc` then `fail power`: nobody can confirm it is off; in the
    other order the manager, which asks the BMC the moment the link breaks, may rightly hear "off" in between).
    The manager cannot fence; it restarts the VMs only once the host's heartbeat has been stale and its agent
    silent for isolation.after + watchdog bound + margin (19 s) since its last ping — not before — and then does.
    (The lab's power supply takes the host's eth0 down with its power, so the neighbours no longer reach it, as with
    a real host.)"""
    c = e2e.cluster
    victim = "h1"
    names = ["bd-ha1", "bd-ha2"]
    place(e2e, victim, dict.fromkeys(names, True))

    with Timeline(c.lab) as watch:
        cut_at = time.time()
        c.lab.fail(victim, "bmc")
        c.lab.fail(victim, "power")
        settled_at = time.time()
        assert c.lab.faults(victim) == ["bmc", "power"]
        try:
            placed = c.wait_running(names, 60, not_on=victim)
        except TimeoutError as error:
            pytest.fail(f"{error}{e2e.story()}")
    _restarted_not_before_the_bound(e2e, watch, names, victim, cut_at, settled_at)
    assert e2e.host_events(victim, "stale-long") and e2e.host_events(victim, "reach=unreached"), e2e.story()
    wait_manager(e2e, lambda: all(vm_is(e2e, n, "Running", placed[n], "PowerOn") for n in names), "VMs Running")


def test_isolated_host_with_a_dead_bmc_self_fences_before_the_manager_restarts_its_vms(e2e: E2E) -> None:
    """A running host cut from the network and its storage, with a dead BMC: the manager cannot fence it and
    cannot tell whether it runs. Its agent, having lost the manager and its storage heartbeat for isolation.after
    (8 s), destroys its VMs (policy destroy-vms); the manager waits isolation.after + the watchdog's bound + margin
    from the last ping and only then restarts them elsewhere. The old QEMUs are gone before the new ones start, the
    host itself stays powered on (nobody fenced it, the watchdog did not fire: the response completed in time), and no
    VM ever runs twice."""
    c = e2e.cluster
    victim = "h2"
    names = ["is-ha1", "is-ha2"]
    place(e2e, victim, dict.fromkeys(names, True))

    with Timeline(c.lab) as watch:
        cut_at = time.time()
        c.lab.fail(victim, "bmc")
        c.lab.fail(victim, "network")
        c.lab.fail(victim, "storage")
        settled_at = time.time()
        try:
            placed = c.wait_running(names, 60, not_on=victim)
        except TimeoutError as error:
            pytest.fail(f"{error}{e2e.story()}")
    _restarted_not_before_the_bound(e2e, watch, names, victim, cut_at, settled_at)
    for name in names:
        gone, appeared = watch.last(name, victim), watch.first(name, placed[name])
        assert gone is not None and appeared is not None and gone < appeared, watch.seen
        # The agent waited its isolation time before destroying anything: counted from its last heartbeat write
        # (every second, so up to 1 s before the cut); the watcher samples every 0.1 s.
        assert gone - cut_at >= ISOLATION_AFTER_S - 1.5, f"{name} destroyed {gone - cut_at:.1f} s after the cut"
        assert c.lab.domstate(victim, name)[0] == "shut off"
    assert c.lab.init(victim) is not None, "the isolated host lost its power: it should have run on"
    wait_manager(e2e, lambda: all(vm_is(e2e, n, "Running", placed[n], "PowerOn") for n in names), "VMs Running")
