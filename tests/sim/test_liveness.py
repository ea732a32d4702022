"""The liveness checker (sim/liveness.py): its bounds come from the configuration, it stays quiet where the promise
does not apply, and it fails a core that leaves HA VMs down while a host could run them (issue 12)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from kvmha.manager.core import scheduler
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.model import HostId, HostRecord, HostStatus, VmRecord
from kvmha.manager.core.placement import PlacementRequest, choose_host
from kvmha.manager.core.vmindex import occupies
from kvmha.manager.sim.liveness import BMC_OFF, CAUSES, CRASH, FENCE, SELF_FENCE, bound_s
from kvmha.manager.sim.script import Scenario, load, parse_script, parse_setup, run

SCENARIOS = Path(__file__).parents[1] / "scenarios"


def test_every_cause_has_a_bound_that_follows_the_configuration() -> None:
    config = CoreConfig()
    for cause in CAUSES:
        assert 0 < bound_s(cause, config) < math.inf
        slower = dataclasses.replace(config, start_timeout_s=config.start_timeout_s + 10)
        assert bound_s(cause, slower) > bound_s(cause, config)
    # the order of the causes: a crash is the quickest, waiting out a self-fence the slowest
    assert bound_s(CRASH, config) < bound_s(BMC_OFF, config) < bound_s(FENCE, config) < bound_s(SELF_FENCE, config)
    later = dataclasses.replace(config, isolation_after_s=config.isolation_after_s + 20)
    assert bound_s(SELF_FENCE, later) == bound_s(SELF_FENCE, config) + 20
    with pytest.raises(ValueError):
        bound_s("hope", config)


def _excluding_place(self: scheduler.Scheduler, vm: VmRecord) -> tuple[HostRecord | None, str]:
    """Placement as it was before issue 12: flapping hosts are excluded, not merely avoided."""
    exclude = set(self.ctx.held.at(self.ctx.now))
    old = self.ctx.hosts.get(vm.host_id) if vm.host_id is not None else None
    if old is not None and old.status is not HostStatus.UP:
        exclude.add(old.id)
    group = vm.anti_affinity_group
    request = PlacementRequest(
        vm,
        frozenset(exclude),
        frozenset(self.ctx.vms.group_hosts(group, vm.id) if group else ()),
        vm.host_id if occupies(vm) else None,
    )
    return choose_host(
        request,
        self.ctx.up.ids,
        self.ctx.hosts,
        self.ctx.vms,
        start=0,
        compare=32,
        cpu_ratio=self.ctx.config.cpu_overcommit_ratio,
    )


def test_the_checker_catches_a_core_that_excludes_flapping_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    scenario = load(SCENARIOS / "flapping_survivors_then_power_loss")
    assert run(scenario).checker.violations == []
    monkeypatch.setattr(scheduler.Scheduler, "_place", _excluding_place)
    broken = run(load(SCENARIOS / "flapping_survivors_then_power_loss"))
    liveness = [v for v in broken.checker.violations if "liveness" in v]
    assert len(liveness) == 3, broken.checker.violations  # vm1-vm3 of h1; h2's vm4 never stopped
    assert all("bmc-off" in v and "h1 (Down)" in v for v in liveness)


NO_ROOM_SETUP = """
hosts h1-h2 cpus=16 mem=4096 bmc=yes
vm vm1 host=h1 mem=3072 cpus=1 ha=yes
vm vm2 host=h2 mem=3072 cpus=1 ha=yes
vm vm3 host=h1 mem=512 cpus=1 ha=no
"""


def _scenario(setup: str, script: str) -> Scenario:
    scenario = Scenario()
    parse_setup(setup, scenario)
    parse_script(script, scenario)
    return scenario


def test_no_violation_while_no_host_has_room_and_the_clock_runs_once_there_is() -> None:
    # h1 dies: vm1 fits nowhere (h2 holds vm2) until the guest of vm2 shuts down, which frees h2.
    sim = run(_scenario(NO_ROOM_SETUP, "10 power h1 off\n400 guest-shutdown vm2\n500 end\n"))
    assert sim.checker.violations == []
    assert sim.world.where(sim.world.vms_by_name["vm1"].uuid) == [HostId(2)]
    assert sim.liveness.recovered_s[BMC_OFF][0] > 390  # counted from the loss, promised only once h2 had room


def test_maintenance_empties_the_host_before_it_loses_power() -> None:
    # h1 in maintenance: its VMs (HA or not) are migrated to h2, so its power loss later costs nothing.
    sim = run(
        _scenario(NO_ROOM_SETUP.replace("mem=4096", "mem=16384"), "5 maintenance h1 on\n30 power h1 off\n300 end\n")
    )
    assert sim.checker.violations == []
    for name in ("vm1", "vm3"):
        assert sim.world.where(sim.world.vms_by_name[name].uuid) == [HostId(2)], name
    assert not sim.liveness.dropped and not sim.liveness.owed
    assert any("PrepareForMaintenance -> Maintenance" in line for line in sim.log)


def test_the_checker_catches_a_core_that_counts_host_failures_as_crashes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(load(SCENARIOS / "crash_loop_per_cause")).checker.violations == []
    monkeypatch.setattr(scheduler, "own_death", lambda reason: not reason.startswith(scheduler.OPERATOR_START))
    broken = run(load(SCENARIOS / "crash_loop_per_cause"))
    assert any("liveness: vm1 (crash at 80.0)" in v for v in broken.checker.violations), broken.checker.violations


def test_own_death_tells_power_sync_reasons_from_host_failures() -> None:
    assert scheduler.own_death("PowerOff (Crashed) on h2")
    assert scheduler.own_death("PowerReportMissing (Other) on h2; Done: vm1 runs on h3 (1.0 s after scheduling)")
    assert not scheduler.own_death("h1 went silent")
    assert not scheduler.own_death("h1 did not come back after a planned disconnect")
    assert not scheduler.own_death(scheduler.OPERATOR_START)


def test_vm_show_says_why_a_vm_is_where_it_is() -> None:
    """`kvmha vm show` reads ops.vm_reason: the newest event about the VM or its latest HA work item's reason."""
    from kvmha.manager import operations as ops

    looping = run(load(SCENARIOS / "crash_loop_per_cause"))
    with looping.store.unit_of_work() as uow:
        assert "a crash loop, not restarted again" in ops.vm_reason(uow, ops.vm(uow, "vm1"))
    flapping = run(load(SCENARIOS / "flapping_survivors_then_power_loss"))
    with flapping.store.unit_of_work() as uow:
        why = ops.vm_reason(uow, ops.vm(uow, "vm1"))
        assert why.startswith("work ") and "h1 " in why and "; Done: vm1 runs on" in why, why
        # vm4's host h2 went silent (link cut) and came back: the restart was cancelled because it still ran there
        assert ops.vm_reason(uow, ops.vm(uow, "vm4")).endswith("h2 went silent; Cancelled: it runs on h2")
