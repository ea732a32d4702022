"""The lease over the hosts in the store, on SQLite, PostgreSQL and MariaDB (the database's own clock) and on the
simulator's in-memory store: one holder at a time, an epoch that only grows, every host owned with it, expiry judged
on the database's clock, and two managers asking at the same instant never both winning."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
from sqlalchemy import Engine, text

from kvmha.manager.adapters.db import migrate
from kvmha.manager.adapters.repository import SqlStore
from kvmha.manager.sim.memstore import MemoryStore
from kvmha.manager.store import AgentInfo, Store, UnitOfWork

T = TypeVar("T")
LEASE_S = 0.3  # short: expiry is waited for on the database's real clock
NOW = 1_764_057_600.5


@pytest.fixture
def store(engine: Engine) -> Store:
    migrate(engine)
    return SqlStore(engine)


def _in(store: Store, operation: Callable[[UnitOfWork], T]) -> T:
    with store.unit_of_work() as uow:
        result = operation(uow)
        uow.commit()
        return result


def _setup(store: Store, hosts: int = 2) -> None:
    def seed(uow: UnitOfWork) -> None:
        for name in ("m0", "m1", "m2"):
            uow.managers.register(name, f"{name}:50051", "test", NOW)
        for i in range(hosts):
            host_id = uow.hosts.add(f"uuid-{i}", f"h{i}", f"10.0.0.{i}", NOW)
            uow.hosts.record_agent(host_id, AgentInfo(), "m2", NOW)

    _in(store, seed)


def _wait_out_lease(store: Store) -> None:
    """Let the database's clock pass the lease (the memory store's clock is moved instead)."""
    if isinstance(store, MemoryStore) and isinstance(store.wall, _MovableWall):
        store.wall.now += LEASE_S * 2.5
    else:
        time.sleep(LEASE_S * 2.5)


def test_one_holder_epochs_grow_and_hosts_follow_the_lease(store: Store) -> None:
    _setup(store)
    assert _in(store, lambda uow: uow.managers.acquire_lease("m1", 60.0)) == 1
    assert _in(store, lambda uow: uow.managers.acquire_lease("m2", 60.0)) is None, "a live lease was taken"
    assert _in(store, lambda uow: uow.managers.renew_lease("m1", 1, 60.0)) is True
    assert _in(store, lambda uow: uow.managers.renew_lease("m2", 1, 60.0)) is False
    rows = {row.id: row.hosts_owned for row in _in(store, lambda uow: uow.managers.all())}
    assert rows == {"m0": 0, "m1": 2, "m2": 0}, "taking the lease takes every host"
    lease = _in(store, lambda uow: uow.managers.lease())
    assert lease is not None and lease.manager_id == "m1" and lease.epoch == 1
    assert lease.expires_at > lease.database_now


def test_an_expired_lease_is_taken_with_a_new_epoch_and_the_old_holder_cannot_renew(store: Store) -> None:
    _setup(store)
    assert _in(store, lambda uow: uow.managers.acquire_lease("m1", LEASE_S)) == 1
    _wait_out_lease(store)
    assert _in(store, lambda uow: uow.managers.acquire_lease("m2", 60.0)) == 2
    assert _in(store, lambda uow: uow.managers.renew_lease("m1", 1, 60.0)) is False, "a deposed holder renewed"
    details = _in(store, lambda uow: uow.hosts.details())
    assert {d.manager_id for d in details} == {"m2"}


def test_an_expired_lease_nobody_took_is_renewed_by_its_holder(store: Store) -> None:
    # A database outage that hits every manager: when it answers again, nobody acted meanwhile, nobody moves.
    _setup(store)
    assert _in(store, lambda uow: uow.managers.acquire_lease("m1", LEASE_S)) == 1
    _wait_out_lease(store)
    assert _in(store, lambda uow: uow.managers.renew_lease("m1", 1, 60.0)) is True
    assert _in(store, lambda uow: uow.managers.acquire_lease("m2", 60.0)) is None


def test_a_restarted_manager_takes_its_own_lease_with_a_new_epoch(store: Store) -> None:
    _setup(store)
    assert _in(store, lambda uow: uow.managers.acquire_lease("m1", 60.0)) == 1
    assert _in(store, lambda uow: uow.managers.acquire_lease("m1", 60.0)) == 2
    assert _in(store, lambda uow: uow.managers.renew_lease("m1", 1, 60.0)) is False, "the old incarnation renewed"


def test_an_acquisition_that_is_not_committed_leaves_nothing(store: Store) -> None:
    _setup(store)
    with store.unit_of_work() as uow:
        assert uow.managers.acquire_lease("m1", 60.0) == 1
    assert _in(store, lambda uow: uow.managers.acquire_lease("m2", 60.0)) == 1


def test_two_managers_asking_at_the_same_instant_never_both_win(store: Store) -> None:
    if not isinstance(store, SqlStore) or store.engine.dialect.name == "sqlite":
        pytest.skip("one writer at a time: concurrency is the server databases' question")
    _setup(store)
    _in(store, lambda uow: uow.managers.acquire_lease("m0", LEASE_S))  # m0 held it and died
    _wait_out_lease(store)
    for _ in range(5):
        _wait_out_lease_row(store)
        won = _ask_at_once(store, ("m1", "m2"))
        winners = [name for name, epoch in won.items() if epoch is not None]
        assert len(won) == 2 and len(winners) == 1, f"winners {winners} of {won}"


def _ask_at_once(store: Store, names: tuple[str, ...]) -> dict[str, int | None]:
    barrier, won = threading.Barrier(len(names)), dict[str, int | None]()

    def ask(name: str) -> None:
        with store.unit_of_work() as uow:
            barrier.wait()
            won[name] = uow.managers.acquire_lease(name, LEASE_S)
            uow.commit()

    threads = [threading.Thread(target=ask, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return won


def _wait_out_lease_row(store: Store) -> None:
    while True:
        lease = _in(store, lambda uow: uow.managers.lease())
        if lease is None or lease.expires_at < lease.database_now:
            return
        time.sleep(0.05)


class _MovableWall:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("test", [
    test_one_holder_epochs_grow_and_hosts_follow_the_lease,
    test_an_expired_lease_is_taken_with_a_new_epoch_and_the_old_holder_cannot_renew,
    test_an_expired_lease_nobody_took_is_renewed_by_its_holder,
    test_a_restarted_manager_takes_its_own_lease_with_a_new_epoch,
    test_an_acquisition_that_is_not_committed_leaves_nothing,
])
def test_memory_store_keeps_the_same_contract(test: Callable[[Store], None]) -> None:
    test(MemoryStore(wall=_MovableWall()))


def test_a_host_that_connects_later_is_owned_with_the_holders_epoch(store: Store) -> None:
    if not isinstance(store, SqlStore):
        pytest.skip("the epoch column is the SQL stores' (the memory store keeps the owner only)")
    _setup(store, hosts=1)
    assert _in(store, lambda uow: uow.managers.acquire_lease("m1", 60.0)) == 1
    assert _in(store, lambda uow: uow.managers.acquire_lease("m1", 60.0)) == 2

    def later(uow: UnitOfWork) -> None:
        host_id = uow.hosts.add("uuid-late", "late", "10.0.0.9", NOW)
        uow.hosts.record_agent(host_id, AgentInfo(), "m1", NOW)

    _in(store, later)
    with store.engine.connect() as connection:
        epochs = {str(name): epoch for name, epoch in connection.execute(text("SELECT name, owner_epoch FROM host"))}
    assert epochs == {"h0": 2, "late": 2}
