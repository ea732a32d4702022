"""Issue 11's silent hosts on real hosts with the manager's rules at work (no host in maintenance): every lab host
has a hardware watchdog driven by kvmha-watchdog and a BMC; the real manager decides; every host's QEMUs are
sampled throughout (Timeline, the lab's DuplicateWatch: never two copies), and outcomes are read from the hosts.

- the agent killed on a host cut off from the network: the watchdog resets the host, the manager fences it through
  its BMC; its HA VM runs elsewhere only after the reset or the fence;
- the agent frozen (SIGSTOP) on an isolated host whose BMC is dead: only the watchdog can act; it resets the host;
  the rebooted host writes its heartbeat again (alive, unreachable), so its VM is restarted once the network is
  back and the host reports it gone — never before the reset;
- libvirtd hung on an isolated host (network and storage cut): the isolation response cannot complete, the watchdog
  resets the host and/or the manager fences it; the VM runs elsewhere only after that;
- a VM whose disk lease is still held (the watchdog broken, the host cut off with libvirtd hung, its BMC dead): the
  lease keeps it from starting elsewhere, with an event that says so;
- a host without a watchdog and without a working BMC, cut off from the network and its storage: nothing proves it
  dead: it stays Alert (looked at again every few seconds) with an operator alert, its VM is started nowhere else.

(The watchdog daemon killed, the agent killed or frozen on a connected host and a lease read from another host are
in test_self_fence.py.) One lab for the module, healed between tests; each test ~20-45 s.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmha.lab import proc, watchdog
from kvmha.lab.state import LabError
from kvmha.lab.wait import TRANSIENT_ERRORS, wait_for

from .conftest import E2E, SharedCluster, Timeline, e2e_test, hold, place, wait_manager
from .test_self_fence import AGENTS, CONFIG, DEVICE_S, SLACK_S, TIMEOUT_S, WatchdogCluster, _armed, _no_duplicates

pytestmark = [pytest.mark.lab, pytest.mark.slow]

RESTART_WITHIN_S = 60.0


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


def _proof_at(e2e: E2E, victim: str, since: float) -> float | None:
    """When the victim was first reset by its watchdog or confirmed off by a fence, after `since`."""
    times = [float(r["at"]) for r in watchdog.resets(e2e.lab, victim) if float(r["at"]) >= since]
    times += [e.at for e in e2e.host_events(victim, "-> Fenced") if e.at >= since]
    return min(times, default=None)


def _runs_elsewhere_only_after_proof(e2e: E2E, watch: Timeline, vm: str, victim: str, since: float) -> str:
    """Wait until the VM's QEMU runs on another host; its first sample there must come after the victim was reset or
    fenced. Returns the new host."""
    def elsewhere() -> str | None:
        return next((h for h in watch.hosts_of(vm) if h != victim), None)

    try:
        new_host = wait_for(elsewhere, RESTART_WITHIN_S, f"{vm} running on a host other than {victim}", 0.2)
    except TimeoutError:
        pytest.fail(f"{vm} was not restarted elsewhere within {RESTART_WITHIN_S:.0f} s{e2e.story()}")
    first = watch.first(vm, new_host)
    proof = _proof_at(e2e, victim, since)
    assert first is not None and proof is not None and proof <= first, (
        f"{vm} started on {new_host} at +{(first or 0) - since:.1f} s, before {victim} was reset or fenced "
        f"({'never' if proof is None else f'+{proof - since:.1f} s'}){e2e.story()}")
    print(f"{vm}: {victim} reset/fenced at +{proof - since:.2f} s, {vm} on {new_host} at +{first - since:.2f} s")
    return new_host


def test_the_agent_killed_on_a_host_cut_off_is_reset_or_fenced_before_its_vm_runs_elsewhere(e2e: E2E) -> None:
    c = e2e.cluster
    victim = "h1"
    place(e2e, victim, {"sa-ha": True})
    _armed(e2e, victim)
    watch = Timeline(c.lab)
    with watch:
        since = time.time()
        c.lab.fail(victim, "network")
        watchdog.crash_agent(c.lab, victim)
        reset = watchdog.wait_reset(c.lab, victim, since, DEVICE_S + SLACK_S + 5)
        assert reset is not None, f"{victim} was not reset after its agent died{e2e.story()}"
        _runs_elsewhere_only_after_proof(e2e, watch, "sa-ha", victim, since)
    _no_duplicates(e2e, watch)


def test_a_frozen_agent_on_an_isolated_host_with_a_dead_bmc_is_reset_before_its_vm_runs_elsewhere(e2e: E2E) -> None:
    c = e2e.cluster
    victim = "h2"
    place(e2e, victim, {"sf-ha": True})
    _armed(e2e, victim)
    watch = Timeline(c.lab)
    with watch:
        since = time.time()
        for fault in ("bmc", "network", "agent-freeze"):
            c.lab.fail(victim, fault)
        reset = watchdog.wait_reset(c.lab, victim, since, TIMEOUT_S + SLACK_S + 5)
        assert reset is not None, f"{victim} was not reset after its agent froze{e2e.story()}"
        # Rebooted, cut off, writing its heartbeat: alive to the manager, which cannot know the VM died with the
        # reset. Nothing may start it elsewhere meanwhile (the BMC cannot fence, no reachable agent reports it).
        hold(e2e, CONFIG_DECISION_S, lambda: _started_elsewhere(watch, "sf-ha", victim))
        c.lab.heal(victim)  # the network and the BMC come back: the agent reports the VM gone
        _runs_elsewhere_or_again(e2e, watch, "sf-ha", victim, float(reset["at"]))
    _no_duplicates(e2e, watch)


def test_libvirtd_hung_on_an_isolated_host_is_reset_or_fenced_before_its_vm_runs_elsewhere(e2e: E2E) -> None:
    c = e2e.cluster
    victim = "h3"
    place(e2e, victim, {"sl-ha": True})
    _armed(e2e, victim)
    watch = Timeline(c.lab)
    with watch:
        since = time.time()
        for fault in ("network", "storage", "libvirtd-hang"):
            c.lab.fail(victim, fault)
        _runs_elsewhere_only_after_proof(e2e, watch, "sl-ha", victim, since)
    _no_duplicates(e2e, watch)


def test_a_host_without_watchdog_or_bmc_cut_off_stays_alert_and_nothing_is_restarted(e2e: E2E) -> None:
    c = e2e.cluster
    victim = "h1"
    toml = Path(c.lab.host(victim).dir) / "agent.toml"
    original = toml.read_text()
    try:
        without = original.replace("[watchdog]\nenabled = true", "[watchdog]\nenabled = false")
        assert without != original, original
        _restart_agent(e2e, victim, without)
        place(e2e, victim, {"sn-ha": True})
        assert watchdog.daemon_status(c.lab, victim)["clients"] == [], "the agent armed a watchdog after all"
        watch = Timeline(c.lab)
        with watch:
            # Cut from the manager, its neighbours and the storage (its heartbeat goes stale), BMC dead: the old
            # rule took such a host for dead once its heartbeat was stale past the self-fence time.
            for fault in ("bmc", "network", "storage"):
                c.lab.fail(victim, fault)
            wait_manager(e2e, lambda: c.hosts()[victim].status == "Alert", f"{victim} in Alert", 30)
            # Well beyond the time a watchdog-backed host would have been declared dead by silence. (The agent's
            # own isolation response may destroy the VM meanwhile: that proves nothing to the manager either.)
            hold(e2e, float(CONFIG["isolation.after"]) + TIMEOUT_S + 15.0,
                 lambda: _started_elsewhere(watch, "sn-ha", victim) or _not_dead(e2e, victim))
        _no_duplicates(e2e, watch)
        subject = f"host:{e2e.host_id(victim)}"
        assert any(e.kind == "host.needs.operator" and e.subject == subject for e in e2e.events()), e2e.story()
    finally:
        c.lab.heal(victim)
        _restart_agent(e2e, victim, original)


def test_a_disk_lease_still_held_keeps_the_vm_from_starting_elsewhere(e2e: E2E) -> None:
    """The watchdog that backs the self-fence is broken (its hardware frozen: it can no longer reset the host), the
    host is cut from network and storage with libvirtd hung (its isolation response cannot destroy the VM) and its
    BMC is dead. Silence would call it dead once the armed watchdog's bound has passed; the VM's disk lease, read by
    a neighbour, is still held by the QEMU that runs on: the manager starts it nowhere else and says why."""
    c = e2e.cluster
    victim = "h2"
    pids = place(e2e, victim, {"sk-ha": True})
    _armed(e2e, victim)
    supply = c.lab.bmc(victim).host_pid  # the host's power supply, which carries its hardware watchdog
    assert supply is not None
    supply_start = proc.start_ticks(supply)
    assert supply_start is not None
    watch = Timeline(c.lab)
    try:
        with watch:
            proc.kill(supply, supply_start, signal.SIGSTOP)  # our own lab process, by PID and start time
            for fault in ("bmc", "network", "storage", "libvirtd-hang"):
                c.lab.fail(victim, fault)
            subject = e2e.vm_subject("sk-ha")

            def lease_held() -> bool:
                return any(e.kind == "vm.lease.held" and e.subject == subject for e in e2e.events())

            wait_manager(e2e, lease_held, "the manager to read sk-ha's lease held", 75)
            hold(e2e, 5.0, lambda: _started_elsewhere(watch, "sk-ha", victim) or _not_dead(e2e, victim)
                 or (None if proc.info(pids["sk-ha"]) is not None else "the VM's QEMU died"))
        _no_duplicates(e2e, watch)
    finally:
        proc.kill(supply, supply_start, signal.SIGCONT)  # the watchdog fires now: the host is reset
        _heal_until_up(e2e, victim)


def _heal_until_up(e2e: E2E, host: str) -> None:
    """Heal until the manager has the host Up again: a fence retried while the BMC comes back may still power the
    host off after a first heal (then it is powered on again)."""
    c = e2e.cluster

    def up() -> bool:
        if c.lab.faults(host):
            c.lab.heal(host)
        return c.hosts()[host].status == "Up"

    # A heal that the fence undoes under it ends in LabError ("still faulty after heal: ['power']"): heal again.
    wait_for(up, 120, f"{host} healed and Up", 2.0, tolerate=(LabError, *TRANSIENT_ERRORS))


# ---------------------------------------------------------------------------------------------- helpers

CONFIG_DECISION_S = float(CONFIG["ping.timeout"]) + float(CONFIG["investigation.timeout"]) + 4.0


def _started_elsewhere(watch: Timeline, vm: str, victim: str) -> str | None:
    other = sorted(h for h in watch.hosts_of(vm) if h != victim)
    return f"{vm} started on {other} while nothing proved {victim} dead" if other else None


def _not_dead(e2e: E2E, victim: str) -> str | None:
    """Alert, looked at again (Investigating), or a fence tried through its dead BMC (Fencing, which fails): never
    Down or Fenced."""
    status = e2e.cluster.hosts()[victim].status
    return None if status in ("Alert", "Investigating", "Fencing") else f"{victim} is {status}: taken for dead"


def _runs_elsewhere_or_again(e2e: E2E, watch: Timeline, vm: str, victim: str, reset_at: float) -> None:
    """After the reset, the VM runs again (on any host, a new QEMU) and every copy started after the reset."""
    def again() -> bool:
        return any((watch.first(vm, h) or 0) > reset_at for h in watch.hosts_of(vm))

    try:
        wait_for(again, RESTART_WITHIN_S, f"{vm} running again after {victim}'s reset", 0.2)
    except TimeoutError:
        pytest.fail(f"{vm} not running again within {RESTART_WITHIN_S:.0f} s of the heal{e2e.story()}")
    for host in watch.hosts_of(vm):
        if host != victim:
            first = watch.first(vm, host)
            assert first is not None and first > reset_at, f"{vm} ran on {host} before the reset{e2e.story()}"


def _restart_agent(e2e: E2E, host: str, config: str) -> None:
    """A planned stop (Goodbye, clean disarm), the new configuration, and the host's init starts the agent again."""
    c = e2e.cluster
    watchdog.stop_agent(c.lab, host)
    (Path(c.lab.host(host).dir) / "agent.toml").write_text(config)
    c.lab.heal(host)  # the init (SIGHUP) starts the missing agent
    c.wait_hosts_up([host], 60)
