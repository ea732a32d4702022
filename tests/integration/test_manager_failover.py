"""A real manager and three real agents on 127.0.0.1, on SQLite, PostgreSQL and MariaDB.

Each agent runs its own libvirt test driver (a `test://` node of 8 CPUs / 4 GiB) inside its process, so killing the
agent kills its VMs with it: a host failure in miniature. Each agent is the "power" of an IPMI BMC simulator
(ipmi_sim on 127.0.0.1), which reads off once the agent process is gone, and the manager knows each BMC. (Every host
here is 127.0.0.1, so the neighbours' ICMP check always reaches it: without the BMC the manager must — and does —
refuse to restart, see the simulator scenarios.) The manager must detect the host behind, investigate (the BMC says
off: Down), restart the HA VMs on the other hosts, mark the non-HA VM Stopped, and tell the story in its events.
The VM states asserted here come from the surviving agents' libvirt power reports; the lab's end-to-end tests
(tests/e2e) check the same with virsh on real hosts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmha.lab.domain import domain_xml
from kvmha.lab.testing.databases import KINDS, DatabaseUnavailable, fresh_database
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
HA_VMS = ["ha1", "ha2", "ha3", "ha4"]


@pytest.fixture(params=KINDS)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocalCluster]:
    try:
        with fresh_database(request.param, tmp_path) as url:
            running = LocalCluster(tmp_path, url, core_config=dict(FAST))
            try:
                yield running
            finally:
                running.close()
    except DatabaseUnavailable as reason:
        pytest.skip(str(reason))


def _up(cluster: LocalCluster, names: list[str]) -> dict[str, apb.HostInfo]:
    return wait_for(
        lambda: (hosts := cluster.hosts()) and all(n in hosts and hosts[n].status == "Up" for n in names) and hosts,
        30,
        f"hosts {names} Up",
    )


def _running(cluster: LocalCluster, names: list[str]) -> dict[str, apb.VmInfo]:
    def check() -> dict[str, apb.VmInfo] | None:
        vms = cluster.vms()
        ok = all(n in vms and vms[n].state == "Running" and vms[n].power_state == "PowerOn" for n in names)
        return vms if ok else None

    return wait_for(check, 60, f"VMs {names} Running with PowerOn")


def _start_cluster(cluster: LocalCluster) -> None:
    cluster.start_manager()
    for name in ("h1", "h2", "h3"):
        cluster.start_powered_agent(name)
    _up(cluster, ["h1", "h2", "h3"])
    cluster.register_bmcs()


def _create_vms(cluster: LocalCluster) -> dict[str, apb.VmInfo]:
    admin = cluster.admin()
    for name in HA_VMS:
        admin.CreateVm(
            apb.CreateVmRequest(domain_xml=domain_xml(name, domain_type="test"), ha_enabled=True, start=True),
            timeout=10,
        )
    admin.CreateVm(
        apb.CreateVmRequest(domain_xml=domain_xml("plain", domain_type="test"), ha_enabled=False, start=True),
        timeout=10,
    )
    return _running(cluster, [*HA_VMS, "plain"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_agent_death_restarts_ha_vms_elsewhere(cluster: LocalCluster) -> None:
    _start_cluster(cluster)
    before = _create_vms(cluster)
    # Kill the host that runs the most VMs, including the non-HA one if it can.
    load = Counter(vm.host for vm in before.values())
    victim = max(load, key=lambda h: (load[h], before["plain"].host == h))
    cluster.kill_host(victim)

    survivors = sorted({"h1", "h2", "h3"} - {victim})
    try:
        after = wait_for(
            lambda: (
                (vms := cluster.vms())
                and all(
                    vms[n].state == "Running" and vms[n].power_state == "PowerOn" and vms[n].host in survivors
                    for n in HA_VMS
                )
                and vms
            ),
            90,
            "every HA VM running on a surviving host",
        )
    except TimeoutError:
        pytest.fail(f"recovery did not complete\n{cluster.story()}\n{cluster.logs()}")
    hosts = cluster.hosts()
    assert hosts[victim].status in ("Down", "Fenced"), hosts[victim]
    if before["plain"].host == victim:
        plain = wait_for(lambda: (v := cluster.vms()["plain"]).state == "Stopped" and v, 30, "plain Stopped")
        assert plain.state == "Stopped"
    assert all(after[n].update_count > before[n].update_count for n in HA_VMS if before[n].host == victim)
    kinds = {e.kind for e in cluster.events()}
    assert any("status" in k for k in kinds), kinds
    work = cluster.admin().ListHaWork(apb.ListHaWorkRequest(), timeout=5).items
    moved = [n for n in HA_VMS if before[n].host == victim]
    assert {w.vm for w in work if w.step == "Done"} >= set(moved)
    assert not [w for w in work if w.step not in ("Done", "Cancelled")], work


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_manager_restart_mid_recovery_completes_without_duplicates(cluster: LocalCluster) -> None:
    _start_cluster(cluster)
    before = _create_vms(cluster)
    load = Counter(vm.host for vm in before.values() if vm.name in HA_VMS)
    victim = max(load, key=lambda h: load[h])
    cluster.kill_host(victim)
    # Stop the manager as soon as it has noticed (host no longer Up), before the restarts are done.
    wait_for(lambda: cluster.hosts()[victim].status != "Up", 30, f"{victim} no longer Up")
    assert cluster.manager is not None
    cluster.manager.kill()
    cluster.start_manager()
    survivors = {"h1", "h2", "h3"} - {victim}
    try:
        after = wait_for(
            lambda: (
                (vms := cluster.vms())
                and all(vms[n].state == "Running" and vms[n].host in survivors for n in HA_VMS)
                and vms
            ),
            120,
            "every HA VM running on a surviving host after the manager restart",
        )
    except TimeoutError:
        pytest.fail(f"recovery did not complete after the restart\n{cluster.story()}\n{cluster.logs()}")
    assert all(after[n].power_state == "PowerOn" for n in HA_VMS)
    # No VM was started twice: each one is reported by exactly one host (the manager would follow a second
    # report and record an event; a duplicate would show as a VM on two hosts in the agents' full reports).
    dupes = [e for e in cluster.events() if "duplicate" in e.kind or "two hosts" in e.message]
    assert not dupes, dupes
