"""The what-if planner against the simulator (issue 16): for random clusters, the plan for a host's power loss equals
what the simulated cluster then does when nothing else happens — same target for every HA VM, the same VMs left
without capacity — and admission control's verdict agrees with the plan of the worst failure."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmha.manager.core import capacityplan
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.model import HostId, VmId, VmState, VmUuid
from kvmha.manager.sim.script import apply
from kvmha.manager.sim.simulator import Simulator
from kvmha.manager.sim.storm import FAULTS, Storm, build_cluster
from kvmha.manager.sim.world import SimHost, SimVm

STORAGE = ("a", "b")


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[SimHost], list[SimVm], int, int]:
    host_count = draw(st.integers(3, 6))
    hosts = []
    for n in range(1, host_count + 1):
        mounts = draw(st.sets(st.sampled_from(STORAGE), min_size=1))
        hosts.append(SimHost(HostId(n), f"h{n}", cpus=draw(st.integers(2, 8)),
                             memory_mib=draw(st.sampled_from((4096, 8192, 16384))),
                             storage={m: f"nfs:nas:/{m}" for m in sorted(mounts)},
                             networks=("bridge:br0",) if draw(st.booleans()) or n == 1 else ()))
    vms = []
    for n in range(1, draw(st.integers(1, 14)) + 1):
        host = draw(st.sampled_from(hosts))
        disks = tuple(sorted(draw(st.sets(st.sampled_from(sorted(host.storage or {})), max_size=1))))
        vms.append(SimVm(VmId(n), f"vm{n}", VmUuid(f"uuid-vm{n}"), memory_mib=draw(st.sampled_from((512, 1024, 3072))),
                         vcpus=draw(st.integers(1, 4)), ha=draw(st.booleans()), priority=draw(st.integers(0, 2)),
                         group=draw(st.sampled_from((None, None, "g"))), host=host.name, disks=disks,
                         networks=host.networks if draw(st.booleans()) else ()))
    return hosts, vms, draw(st.integers(1, host_count)), draw(st.integers(1, 3))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_the_plan_for_a_power_loss_is_what_then_happens(cluster: tuple[list[SimHost], list[SimVm], int, int]) -> None:
    hosts, vms, failing, compare = cluster  # few candidates compared: the rotating start decides the target
    sim = Simulator(hosts, vms, seed=1, config=CoreConfig(admission_host_failures=0, placement_candidates=compare))
    try:
        sim.run_until(5.0)
        plan = sim.core.plan_failure([HostId(failing)])
        names = {h.id: h.name for h in hosts}
        sim.schedule(6.0, apply, sim, f"power h{failing} off")
        sim.run_until(40.0)
        by_name = {vm.name: vm for vm in sim.core.vms}
        for step in plan:
            record = by_name[step.name]
            if step.target is None:
                assert record.state is not VmState.RUNNING or record.host_id == failing, step
            else:
                assert record.state is VmState.RUNNING, step
                assert names[record.host_id] == step.target if record.host_id else False, step
        restarted = {vm.name for vm in vms if vm.ha and vm.host == f"h{failing}"}
        assert {s.name for s in plan if s.ha} == restarted
        assert [s.order for s in plan if s.ha] == sorted(s.order for s in plan if s.ha)
        assert sim.checker.violations == []
    finally:
        sim.close()


@settings(max_examples=10, deadline=None)
@given(clusters())
def test_admission_agrees_with_the_worst_plan(cluster: tuple[list[SimHost], list[SimVm], int, int]) -> None:
    hosts, vms, _, _ = cluster
    sim = Simulator(hosts, vms, seed=1)
    try:
        sim.run_until(5.0)
        failed, plan = sim.core.worst_failure()
        assert len(failed) == (1 if any(vm.ha for vm in vms) else 0)  # hosts without HA VMs strand nothing
        for host_id in sorted(h.id for h in hosts):
            other = sim.core.plan_failure([host_id])
            assert sum(p.target is None and p.ha for p in other) <= sum(p.target is None and p.ha for p in plan)
    finally:
        sim.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters(), st.integers(1, 2))
def test_the_admission_shortcut_never_hides_a_stranded_vm(
    cluster: tuple[list[SimHost], list[SimVm], int, int], count: int
) -> None:
    """`surely_restarted` lets admission skip planning a failure set: wherever it says so, the plan strands nothing,
    and the worst failure (what admission control and `kvmha capacity` read) is the one planning every set gives."""
    hosts, vms, _, compare = cluster
    sim = Simulator(hosts, vms, seed=1, config=CoreConfig(placement_candidates=compare, admission_host_failures=count))
    try:
        sim.run_until(5.0)
        world = capacityplan.world_of(sim.core._ctx, sim.core._sched.placement_cursor)  # the test reads the core
        planned: list[tuple[tuple[HostId, ...], int]] = []
        for failed in capacityplan.failure_sets(world, count):
            stranded = sum(p.ha and p.target is None for p in capacityplan.plan_failure(world, failed))
            if capacityplan.surely_restarted(world, failed):
                assert stranded == 0, failed
            planned.append((failed, stranded))
        most = max((n for _, n in planned), default=0)
        expected = next((f for f, n in planned if n == most), ())
        failed, plan = capacityplan.worst_failure(world, count)
        assert failed == expected and plan == (capacityplan.plan_failure(world, failed) if failed else [])
    finally:
        sim.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_storm_on_hosts_with_different_storage_never_starts_a_vm_where_its_disks_are_not(seed: int) -> None:
    """Issue 16 in a compound storm: every host mounts storage a, half of them b as well, and one in five has another
    server's export at /mnt/b (same path, other storage); VMs live on a or b. Power losses, partitions, storage that
    turns unhealthy (`mount`), manager restarts and database outages at once: no VM on two hosts, and the simulated
    hypervisor never has to refuse a start because the host cannot reach the VM's disks."""
    rng = random.Random(seed)
    hosts, vms = build_cluster(60, 4, rng)
    for host in hosts:
        host.storage = {"a": "nfs:nas:/a"} | ({"b": "nfs:nas:/b"} if host.id % 2 else {})
        if host.id % 5 == 0:
            host.storage["b"] = "nfs:other:/b"
    for vm in vms:
        placed = next(h for h in hosts if h.name == vm.host)
        vm.disks = ("b",) if placed.storage and placed.storage.get("b") == "nfs:nas:/b" and vm.id % 2 else ("a",)
    sim = Simulator(hosts, vms, seed=seed, jitter_s=0.05)
    weights = {name: weight for name, (weight, _) in FAULTS.items()} | {"mount": 20}
    storm = Storm(sim, rng, rate_per_s=0.2, until_s=900.0, compound=2, weights=weights, max_concurrent_share=0.15)
    storm.start()
    try:
        sim.run_until(1300.0)
    finally:
        sim.close()
    assert sim.checker.violations == []
    assert storm.injected.get("mount", 0) >= 5 and storm.injected.get("power-loss", 0) >= 1, storm.injected
    assert sim.metrics.storage_refusals == 0
