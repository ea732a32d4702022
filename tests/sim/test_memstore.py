"""The simulator's in-memory store keeps the store port's contract: the SQL stores' suite, run on it."""

from __future__ import annotations

import pytest

from kvmha.manager.sim.memstore import MemoryStore, StoreError
from kvmha.manager.store import Store
from tests.db.test_repository import (  # noqa: F401 - collected here, against the fixture below
    test_a_groups_stored_hosts_are_found_by_uuid_at_once,
    test_deleting_a_vm_deletes_its_work_and_a_rollback_undoes_it,
    test_events_and_config,
    test_finished_work_of_a_window,
    test_host_and_vm_records_round_trip,
    test_hosts_take_commands_and_hand_out_details,
    test_ids_of_deleted_vms_and_their_work_are_never_given_again,
    test_records_handed_out_are_copies,
    test_two_active_items_for_one_vm_are_refused,
    test_uncommitted_unit_of_work_leaves_nothing,
    test_work_save_keeps_one_active_item_per_vm_and_ends_it,
)


@pytest.fixture
def store() -> Store:
    return MemoryStore(wall=lambda: 0.0)


def test_a_store_that_is_down_refuses_every_transaction() -> None:
    store = MemoryStore(wall=lambda: 0.0)
    store.down = True
    with pytest.raises(StoreError):
        store.unit_of_work()
    store.down = False
    with store.unit_of_work() as uow:
        assert uow.hosts.all() == []


def test_listeners_hear_only_committed_events() -> None:
    store = MemoryStore(wall=lambda: 0.0)
    heard: list[str] = []
    store.event_listeners.append(lambda rows: heard.extend(row.message for row in rows))
    with store.unit_of_work() as uow:
        uow.events.add(1.0, "info", "manager", "x", "rolled back")
    with store.unit_of_work() as uow:
        uow.events.add(2.0, "info", "manager", "x", "kept")
        uow.commit()
    assert heard == ["kept"]
