"""Random fact sequences — out of order, duplicated, for unknown ids — must never crash the core or break its own
bookkeeping (an impossible transition would raise here)."""

from __future__ import annotations

import random

import pytest

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.model import (
    HostCapacity,
    HostId,
    PowerState,
    RequestId,
    StopCause,
    VmId,
    VmState,
    VmUuid,
    WorkType,
)
from tests.unit.core.harness import Harness, of_type, vm


def _random_fact(rng: random.Random, pending: list[a.Action]) -> f.Fact:
    host = HostId(rng.randint(1, 4))
    vm_n = rng.randint(1, 6)
    choice = rng.randrange(12)
    if choice == 0:
        return f.AgentConnected(host, f"u{host}", f"h{host}", "", HostCapacity(16, 16384), "b")
    if choice == 1:
        return f.AgentDisconnected(host, planned=rng.random() < 0.3)
    if choice in (2, 3):
        return f.HeartbeatReceived(host, 1, rng.random() < 0.9, rng.random() < 0.8)
    if choice == 4:
        power = rng.choice([PowerState.POWER_ON, PowerState.POWER_OFF])
        cause = rng.choice(list(StopCause))
        migrating = power is PowerState.POWER_ON and rng.random() < 0.2  # a copy paused for a migration
        domains = (f.DomainReport(VmUuid(f"v{vm_n}"), f"vm{vm_n}", power, cause, migrating),)
        return f.PowerStateReported(host, rng.random() < 0.3, rng.random() < 0.9, domains)
    if choice in (5, 6) and pending:
        action = rng.choice(pending)
        if isinstance(action, a.Fence):
            return f.FenceCompleted(action.request_id, action.host_id, rng.random() < 0.7, rng.random() < 0.5)
        if isinstance(action, a.QueryBmc):
            return f.BmcPowerReported(action.request_id, action.host_id, rng.choice(["on", "off", "unknown"]))
        if isinstance(action, a.SendCommand):
            payload: f.NeighborCheck | None = None
            if isinstance(action.command, a.CheckNeighbor):
                payload = f.NeighborCheck(action.command.target_host_id, rng.random() < 0.5, None, rng.uniform(0, 60))
            return f.CommandCompleted(action.request_id, rng.random() < 0.8, "", payload)
    if choice == 7:
        return f.CommandCompleted(RequestId("unknown"), True)
    if choice == 8:
        return f.HostMaintenanceChanged(host, rng.random() < 0.5)
    if choice == 9:
        operator: list[f.Fact] = [
            f.VmStartRequested(VmId(vm_n)),
            f.VmStopRequested(VmId(vm_n)),
            f.VmHaChanged(VmId(vm_n), rng.random() < 0.7),
            f.VmMigrateRequested(VmId(vm_n), rng.choice([None, host])),
            f.HostEnabledChanged(host, rng.random() < 0.5),
        ]
        return rng.choice(operator)
    return f.HeartbeatReceived(host, 2, True, True)


@pytest.mark.parametrize("seed", range(8))
def test_random_facts_keep_the_core_consistent(seed: int) -> None:
    rng = random.Random(seed)
    h = Harness(hosts=4, vms=[vm(n, on=(n % 4) + 1) for n in range(1, 7)])
    h.connect_all(4)
    pending: list[a.Action] = []
    for _ in range(1500):
        at = h.now + rng.uniform(0.0, 1.5)
        pending += of_type(h.tick_until(at), (a.SendCommand, a.Fence, a.QueryBmc))  # type: ignore[arg-type]
        pending += of_type(h.handle(_random_fact(rng, pending), at), (a.SendCommand, a.Fence, a.QueryBmc))  # type: ignore[arg-type]
        pending = pending[-50:]
        active = [w for w in h.core.works.values() if w.step.active]
        for work_type in (WorkType.HA, WorkType.MIGRATION):
            of_type_ = [w for w in active if w.type is work_type]
            assert len({w.vm_id for w in of_type_}) == len(of_type_), f"two active {work_type} items for one VM"
        for work in active:
            record = h.core.vm(work.vm_id)
            if work.type is WorkType.MIGRATION:  # an unsettled migration keeps its VM Migrating
                assert record is not None and record.state is VmState.MIGRATING, (work, record)
        restarting = [w for w in active if w.step.value == "Restarting"]
        assert len(restarting) <= h.core.config.ha_workers
