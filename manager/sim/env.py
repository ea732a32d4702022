"""The simulated environment of the driver (see kvmha.manager.env): the same ports production has, played by the
simulated world.

- Clock: the loop's virtual time, both monotonic and wall (the conversion is the identity).
- Persistence: the in-memory store; while the store is `down` every transaction fails (the driver retries, as
  against a dead database), while it is stalled every transaction first waits (simulated seconds) until the stall
  ends — a slow database, during which facts pile up in the driver's inbox.
- Transport: commands travel to the simulated agents and fences/BMC queries to the simulated BMCs (sim/agents.py),
  with the network's latency and faults; answers come back as facts on the same network.
- Journal: the scenario log's driver lines ("db ... commit"), the write failures, and the decision count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from kvmha.manager.core import actions, facts
from kvmha.manager.driver import LeaseGuarded
from kvmha.manager.env import Commit, Submit
from kvmha.manager.sim.memstore import MemoryStore
from kvmha.manager.store import UnitOfWork

if TYPE_CHECKING:
    from kvmha.manager.sim.simulator import Simulator

T = TypeVar("T")


class SimClock:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def monotonic(self) -> float:
        return self._loop.time()

    def wall(self) -> float:
        return self._loop.time()

    def to_wall(self, mono: float) -> float:
        return mono

    def to_mono(self, wall: float) -> float:
        return wall


class DriverHold:
    """An operation that holds the driver for `seconds` without touching the store (the `driver stall` fault): run
    in the driver's order like an operator operation, it keeps the driver from its inbox while the world goes on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, uow: UnitOfWork) -> None:
        pass


class SimPersistence:
    def __init__(self, store: MemoryStore, clock: SimClock) -> None:
        self._store, self._clock = store, clock

    async def transact(self, operation: Callable[[UnitOfWork], T]) -> T:
        held = operation.operation if isinstance(operation, LeaseGuarded) else operation
        if isinstance(held, DriverHold):
            await asyncio.sleep(held.seconds)
        # Never suspends unless the database is stalled: a transaction takes no simulated time, as before.
        wait_s = self._store.stalled_until - self._clock.monotonic()
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        with self._store.unit_of_work() as uow:
            return operation(uow)


class SimTransport:
    """Carries one manager incarnation's actions into the world: answers to an older incarnation are lost."""

    def __init__(self, sim: Simulator, epoch: int) -> None:
        self._sim, self._epoch = sim, epoch

    def send_command(self, action: actions.SendCommand, answer: Submit) -> None:
        self._sim.agents.send_command(action, self._epoch)

    def fence(self, action: actions.Fence, timeout_s: float, answer: Submit) -> None:
        self._sim.agents.fence(action, self._epoch)

    def query_bmc(self, action: actions.QueryBmc, timeout_s: float, answer: Submit) -> None:
        self._sim.agents.query_bmc(action, self._epoch)

    def disconnect(self, action: actions.DisconnectAgent) -> None:
        self._sim.agents.disconnect(action.host_id)


LogLine = Callable[[str, float, str], None]  # (kind, simulated time, text)


class SimJournal:
    def __init__(self, log_line: LogLine, clock: SimClock) -> None:
        self._log_line, self._clock = log_line, clock
        self.facts = 0
        self.commits = 0
        self.largest_batch = 0  # most facts recorded by one transaction
        self.write_failures = 0
        self.longest_wait_s = 0.0  # the driver's largest lag (a fact's arrival -> handled)
        self.dropped = 0
        self.outages = 0

    def fact_handled(self, fact: facts.Fact, waited_s: float) -> None:
        self.facts += 1
        self.longest_wait_s = max(self.longest_wait_s, waited_s)

    def action_taken(self, action: actions.Action, now: float) -> None:
        pass

    def committed(self, commit: Commit) -> None:
        self.commits += 1
        self.largest_batch = max(self.largest_batch, commit.facts)
        self._log_line("db", commit.committed_at, describe(commit))

    def write_failed(self, error: BaseException, retry_in_s: float) -> None:
        self.write_failures += 1
        self._log_line("db", self._clock.monotonic(), f"write failed ({error}); retry in {retry_in_s:.1f} s")

    def store_unavailable(self, error: str) -> None:
        self.outages += 1
        self._log_line("db", self._clock.monotonic(), f"database unavailable ({error}): no decisions until it commits")

    def store_available(self, down_s: float) -> None:
        self._log_line("db", self._clock.monotonic(), f"database commits again after {down_s:.1f} s")

    def fact_dropped(self, source: str, error: str) -> None:
        self.dropped += 1
        self._log_line("db", self._clock.monotonic(), f"dropped {source}: the database refused it ({error})")


def describe(commit: Commit) -> str:
    """One line per transaction of the driver: what it recorded (batching), and what left only after (persist
    first). E.g. "commit 2 facts + timers: 1 host, 2 works, 5 events; then 3 sent"."""
    source = [f"{commit.facts} fact{'s' * (commit.facts != 1)}"] if commit.facts else []
    if commit.ticked:
        source.append("timers")
    counts = [(commit.hosts, "host"), (commit.vms, "vm"), (commit.works, "work"), (commit.deleted, "deleted vm"),
              (commit.events, "event")]
    stored = ", ".join(f"{n} {what}{'s' * (n != 1)}" for n, what in counts if n) or "nothing"
    line = f"commit {' + '.join(source) or 'nothing'}: {stored}"
    if commit.commands:
        line += f"; then {commit.commands} sent"
    if commit.attempts > 1 or commit.committed_at > commit.decided_at:
        line += f" (decided at {commit.decided_at:.1f}, attempt {commit.attempts})"
    return line
