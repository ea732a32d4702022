"""Every state table of the core, walked whole: each allowed move gives its target, every other pair raises, and no
live state is a dead end. The host, work-step and VM-state tables are all data, so these walks are the proof that
nothing moves outside them."""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

import kvmha.manager.core
from kvmha.manager.core import hoststate, resourcestate, vmstate, workstep
from kvmha.manager.core.hoststate import TransitionError
from kvmha.manager.core.model import HostStatus, ResourceState, VmState, WorkStep

Table = Mapping[tuple[Any, Any], Any]  # key types differ per table (and Mapping keys are invariant)
TABLES: list[tuple[str, Table, type[enum.Enum], type[enum.Enum], Callable[..., enum.Enum]]] = [
    ("host", hoststate.TRANSITIONS, HostStatus, hoststate.HostEvent, hoststate.next_status),
    ("work", workstep.TRANSITIONS, WorkStep, workstep.WorkEvent, workstep.next_step),
    ("vm", vmstate.TRANSITIONS, VmState, vmstate.VmEvent, vmstate.next_vm_state),
    ("resource", resourcestate.TRANSITIONS, ResourceState, resourcestate.ResourceEvent,
     resourcestate.next_resource_state),
]


@pytest.mark.parametrize(("name", "table", "states", "events", "move"), TABLES, ids=[t[0] for t in TABLES])
def test_every_pair_is_allowed_by_the_table_or_raises(
    name: str, table: Table, states: type[enum.Enum], events: type[enum.Enum], move: Callable[..., enum.Enum]
) -> None:
    allowed = raised = 0
    for state, event in itertools.product(states, events):
        if (state, event) in table:
            assert move(state, event) is table[(state, event)], (name, state, event)
            allowed += 1
        else:
            with pytest.raises(TransitionError, match=str(state.value)):
                move(state, event)
            raised += 1
    assert allowed == len(table) and raised > 0


@pytest.mark.parametrize(("name", "table", "states", "events", "move"), TABLES, ids=[t[0] for t in TABLES])
def test_every_event_is_used_and_targets_are_states(
    name: str, table: Table, states: type[enum.Enum], events: type[enum.Enum], move: Callable[..., enum.Enum]
) -> None:
    assert {event for _, event in table} == set(events), f"{name}: an event no transition uses"
    assert all(isinstance(target, states) for target in table.values())


def _reachable(table: Table, start: enum.Enum) -> set[Any]:
    seen, todo = {start}, [start]
    while todo:
        current = todo.pop()
        for (source, _event), target in table.items():
            if source is current and target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_every_active_work_step_can_end() -> None:
    """HA work never strands: from every step it can enter, some events lead to Done, Error or Cancelled."""
    entered = {WorkStep.SCHEDULED} | set(workstep.TRANSITIONS.values())
    for step in entered - workstep.FINAL:
        assert _reachable(workstep.TRANSITIONS, step) & workstep.FINAL, step
    assert WorkStep.STOPPING not in entered  # a step of the stop work types, never of HA work


def test_work_steps_expected() -> None:
    W, E = WorkStep, workstep.WorkEvent
    assert workstep.next_step(W.SCHEDULED, E.START) is W.RESTARTING
    assert workstep.next_step(W.FENCING, E.WAIT_VERDICT) is W.INVESTIGATING  # the fence failed, re-investigation
    assert workstep.next_step(W.RESTARTING, E.START_FAILED) is W.SCHEDULED
    assert workstep.next_step(W.RESTARTING, E.CONFIRMED) is W.DONE
    for final in workstep.FINAL:
        for event in E:
            with pytest.raises(TransitionError):
                workstep.next_step(final, event)
    with pytest.raises(TransitionError):
        workstep.next_step(W.SCHEDULED, E.CONFIRMED)  # Done only after a start


def test_vm_states_expected() -> None:
    V, E = VmState, vmstate.VmEvent
    assert vmstate.next_vm_state(V.STOPPING, E.FOLLOWED) is V.STOPPING  # a stop in progress is not forgotten
    assert vmstate.next_vm_state(V.RUNNING, E.FOLLOWED) is V.RUNNING
    assert vmstate.next_vm_state(V.STARTING, E.CONFIRMED) is V.RUNNING
    assert vmstate.next_vm_state(V.UNMANAGED, E.ADOPTED_RUNNING) is V.RUNNING
    for event in E:  # an Unmanaged domain leaves only by registration
        if event not in (E.ADOPTED_RUNNING, E.ADOPTED_STOPPED):
            with pytest.raises(TransitionError):
                vmstate.next_vm_state(V.UNMANAGED, event)
    with pytest.raises(TransitionError):
        vmstate.next_vm_state(V.STOPPED, E.CONFIRMED)  # confirmed only after a start


def test_every_vm_state_can_get_back_to_running() -> None:
    for state in VmState:
        assert VmState.RUNNING in _reachable(vmstate.TRANSITIONS, state), state


def test_no_state_is_assigned_outside_its_table() -> None:
    """A lint over the core's sources: every assignment of a host status, work step or VM state reads its table."""
    core = Path(kvmha.manager.core.__file__).parent
    assignment = re.compile(r"\.(status|step|state|resource_state)\s*=[^=]")
    offenders = []
    for path in sorted(core.glob("*.py")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if assignment.search(line) and not re.search(r"next_(status|step|vm_state|resource_state)\(", line):
                if path.name == "vmindex.py" and line.strip().startswith("vm.state = new"):
                    continue  # `new` comes from next_vm_state two lines above (checked before the record changes)
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def test_resource_states_expected() -> None:
    R, E = ResourceState, resourcestate.ResourceEvent
    assert resourcestate.next_resource_state(R.ENABLED, E.PREPARE) is R.PREPARE_FOR_MAINTENANCE
    assert resourcestate.next_resource_state(R.PREPARE_FOR_MAINTENANCE, E.EMPTIED) is R.MAINTENANCE
    assert resourcestate.next_resource_state(R.PREPARE_FOR_MAINTENANCE, E.STUCK) is R.ERROR_IN_MAINTENANCE
    assert resourcestate.next_resource_state(R.ERROR_IN_MAINTENANCE, E.PREPARE) is R.PREPARE_FOR_MAINTENANCE
    for state in resourcestate.IN_MAINTENANCE:  # `maintenance off` always returns a host to service
        assert resourcestate.next_resource_state(state, E.LEAVE) is R.ENABLED
    with pytest.raises(TransitionError):
        resourcestate.next_resource_state(R.MAINTENANCE, E.ENABLE)  # maintenance off, not enable


def test_every_resource_state_can_get_back_to_enabled() -> None:
    for state in ResourceState:
        assert ResourceState.ENABLED in _reachable(resourcestate.TRANSITIONS, state), state


def test_migration_work_steps_and_vm_states_expected() -> None:
    W, E, V, VE = WorkStep, workstep.WorkEvent, VmState, vmstate.VmEvent
    assert workstep.next_step(W.SCHEDULED, E.MIGRATE) is W.MIGRATING
    assert workstep.next_step(W.MIGRATING, E.MIGRATED) is W.DONE
    assert workstep.next_step(W.MIGRATING, E.MIGRATION_FAILED) is W.ERROR
    with pytest.raises(TransitionError):
        workstep.next_step(W.MIGRATING, E.START)  # a migration item never starts a VM
    assert vmstate.next_vm_state(V.RUNNING, VE.MIGRATION_STARTED) is V.MIGRATING
    assert vmstate.next_vm_state(V.MIGRATING, VE.MIGRATED) is V.RUNNING
    assert vmstate.next_vm_state(V.MIGRATING, VE.START_SENT) is V.STARTING  # neither side held it: HA restart
    with pytest.raises(TransitionError):
        vmstate.next_vm_state(V.STOPPED, VE.MIGRATION_STARTED)  # only a running VM migrates
