"""What the manager reads of a migration in the agents' reports (translate.paused_for_migration): libvirt's state and
reason in a full report, the lifecycle event in a delta. A copy paused for migration must never read as running."""

from __future__ import annotations

import pytest

from kvmha.manager.adapters import translate
from kvmha.manager.core.model import HostId, PowerState, StopCause
from kvmha.proto.v1 import agent_pb2 as pb

UUID = "5b3c2f4e-1d2a-4c3b-9e8f-0a1b2c3d4e5f"


def _one(entry: pb.DomainPower) -> tuple[PowerState, StopCause, bool, bool]:
    message = pb.PowerStateReport(full=False, domains=[entry], hypervisor_connected=True)
    report = translate.power_report(HostId(1), message)
    domain = report.domains[0]
    return domain.power, domain.cause, domain.migrating, domain.paused


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        # full report of the target while memory is copied: PAUSED / VIR_DOMAIN_PAUSED_MIGRATION
        (dict(state=pb.POWER_PAUSED, cause=pb.CAUSE_PAUSED, libvirt_state=3, libvirt_reason=2,
              libvirt_event=-1, libvirt_detail=-1), (PowerState.POWER_ON, StopCause.PAUSED, True, True)),
        # delta of the target: the incoming copy was created (STARTED_MIGRATED), reported ON by the agent
        (dict(state=pb.POWER_ON, cause=pb.CAUSE_BOOTED, libvirt_state=1, libvirt_reason=-1,
              libvirt_event=2, libvirt_detail=1), (PowerState.POWER_ON, StopCause.NONE, True, False)),
        # delta of the source at switchover (SUSPENDED_MIGRATED)
        (dict(state=pb.POWER_PAUSED, cause=pb.CAUSE_PAUSED, libvirt_state=3, libvirt_reason=-1,
              libvirt_event=3, libvirt_detail=1), (PowerState.POWER_ON, StopCause.PAUSED, True, True)),
        # the target resumed it (RESUMED_MIGRATED): it runs there
        (dict(state=pb.POWER_ON, cause=pb.CAUSE_OTHER, libvirt_state=1, libvirt_reason=-1,
              libvirt_event=4, libvirt_detail=1), (PowerState.POWER_ON, StopCause.OTHER, False, False)),
        # the source's domain shut off because it migrated (STOPPED_MIGRATED)
        (dict(state=pb.POWER_OFF, cause=pb.CAUSE_MIGRATED, libvirt_state=5, libvirt_reason=-1,
              libvirt_event=5, libvirt_detail=3), (PowerState.POWER_OFF, StopCause.MIGRATED, False, False)),
        # paused by a user: paused, not a migration
        (dict(state=pb.POWER_PAUSED, cause=pb.CAUSE_PAUSED, libvirt_state=3, libvirt_reason=1,
              libvirt_event=-1, libvirt_detail=-1), (PowerState.POWER_ON, StopCause.PAUSED, False, True)),
    ],
)
def test_migration_states_are_read_from_state_reason_and_event(
    entry: dict[str, int], expected: tuple[PowerState, StopCause, bool, bool]
) -> None:
    assert _one(pb.DomainPower(uuid=UUID, name="vm1", **entry)) == expected  # type: ignore[arg-type]
