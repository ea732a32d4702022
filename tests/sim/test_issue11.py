"""Issue 11's failure in a few lines of script: a host without a watchdog whose BMC is dead, whose agent dies and
which is cut off keeps running its VMs. The rule "no neighbour reaches it and its heartbeat is stale beyond the
self-fence time" took that silence for death and started second copies; the checker must catch that rule, and the
current core must not make it."""

from __future__ import annotations

import pytest

from kvmha.manager.core import hostflow
from kvmha.manager.core.investigation import SelfFence
from kvmha.manager.core.model import HostId, HostRecord, HostStatus, VmUuid
from kvmha.manager.sim.script import Scenario, parse_script, parse_setup, run

SETUP = """
hosts h1-h3 cpus=16 mem=16384 bmc=yes
host h4 cpus=16 mem=16384 bmc=yes watchdog=no
vm vm1 host=h4 mem=2048 cpus=2 ha=yes
"""
SCRIPT = """
30 bmc h4 dead
30 agent h4 crash
31 network h4 off
31 storage h4 off
200 end
"""


def _scenario() -> Scenario:
    scenario = Scenario()
    parse_setup(SETUP, scenario)
    parse_script(SCRIPT, scenario)
    return scenario


def test_the_current_core_keeps_the_host_in_alert_and_vm1_waits() -> None:
    sim = run(_scenario())
    assert sim.checker.violations == []
    assert sim.core.host_status(HostId(4)) is HostStatus.ALERT
    assert sim.world.where(VmUuid("uuid-vm1")) == [HostId(4)]  # still running only where it was
    assert sum("never declared dead by its silence" in line for line in sim.log) == 1


def test_the_checker_catches_the_old_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule before issue 11: every silent host counted as self-fenced after isolation.after + margin, whether or
    not anything guaranteed it."""

    def old_rule(self: hostflow.HostFlow, host: HostRecord) -> tuple[SelfFence, float]:
        config = self.ctx.config
        return SelfFence.BACKED, config.isolation_after_s + config.isolation_margin_s

    monkeypatch.setattr(hostflow.HostFlow, "self_fence", old_rule)
    sim = run(_scenario())
    assert sim.core.host_status(HostId(4)) is HostStatus.DOWN
    assert any("uuid-vm1 started on h" in v and "while running on h4" in v for v in sim.checker.violations), (
        sim.checker.violations
    )
