"""A rolling restart of three managers on one PostgreSQL or MariaDB database (issue 15, point 6), with a host
failing while the lease holder is down: the standbys are restarted one by one (nothing moves, nobody acts but the
holder), then the holder itself, with SIGTERM, while one host loses its power. A standby takes the lease, takes the
hosts, and restarts the dead host's HA VMs once, on the survivors; no healthy host is fenced (its BMC still says on,
its agent the same process), no "two copies" alert, no HA work left active. Real manager and agent processes on
127.0.0.1 (libvirt's test driver in each agent, each powered by an IPMI BMC simulator); the lab's end-to-end test
of the same promise with real hosts is tests/e2e/test_managers.py."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmha.lab.domain import domain_xml
from kvmha.lab.harness import ManagerHarness
from kvmha.lab.testing.databases import DatabaseUnavailable, fresh_database
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb

FAST = {"ping.interval": "1", "ping.timeout": "3.5", "startup.grace": "4", "heartbeat.stale.after": "2",
        "investigation.timeout": "3", "check.neighbor.timeout": "2", "power.report.missing.grace": "2"}
HOSTS = ["h1", "h2", "h3"]
HA_VMS = ["ha1", "ha2", "ha3"]


@pytest.fixture(params=["postgresql", "mariadb"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    try:
        with fresh_database(request.param, tmp_path) as url:
            running = LocalCluster(tmp_path, url, core_config=dict(FAST))
            running.agent_settings = {"reconnect_max_s": 2.0}
            try:
                yield running
            finally:
                running.close()
    except DatabaseUnavailable as reason:
        pytest.skip(str(reason))


def _view(manager: ManagerHarness) -> apb.ListManagersResponse:
    reply: apb.ListManagersResponse = manager.admin().ListManagers(apb.ListManagersRequest(), timeout=5)
    return reply


def _holder(managers: list[ManagerHarness]) -> ManagerHarness | None:
    for manager in managers:
        if manager.manager_alive:
            held = _view(manager).lease_holder
            return next((m for m in managers if m.manager_id == held and m.manager_alive), None)
    return None


def _settled(managers: list[ManagerHarness], hosts: list[str]) -> ManagerHarness | None:
    """The live holder, once it owns every one of `hosts`, each Up."""
    holder = _holder(managers)
    if holder is None:
        return None
    seen = holder.hosts()
    ok = all(n in seen and seen[n].status == "Up" and seen[n].manager_id == holder.manager_id for n in hosts)
    return holder if ok else None


def _restart(manager: ManagerHarness) -> None:
    manager.stop_manager()
    manager.start_manager()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rolling_restart_with_a_host_failing_meanwhile(cluster: LocalCluster) -> None:
    others = [cluster.add_manager("m2"), cluster.add_manager("m3")]
    cluster.start_manager()
    for name in HOSTS:
        cluster.start_powered_agent(name)
    wait_for(lambda: _settled([cluster], HOSTS), 60, "hosts Up at m1")
    cluster.register_bmcs()
    for standby in others:
        standby.start_manager()
    for name in HA_VMS:
        cluster.admin().CreateVm(apb.CreateVmRequest(domain_xml=domain_xml(name, domain_type="test"),
                                                     ha_enabled=True, start=True), timeout=10)
    before = wait_for(lambda: (v := cluster.vms()) and all(n in v and v[n].state == "Running" for n in HA_VMS) and v,
                      60, "every HA VM running")
    agents = {name: cluster.bmcs[name].host_pid for name in HOSTS}  # each powered host's agent process

    for standby in others:  # the standbys first, as an operator would
        _restart(standby)
        assert _view(cluster).lease_holder == "m1"
    after_standbys = cluster.vms()
    assert {n: (after_standbys[n].host, after_standbys[n].update_count) for n in HA_VMS} == \
        {n: (before[n].host, before[n].update_count) for n in HA_VMS}, "a standby's restart moved a VM"

    load = Counter(vm.host for name, vm in before.items() if name in HA_VMS)
    victim = max(load, key=lambda h: load[h])
    survivors = sorted(set(HOSTS) - {victim})
    cluster.kill_host(victim)
    cluster.stop_manager()  # the holder's SIGTERM while its host failure is fresh
    holder = wait_for(lambda: _settled(others, survivors), 60, "a standby holding the lease with the survivors Up")
    cluster.start_manager()  # back as a standby
    try:
        after = wait_for(lambda: (v := holder.vms()) and all(v[n].state == "Running" and v[n].host in survivors
                                                              for n in HA_VMS) and v, 90, "every HA VM on a survivor")
    except TimeoutError:
        pytest.fail(f"{holder.story()}\n{cluster.logs()}")
    assert _view(cluster).lease_holder == holder.manager_id  # the old holder came back as a standby
    moved = [n for n in HA_VMS if before[n].host == victim]
    assert moved and all(after[n].update_count > before[n].update_count for n in moved)
    assert all(after[n].host == before[n].host for n in HA_VMS if n not in moved), "a VM of a healthy host moved"
    events = holder.events()
    assert not [e for e in events if e.kind == "vm.duplicate"], [e.message for e in events if e.kind == "vm.duplicate"]
    fenced = [e for e in events if e.kind == "host.status" and "-> Fenc" in e.message]
    assert all(e.subject == f"host:{holder.hosts()[victim].id}" for e in fenced), [e.message for e in fenced]
    assert {name: cluster.bmcs[name].host_pid for name in survivors} == {n: agents[n] for n in survivors}
    assert all(cluster.bmcs[name].power() == "on" for name in survivors)
    work = holder.admin().ListHaWork(apb.ListHaWorkRequest(), timeout=5).items
    assert not [w for w in work if w.step not in ("Done", "Cancelled")], work
