"""The environment port: everything the driver needs from the world it runs in (pve-ha-manager's `PVE::HA::Env`).

One driver (kvmha.manager.driver) runs against two environments:
- production (kvmha.manager.service): the system clock, SQLAlchemy in worker threads, commands on the agents'
  gRPC streams, IPMI fences and BMC queries in a thread pool, logs and Prometheus metrics;
- simulation (kvmha.manager.sim.env): simulated time, an in-memory store that fails or stalls on demand, commands
  delivered to simulated agents and BMCs with latency, and a journal that writes the scenario log.

The parts:
- `Clock`: the core's monotonic seconds, the wall clock, and the conversion between them (adapters/clock.py is the
  only module that converts records). `clock.monotonic()` must be the running asyncio loop's `time()`: the
  driver's timers are the loop's (`call_later`), so the simulator provides a loop on virtual time.
- `Persistence`: runs an operation in one unit of work of the store port and returns its result; may raise (the
  database is down), in which case the driver retries and nothing acts before it is recorded.
- `Transport`: commands to agents, fences and BMC queries, agent disconnects. Every answer comes back as a fact
  through the one `Submit` callable the driver passes in (ok=False when it cannot even be sent); an answer that
  never comes is timed out by the core itself.
- `Journal`: what the driver observed (facts handled and how long each waited, actions taken, transactions
  committed, failed writes, the store's outages, poison facts dropped);
  production turns it into logs, metrics and event-follower wake-ups, the simulator into log lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from kvmha.manager.core import actions, facts
from kvmha.manager.store import UnitOfWork

T = TypeVar("T")
Submit = Callable[[facts.Fact], None]


class Clock(Protocol):
    def monotonic(self) -> float: ...
    def wall(self) -> float: ...
    def to_wall(self, mono: float) -> float: ...
    def to_mono(self, wall: float) -> float: ...


class Probe(Generic[T]):
    """An operation that asks whether the store commits (the driver's store probe). Production runs it on a thread of
    its own: queued behind busy worker threads it would time out and call a loaded store down (seen at 6,000 agents:
    the driver held its decisions again and again while the database answered in milliseconds)."""

    def __init__(self, operation: Callable[[UnitOfWork], T]) -> None:
        self.operation = operation

    def __call__(self, uow: UnitOfWork) -> T:
        return self.operation(uow)


class Persistence(Protocol):
    async def transact(self, operation: Callable[[UnitOfWork], T]) -> T: ...


class Transport(Protocol):
    def send_command(self, action: actions.SendCommand, answer: Submit) -> None: ...
    def fence(self, action: actions.Fence, timeout_s: float, answer: Submit) -> None: ...
    def query_bmc(self, action: actions.QueryBmc, timeout_s: float, answer: Submit) -> None: ...
    def disconnect(self, action: actions.DisconnectAgent) -> None: ...


@dataclass(frozen=True, slots=True)
class Commit:
    """One transaction of the driver: how many facts and timers it records, what it stored, what then left."""

    decided_at: float  # the core's time of the batch
    committed_at: float  # later than decided_at when the store was slow or down
    facts: int
    ticked: bool
    hosts: int
    vms: int
    works: int
    events: int
    deleted: int
    commands: int  # commands, fences and BMC queries sent after the commit
    attempts: int  # 1 unless the store failed first


class Journal(Protocol):
    def fact_handled(self, fact: facts.Fact, waited_s: float) -> None: ...  # waited_s: arrival -> handled
    def action_taken(self, action: actions.Action, now: float) -> None: ...
    def committed(self, commit: Commit) -> None: ...
    def write_failed(self, error: BaseException, retry_in_s: float) -> None: ...
    def store_unavailable(self, error: str) -> None: ...  # once per outage
    def store_available(self, down_s: float) -> None: ...  # once, when it commits again
    def fact_dropped(self, source: str, error: str) -> None: ...  # a poison fact the store refused


@dataclass(frozen=True, slots=True)
class Env:
    clock: Clock
    persistence: Persistence
    transport: Transport
    journal: Journal
