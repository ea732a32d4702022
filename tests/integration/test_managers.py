"""Several real manager processes on one PostgreSQL or MariaDB database, with real agents (libvirt's test driver in
each agent process, each powered by an IPMI BMC simulator), on 127.0.0.1.

One manager holds the lease over the hosts and acts; the others are standbys that answer admin reads and refuse
agents (which then try the next manager in their list). Killing the holder while it recovers a failed host: a
standby takes the lease after it expired, takes every host and the active HA work over, and finishes the recovery;
pausing the holder (SIGSTOP) past its lease: it resumes deposed and steps down; two managers started at the same
instant: exactly one holds the lease. The VM states come from the surviving agents' power reports (the lab's
end-to-end tests check VMs with virsh on real hosts).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvmha.lab.domain import domain_xml
from kvmha.lab.harness import ManagerHarness
from kvmha.lab.testing.databases import DatabaseUnavailable, fresh_database
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb

FAST = {
    "ping.interval": "1",
    "ping.timeout": "3.5",
    "startup.grace": "4",
    "heartbeat.stale.after": "2",
    "investigation.timeout": "3",
    "check.neighbor.timeout": "2",
    "power.report.missing.grace": "2",
}
HA_VMS = ["ha1", "ha2", "ha3"]
HOSTS = ["h1", "h2", "h3"]


@pytest.fixture(params=["postgresql", "mariadb"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    try:
        with fresh_database(request.param, tmp_path) as url:
            running = LocalCluster(tmp_path, url, core_config=dict(FAST))
            running.agent_settings = {"reconnect_max_s": 2.0}  # a standby's Reject asks for 1 s; keep it short
            try:
                yield running
            finally:
                running.close()
    except DatabaseUnavailable as reason:
        pytest.skip(str(reason))


def _managers(manager: ManagerHarness) -> apb.ListManagersResponse:
    reply: apb.ListManagersResponse = manager.admin().ListManagers(apb.ListManagersRequest(), timeout=5)
    return reply


def _start(cluster: LocalCluster) -> ManagerHarness:
    """m1 holds the lease with three powered hosts; m2 waits as a standby that the agents know about."""
    m2 = cluster.add_manager("m2")
    cluster.start_manager()
    for name in HOSTS:
        cluster.start_powered_agent(name)
    wait_for(lambda: (h := cluster.hosts()) and all(n in h and h[n].status == "Up" for n in HOSTS), 60, "hosts Up")
    cluster.register_bmcs()
    m2.start_manager()
    return m2


def _create_vms(cluster: LocalCluster) -> dict[str, apb.VmInfo]:
    for name in HA_VMS:
        cluster.admin().CreateVm(apb.CreateVmRequest(domain_xml=domain_xml(name, domain_type="test"), ha_enabled=True,
                                                     start=True), timeout=10)
    return _all_running(cluster, HOSTS)


def _all_running(manager: ManagerHarness, hosts: list[str], timeout_s: float = 60) -> dict[str, apb.VmInfo]:
    def check() -> dict[str, apb.VmInfo] | None:
        vms = manager.vms()
        ok = all(n in vms and vms[n].state == "Running" and vms[n].power_state == "PowerOn" and vms[n].host in hosts
                 for n in HA_VMS)
        return vms if ok else None

    return wait_for(check, timeout_s, f"every HA VM running on {hosts}")


def _held(view: apb.ListManagersResponse) -> apb.ListManagersResponse | None:
    return view if view.lease_holder else None


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_holder_killed_mid_recovery_a_standby_takes_over_and_finishes_it(cluster: LocalCluster) -> None:
    m2 = _start(cluster)
    before = _create_vms(cluster)
    standby_view = _managers(m2)  # admin reads work against any manager
    assert standby_view.lease_holder == "m1" and standby_view.lease_epoch == 1
    assert {m.id: (m.holds_lease, m.hosts_owned) for m in standby_view.managers} == {"m1": (True, 3), "m2": (False, 0)}
    load = Counter(vm.host for vm in before.values())
    victim = max(load, key=lambda h: load[h])
    cluster.kill_host(victim)
    cluster.kill_manager()  # SIGKILL as its recovery starts: the lease runs out, nobody hands anything over
    wait_for(lambda: _managers(m2).lease_holder == "m2", 30, "m2 holding the lease")
    survivors = sorted(set(HOSTS) - {victim})
    try:
        after = _all_running(m2, survivors, 90)
    except TimeoutError:
        pytest.fail(f"the standby did not finish the recovery\n{m2.story()}\n{cluster.logs()}")
    view = _managers(m2)
    assert view.lease_holder == "m2" and view.lease_epoch == 2
    hosts = m2.hosts()
    assert hosts[victim].status in ("Down", "Fenced"), hosts[victim]
    assert all(hosts[n].status == "Up" and hosts[n].manager_id == "m2" for n in survivors), hosts
    assert all(after[n].update_count > before[n].update_count for n in HA_VMS if before[n].host == victim)
    work = m2.admin().ListHaWork(apb.ListHaWorkRequest(), timeout=5).items
    assert not [w for w in work if w.step not in ("Done", "Cancelled")], work


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_holder_paused_past_its_lease_resumes_deposed(cluster: LocalCluster) -> None:
    m2 = _start(cluster)
    before = _create_vms(cluster)
    assert cluster.manager is not None
    pid = cluster.manager.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: _managers(m2).lease_holder == "m2", 30, "m2 holding the lease")
        # The agents' streams to the frozen m1 die by keepalive; they move to m2, which owns every host.
        wait_for(lambda: (h := m2.hosts()) and all(h[n].status == "Up" and h[n].manager_id == "m2" for n in HOSTS),
                 60, "every host Up and owned by m2")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: "event=lease_lost" in cluster.manager_log_tail(200), 30, "m1 stepping down")
    time.sleep(3.0)  # whatever m1 had decided before the pause would leave now: nothing may
    after = _all_running(m2, HOSTS)
    assert {n: after[n].host for n in HA_VMS} == {n: before[n].host for n in HA_VMS}, "a VM moved"
    assert {n: after[n].update_count for n in HA_VMS} == {n: before[n].update_count for n in HA_VMS}
    view = _managers(cluster)  # m1 answers reads as a standby
    assert view.lease_holder == "m2" and [m.id for m in view.managers if m.answering] == ["m1"]
    with pytest.raises(grpc.RpcError) as refused:  # and refuses changes, naming the holder
        cluster.admin().SetVmHa(apb.SetVmHaRequest(vm="ha1", enabled=True), timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "held by m2" in str(refused.value.details())
    assert all(h.status == "Up" for h in m2.hosts().values())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_managers_started_at_the_same_instant_elect_one(cluster: LocalCluster) -> None:
    others = [cluster.add_manager("m2"), cluster.add_manager("m3")]
    for name in HOSTS:
        cluster.start_powered_agent(name)
    processes = [cluster, *others]
    barrier = threading.Barrier(len(processes))

    def start(manager: ManagerHarness) -> None:
        barrier.wait()
        manager.start_manager()

    threads = [threading.Thread(target=start, args=(manager,)) for manager in processes]
    for thread in threads:  # the three processes start at the same instant (each then waits for its admin port)
        thread.start()
    for thread in threads:
        thread.join(60)
    view = wait_for(lambda: _held(_managers(cluster)), 30, "a lease holder")
    holder = next(m for m in processes if m.manager_id == view.lease_holder)
    wait_for(lambda: (h := holder.hosts()) and len(h) == 3 and all(x.status == "Up" for x in h.values()), 60,
             "every host Up at the holder")
    view = _managers(holder)
    assert sum(m.holds_lease for m in view.managers) == 1 and view.lease_epoch == 1
    assert {m.id: m.hosts_owned for m in view.managers} == {m.manager_id: (3 if m is holder else 0)
                                                             for m in processes}
