"""The isolation response: the decision table, and the monitor acting once per episode."""

from __future__ import annotations

import pytest

from kvmha.agent.hypervisor import FakeHypervisor
from kvmha.agent.isolation import Action, IsolationFacts, IsolationMonitor, decide
from kvmha.lab.domain import domain_xml
from tests.agent.conftest import new_uuid

AFTER_S = 30.0


def facts(now: float, manager_seen_at: float, storage_ok_at: float | None, storage: bool = True,
          acted: bool = False) -> IsolationFacts:
    return IsolationFacts(now=now, manager_seen_at=manager_seen_at, storage_ok_at=storage_ok_at, started_at=0.0,
                          storage_configured=storage, acted=acted)


@pytest.mark.parametrize(("label", "f", "policy", "isolated", "action"), [
    ("both fine", facts(100, 99, 99), "destroy-vms", False, Action.NOTHING),
    ("manager lost only", facts(100, 10, 99), "destroy-vms", False, Action.NOTHING),
    ("storage lost only", facts(100, 99, 10), "destroy-vms", False, Action.NOTHING),
    ("both lost, not long enough", facts(100, 75, 75), "destroy-vms", False, Action.NOTHING),
    ("both lost exactly after_s", facts(100, 70, 70), "destroy-vms", False, Action.NOTHING),
    ("both lost long", facts(100, 60, 60), "destroy-vms", True, Action.DESTROY_VMS),
    ("never written counts from start", facts(100, 60, None), "destroy-vms", True, Action.DESTROY_VMS),
    ("never written, young agent", facts(20, 0, None), "destroy-vms", False, Action.NOTHING),
    ("policy none logs", facts(100, 60, 60), "none", True, Action.LOG_ONLY),
    ("policy reboot", facts(100, 60, 60), "reboot-host", True, Action.REBOOT_HOST),
    ("already acted", facts(100, 60, 60, acted=True), "destroy-vms", True, Action.NOTHING),
    ("no storage configured", facts(100, 0, None, storage=False), "destroy-vms", False, Action.NOTHING),
])
def test_decision_table(label: str, f: IsolationFacts, policy: str, isolated: bool, action: Action) -> None:
    decision = decide(f, policy, AFTER_S)
    assert (decision.isolated, decision.action) == (isolated, action), (label, decision.reason)


def test_destroy_vms_once_per_episode_and_again_after_recovery() -> None:
    hv = FakeHypervisor()
    hv.open()
    vms = [new_uuid() for _ in range(3)]
    for i, vm in enumerate(vms):
        hv.start_vm(domain_xml(f"vm{i}", vm))
    reboots: list[int] = []
    monitor = IsolationMonitor(hv, "destroy-vms", AFTER_S, storage_configured=True, started_at=0.0,
                               reboot=lambda: reboots.append(1))
    assert monitor.tick(10.0, 0.0, 0.0).action is Action.NOTHING
    assert hv.running_uuids() == set(vms)
    assert monitor.tick(31.0, 0.0, 0.0).action is Action.DESTROY_VMS
    assert hv.running_uuids() == set()
    hv.start_vm(domain_xml("late", vms[0]))  # something started it again: same episode, no second action
    assert monitor.tick(40.0, 0.0, 0.0).action is Action.NOTHING
    assert hv.running_uuids() == {vms[0]}
    assert not monitor.tick(41.0, 41.0, 0.0).isolated  # manager back: episode over
    assert monitor.tick(80.0, 41.0, 0.0).action is Action.DESTROY_VMS
    assert hv.running_uuids() == set()
    assert reboots == []


def test_reboot_policy_calls_the_injected_reboot_only() -> None:
    hv = FakeHypervisor()
    hv.open()
    reboots: list[int] = []
    monitor = IsolationMonitor(hv, "reboot-host", AFTER_S, storage_configured=True, started_at=0.0,
                               reboot=lambda: reboots.append(1))
    monitor.tick(31.0, 0.0, 0.0)
    monitor.tick(32.0, 0.0, 0.0)
    assert reboots == [1]
