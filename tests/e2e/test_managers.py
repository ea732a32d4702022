"""Three managers on the lab's own PostgreSQL, each in its own network namespace (issue 15), with the duplicate
sampler running: the lease holder fails while a host fails, and a standby finishes the recovery.

One lease holder acts on every host; the other two are standbys (kvmha.manager.lease). Each test powers a host with
two HA VMs off and, mid-recovery (the host is Down and the first restart is recorded), the holder fails:

- SIGKILLed: a standby takes the lease once it expired, owns every host and restarts the VMs;
- SIGSTOPped past its lease, then resumed after a standby recovered the VMs: whatever the old holder had decided
  before the pause must not act (its lease is gone; checked on the hosts: each VM's QEMU, from /proc, and libvirt's
  list stay as they were for a while after the resume);
- cut from the network (both its cables: lab bridge and BMC network): it reaches neither its agents, nor the
  database, nor the BMCs; a standby takes over; once the cable is back, the old holder steps down.

Each test asserts, from the hosts: no VM ran on two hosts at once (the sampler), no healthy host was fenced (their
PID 1 is the same process as before and their BMC says on), and the failed host's HA VMs run exactly once elsewhere.
The module shares one lab (3 hosts, 3 managers); a test leaves it with the failed manager back as a standby.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from kvmha.lab.harness import LabCluster
from kvmha.lab.wait import wait_for

from .conftest import (
    AGENT_SETTINGS,
    DECISION_WINDOW_S,
    E2E,
    FAST_CONFIG,
    SharedCluster,
    Timeline,
    e2e_test,
    hold,
    libvirt_running,
    place,
    qemu_pids,
    shared_cluster,
    vm_is,
    wait_manager,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow]

MANAGERS = 3
VICTIM = "h1"
TAKEOVER_S = 60.0  # generous: lease (6 s) + agents' reconnect + the new holder's start-up grace + the restarts
AFTER_RESUME_S = 10.0  # longer than anything the old holder had queued would need to leave and act


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCluster]:
    with shared_cluster(tmp_path_factory, FAST_CONFIG, AGENT_SETTINGS, managers=MANAGERS) as cluster:
        yield cluster


@pytest.fixture
def e2e(shared: SharedCluster) -> Iterator[E2E]:
    with e2e_test(shared) as test:
        yield test


def _healthy_inits(c: LabCluster) -> dict[str, int]:
    """Host -> PID of its init, for every host but the victim: a fence (power cycle) would change it."""
    inits = {h.name: c.lab.init(h.name) for h in c.lab.hosts if h.name != VICTIM}
    assert all(inits.values()), inits
    return {name: init.pid for name, init in inits.items() if init is not None}


def _start_failure(e2e: E2E, names: list[str]) -> str:
    """Two HA VMs on the victim; power it off and return the holder the moment its recovery is under way: the
    victim is Down and the first restart is recorded (the start command is leaving or about to, persist first)."""
    c = e2e.cluster
    place(e2e, VICTIM, dict.fromkeys(names, True))
    holder = c.acting.manager_id
    off_at = time.time()
    c.lab.power(VICTIM, "off", wait=False)
    try:
        wait_for(lambda: e2e.starts_of(names, off_at), DECISION_WINDOW_S + 5, f"{VICTIM}'s VMs restarting",
                 interval_s=0.02)
    except TimeoutError as error:
        pytest.fail(f"{error}{e2e.story()}")
    return holder


def _mid_recovery(e2e: E2E, names: list[str], at: float) -> None:
    """The old holder had not finished the recovery at `at` (when it was killed, paused or cut): not every VM was
    recorded running elsewhere by then."""
    done = [n for n in names for e in e2e.events()
            if e.kind == "work.done" and e.message.startswith(f"Done: {n} runs on ") and e.at < at
            and not e.message.startswith(f"Done: {n} runs on {VICTIM}")]
    assert len(done) < len(names), f"the recovery was over before the fault{e2e.story()}"


def _recovered(e2e: E2E, names: list[str], not_: str) -> dict[str, str]:
    """A standby took over (admin calls follow it) and every VM runs once, elsewhere, in the hosts and the manager."""
    c = e2e.cluster
    try:
        c.follow_holder(TAKEOVER_S, not_=not_)
        placed = c.wait_running(names, TAKEOVER_S, not_on=VICTIM)
    except TimeoutError as error:
        pytest.fail(f"{error}{e2e.story()}")
    wait_manager(e2e, lambda: all(vm_is(e2e, n, "Running", placed[n], "PowerOn") for n in names),
                 "the new holder: the VMs Running elsewhere")
    return placed


def _check(e2e: E2E, watch: Timeline, names: list[str], healthy: dict[str, int], placed: dict[str, str]) -> None:
    c = e2e.cluster
    assert watch.samples >= 10, f"the watcher did not run ({watch.samples} samples)"
    assert not watch.duplicates, f"a VM ran on two hosts at once: {watch.duplicates[:5]}{e2e.story()}"
    for host, pid in healthy.items():  # no healthy host fenced: same PID 1, power on, no fence recorded
        init = c.lab.init(host)
        assert init is not None and init.pid == pid, f"{host} was power-cycled{e2e.story()}"
        assert c.lab.power_state(host) == "on"
        assert not e2e.host_events(host, "-> Fencing"), f"{host} was fenced{e2e.story()}"
    running = libvirt_running(c)
    where = c.where()
    for name in names:  # once, where the manager says, by /proc and by that host's libvirt
        assert where.get(name) == [placed[name]], (name, where)
        assert [h for h, vms in running.items() if name in vms] == [placed[name]], (name, running)
    assert c.lab.power_state(VICTIM) == "off", "the failed host was powered on again"


def _still(c: LabCluster, before: dict[str, tuple[str, int]]) -> str | None:
    now = qemu_pids(c)
    moved = {name: now.get(name) for name in before if now.get(name) != before[name]}
    return f"a VM's QEMU changed: {moved} (was {before})" if moved else None


def test_holder_killed_mid_recovery_a_standby_finishes_it(e2e: E2E) -> None:
    c = e2e.cluster
    names = ["mk-ha1", "mk-ha2"]
    healthy = _healthy_inits(c)
    with Timeline(c.lab) as watch:
        holder = _start_failure(e2e, names)
        c.manager_named(holder).kill_manager()
        killed_at = time.time()
        placed = _recovered(e2e, names, holder)
        hold(e2e, 5.0, lambda: None)
    _check(e2e, watch, names, healthy, placed)
    _mid_recovery(e2e, names, killed_at)
    assert c.acting.manager_id != holder
    c.lab.power(VICTIM, "on")
    c.wait_hosts_up([VICTIM], 90)


def test_holder_paused_past_its_lease_acts_on_nothing_when_resumed(e2e: E2E) -> None:
    c = e2e.cluster
    names = ["mp-ha1", "mp-ha2"]
    healthy = _healthy_inits(c)
    with Timeline(c.lab) as watch:
        holder = _start_failure(e2e, names)
        paused = c.manager_named(holder)
        assert paused.manager is not None
        os.kill(paused.manager.pid, signal.SIGSTOP)
        paused_at = time.time()
        try:
            placed = _recovered(e2e, names, holder)
        finally:
            os.kill(paused.manager.pid, signal.SIGCONT)
        before = qemu_pids(c)
        wait_manager(e2e, lambda: "event=lease_lost" in paused.manager_log_tail(400), f"{holder} stepping down")
        hold(e2e, AFTER_RESUME_S, lambda: _still(c, before))
    _check(e2e, watch, names, healthy, placed)
    _mid_recovery(e2e, names, paused_at)
    assert c.acting.manager_id != holder
    view = c.lease_view()
    assert view is not None and view.lease_holder == c.acting.manager_id
    assert [m.holds_lease for m in view.managers].count(True) == 1, view
    c.lab.power(VICTIM, "on")
    c.wait_hosts_up([VICTIM], 90)


def test_holder_cut_from_the_network_a_standby_takes_over(e2e: E2E) -> None:
    c = e2e.cluster
    names = ["mc-ha1", "mc-ha2"]
    healthy = _healthy_inits(c)
    with Timeline(c.lab) as watch:
        holder = _start_failure(e2e, names)
        c.lab.cut_manager(holder)
        cut_at = time.time()
        try:
            placed = _recovered(e2e, names, holder)
            before = qemu_pids(c)
            hold(e2e, 5.0, lambda: _still(c, before))
        finally:
            c.lab.cut_manager(holder, False)
        cut = c.manager_named(holder)
        wait_manager(e2e, lambda: "event=lease_lost" in cut.manager_log_tail(400), f"{holder} stepping down")
        hold(e2e, AFTER_RESUME_S, lambda: _still(c, before))
    _check(e2e, watch, names, healthy, placed)
    _mid_recovery(e2e, names, cut_at)
    view = c.lease_view()
    assert view is not None and view.lease_holder == c.acting.manager_id != holder, view
    c.lab.power(VICTIM, "on")
    c.wait_hosts_up([VICTIM], 90)
