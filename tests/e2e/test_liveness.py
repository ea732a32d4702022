"""Liveness end to end (issue 12 point 5): no HA VM is left down while a host can take it, under compound faults.

One lab of four hosts for the module (with three, two hosts down trips the mass-failure guard by design), the real
manager on product flap settings (`flap.max.failures` 3 in `flap.window` 600 s, unlike the other e2e modules), the
duplicate sampler running through every fault. Every outcome is read on the hosts: each HA VM runs as exactly one
QEMU (/proc) that its host's libvirtd lists as running (virsh).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kvmha.lab.wait import wait_for

from .conftest import (
    AGENT_SETTINGS,
    E2E,
    FAST_CONFIG,
    SharedCluster,
    Timeline,
    e2e_test,
    libvirt_running,
    place,
    wait_manager,
)

pytestmark = [pytest.mark.lab, pytest.mark.slow]

# Product flap settings; the rest as the other e2e modules (fast detection). The agents' isolation response is
# later than any recovery here: VMs that stop are stopped by a power loss or a fence.
CONFIG = {**FAST_CONFIG, "flap.max.failures": "3", "flap.window": "600", "isolation.after": "20",
          "isolation.margin": "5"}  # fmt: skip
AGENTS = {**AGENT_SETTINGS, "isolation.policy": "destroy-vms", "isolation.after_s": 20.0}
HOSTS = ["h1", "h2", "h3", "h4"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCluster]:
    cluster = SharedCluster(tmp_path_factory, dict(CONFIG), dict(AGENTS), hosts=len(HOSTS))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def e2e(shared: SharedCluster) -> Iterator[E2E]:
    with e2e_test(shared) as test:
        yield test


def _runs_once_everywhere(e2e: E2E, names: list[str], not_on: set[str], timeout_s: float) -> dict[str, str]:
    """Each VM runs as one QEMU on a host outside `not_on`, and that host's libvirtd lists it running."""
    c = e2e.cluster

    def placed() -> dict[str, str] | None:
        where = c.where()
        hosts = {name: where.get(name, []) for name in names}
        if any(len(h) != 1 or h[0] in not_on for h in hosts.values()):
            return None
        listed = libvirt_running(c)
        if not all(name in listed.get(h[0], set()) for name, h in hosts.items()):
            return None
        return {name: h[0] for name, h in hosts.items()}

    try:
        return wait_for(placed, timeout_s, f"{names} running once, not on {sorted(not_on)}", interval_s=0.3)
    except TimeoutError as error:
        pytest.fail(f"{error}; where: {c.where()}{e2e.story()}")


def _no_duplicates(e2e: E2E, watch: Timeline) -> None:
    assert watch.samples >= 3, f"the watcher did not run ({watch.samples} samples)"
    assert not watch.duplicates, f"a VM ran on two hosts at once: {watch.duplicates[:5]}{e2e.story()}"


def test_cascade_the_restart_target_loses_power_right_after_it_was_chosen(e2e: E2E) -> None:
    """h1 loses power; the moment the manager records one of its VMs Starting on another host, that host loses power
    too. The start there has an unknown outcome; once that host is proven dead the VM is placed again at once: every
    HA VM runs again on the two hosts left."""
    c = e2e.cluster
    names = ["cs-ha1", "cs-ha2"]
    place(e2e, "h1", dict.fromkeys(names, True))
    with Timeline(c.lab) as watch:
        c.lab.power("h1", "off")

        def target() -> str | None:
            vms = c.vms()
            chosen = [vms[n].host for n in names if n in vms and vms[n].state == "Starting" and vms[n].host != "h1"]
            return chosen[0] if chosen else None

        try:
            second = wait_for(target, 30, "a restart target chosen for h1's VMs", interval_s=0.05)
        except TimeoutError as error:
            pytest.fail(f"{error}{e2e.story()}")
        c.lab.power(second, "off")
        placed = _runs_once_everywhere(e2e, names, {"h1", second}, 60)
    _no_duplicates(e2e, watch)
    wait_manager(e2e, lambda: all(c.vms()[n].state == "Running" for n in names), "the manager: all Running")
    print(f"cascade: h1 and then its restart target {second} lost power; VMs now on {placed}")


def _incident(e2e: E2E, hosts: list[str]) -> None:
    """Cut these hosts' network until the manager has them silent, then heal and wait for them Up again."""
    c = e2e.cluster
    for host in hosts:
        c.lab.fail(host, "network")
    wait_manager(
        e2e,
        lambda: all(c.hosts()[h].status in ("Investigating", "Alert", "Fencing") for h in hosts),
        f"{hosts} silent in the manager",
    )
    for host in hosts:
        c.lab.heal(host)
    try:
        c.wait_hosts_up(hosts, 40)
    except TimeoutError as error:
        pytest.fail(f"{error}{e2e.story()}")


def test_power_loss_after_three_incidents_on_every_surviving_host(e2e: E2E) -> None:
    """h2, h3 and h4 each lose their network three times (two hosts at once at most: not a mass incident), so the
    manager marks each of them flapping. Then h1 loses power for good: the flapping hosts are the only ones left, and
    a hold-out is a preference, not an exclusion — h1's HA VMs run on them (with an event saying so)."""
    c = e2e.cluster
    names = ["fl-ha1", "fl-ha2"]
    place(e2e, "h1", dict.fromkeys(names, True))
    with Timeline(c.lab) as watch:
        for _ in range(3):
            _incident(e2e, ["h2", "h3"])
            _incident(e2e, ["h4"])
        flapping = {host: e2e.host_events(host, "flapping (") for host in ("h2", "h3", "h4")}
        assert all(flapping.values()), f"not every survivor flaps: {flapping}{e2e.story()}"
        lost_at = time.time()
        c.lab.power("h1", "off")
        placed = _runs_once_everywhere(e2e, names, {"h1"}, 60)
        took_s = time.time() - lost_at
    _no_duplicates(e2e, watch)
    held = [e for e in e2e.events() if e.kind == "vm.placed.held"]
    assert len(held) >= len(names), f"no event says a flapping host was used{e2e.story()}"
    print(f"power loss after 9 incidents: VMs on {placed} after {took_s:.1f} s")


def test_power_loss_and_cable_cut_at_the_same_instant_on_two_hosts(e2e: E2E) -> None:
    """h1 loses power and h2 its cable (network, and so its storage path) at the same instant. h1 is proven dead by
    its BMC; h2 is fenced through its BMC (2 of 4 hosts silent: not a mass failure). Every HA VM of both runs again,
    once, on h3 and h4."""
    c = e2e.cluster
    first, second = ["pc-ha1", "pc-ha2"], ["pc-ha3", "pc-ha4"]
    place(e2e, "h1", dict.fromkeys(first, True))
    place(e2e, "h2", dict.fromkeys(second, True))
    with Timeline(c.lab) as watch:
        lost_at = time.time()
        c.lab.power("h1", "off")
        c.lab.fail("h2", "network")
        c.lab.fail("h2", "storage")
        placed = _runs_once_everywhere(e2e, first + second, {"h1", "h2"}, 90)
        took_s = time.time() - lost_at
    _no_duplicates(e2e, watch)
    assert c.lab.power_state("h2") == "off", f"h2 was not fenced{e2e.story()}"
    print(f"power loss + cable cut: VMs on {placed} after {took_s:.1f} s")

