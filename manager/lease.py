"""A manager's standing under the lease over the hosts: pure rules (times in, answers out), kept by the driver.

Theory of operation. Several managers may share one PostgreSQL or MariaDB database; one row of it, the lease
(`store.LeaseRow`), names the one manager that may act on the hosts, with an epoch that only grows. The others are
standbys: they serve admin reads, refuse agents (which then move on to the next manager in their list), and try to
take the lease every `poll_s`. The database judges expiry on its own clock; a manager judges, on its own monotonic
clock, how long it may act after the database confirmed its lease:

    acting window = from `asked_at` (the moment *before* the confirming transaction began)
                    to `asked_at + lease_s - margin_s`

The database counted the same lease from its clock at the renewal, which is later than `asked_at`; so the window
closes before any other manager can take the lease over, as long as the two clocks' rates differ by less than
`margin_s` over `lease_s` and a command, fence or BMC query that left inside the window has started acting within
what remains of the margin (it is checked when it leaves, not when it arrives). A power-off twice is harmless; a VM
start or a power-on after the lease could have expired is what the margin exists to prevent.

Invariants:
- **Records only on a confirmed lease.** The driver renews the lease in the same transaction that records a batch;
  when the renewal finds another epoch the transaction writes nothing (`LeaseLost`).
- **Commands only inside the window.** A command, fence or BMC query leaves only while `may_act(now)`.
- **No lease, no action; streams kept.** A manager whose renewal could not be confirmed (the database is slow or
  down) is LAPSED: it acts on nothing and keeps its agents' streams, because nobody else has taken their hosts (a
  database outage that hits every manager causes no reconnect storm). Only LOST, another epoch holding the hosts,
  makes it drop its core and tell its agents to move.
- **The epoch only grows.** Every acquisition takes one more than any before (the store guarantees it), so a
  command stamped with an older epoch is stale wherever it arrives.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from kvmha.manager.store import LeaseRow


class Standing(enum.StrEnum):
    STANDBY = "standby"  # no lease: serve reads, refuse agents, try to acquire every poll_s
    ACTIVE = "active"  # lease confirmed and inside its acting window: act
    LAPSED = "lapsed"  # lease held, window closed without a confirmed renewal: act on nothing, keep the streams


class LeaseEvent(enum.StrEnum):
    ACQUIRED = "acquired"  # the store gave this manager the lease with a new epoch
    RENEWED = "renewed"  # a transaction renewed it (same epoch)
    WINDOW_CLOSED = "window-closed"  # the acting window passed without a confirmed renewal (time, not a message)
    LOST = "lost"  # a renewal found another epoch: someone took the hosts over


# What each event does in each standing; a pair that is missing cannot happen (tests walk the table).
TRANSITIONS: dict[tuple[Standing, LeaseEvent], Standing] = {
    (Standing.STANDBY, LeaseEvent.ACQUIRED): Standing.ACTIVE,
    (Standing.ACTIVE, LeaseEvent.RENEWED): Standing.ACTIVE,
    (Standing.ACTIVE, LeaseEvent.WINDOW_CLOSED): Standing.LAPSED,
    (Standing.ACTIVE, LeaseEvent.LOST): Standing.STANDBY,
    (Standing.LAPSED, LeaseEvent.RENEWED): Standing.ACTIVE,  # nobody took it meanwhile: nobody acted meanwhile
    (Standing.LAPSED, LeaseEvent.LOST): Standing.STANDBY,
}


class LeaseLost(RuntimeError):
    """A renewal found another epoch: another manager has taken the hosts over. Nothing of the transaction stays."""


class LeaseError(ValueError):
    """Lease terms that could not keep the promise (a window that closes after another manager may act)."""


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    lease_s: float = 6.0  # how long the database keeps a lease after its last renewal
    margin_s: float = 2.0  # clock-rate difference + the time a command needs to start acting, taken off the window
    poll_s: float = 1.0  # how often a standby tries to take the lease
    renew_every_s: float = 1.0  # how often an idle active manager renews it (the store probe)

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) and v > 0 for v in (self.lease_s, self.margin_s, self.poll_s,
                                                         self.renew_every_s)):
            raise LeaseError("lease terms must be positive and finite")
        if self.margin_s >= self.lease_s:
            raise LeaseError(f"the margin ({self.margin_s} s) leaves no acting window in a {self.lease_s} s lease")
        if self.renew_every_s >= self.window_s:
            raise LeaseError(f"renewing every {self.renew_every_s} s lets the {self.window_s} s acting window close")

    @property
    def window_s(self) -> float:
        """How long after `asked_at` a confirmed lease lets this manager act."""
        return self.lease_s - self.margin_s


class Lease:
    """This manager's lease as it knows it: its epoch and until when (monotonic) it may act."""

    def __init__(self, terms: LeaseTerms) -> None:
        self.terms = terms
        self.epoch: int | None = None  # None: standby
        self.acting_until = -math.inf

    def standing(self, now: float) -> Standing:
        if self.epoch is None:
            return Standing.STANDBY
        return Standing.ACTIVE if now < self.acting_until else Standing.LAPSED

    def may_act(self, now: float) -> bool:
        return self.standing(now) is Standing.ACTIVE

    def acquired(self, epoch: int, asked_at: float) -> None:
        self._step(LeaseEvent.ACQUIRED, asked_at)
        self.epoch, self.acting_until = epoch, asked_at + self.terms.window_s

    def renewed(self, epoch: int, asked_at: float) -> None:
        """A renewal of `epoch` asked at `asked_at` committed. One of an epoch since given up changes nothing."""
        if epoch != self.epoch:
            return
        self._step(LeaseEvent.RENEWED, asked_at)
        # Renewals can finish out of order (the probe and a batch): the window only ever moves forward.
        self.acting_until = max(self.acting_until, asked_at + self.terms.window_s)

    def lost(self, now: float) -> None:
        self._step(LeaseEvent.LOST, now)
        self.epoch, self.acting_until = None, -math.inf

    def _step(self, event: LeaseEvent, now: float) -> Standing:
        standing = self.standing(now)
        after = TRANSITIONS.get((standing, event))
        if after is None:
            raise AssertionError(f"lease: {event} cannot happen while {standing}")
        return after


ExpiredLease = tuple[int, float]  # (epoch, expires_at in database time) of another manager's lease seen expired


def may_take(lease: LeaseRow | None, me: str, seen_before: ExpiredLease | None) -> tuple[bool, ExpiredLease | None]:
    """Whether a standby may try to take the lease now, and what to remember for its next look.

    Another manager's expired lease is taken only when the previous look (one poll earlier) already found this same
    lease expired. A database stall that hit every manager lets every lease expire in database time; when the
    database answers, the holder's renewal is queued with the standbys' attempts, and without this second look
    whichever ran first took the hosts over and moved every agent (issue 15: a stall that hits everyone moves
    nobody). A dead holder's hosts are taken one poll later. A free lease, none yet, or this manager's own (a
    restart) is taken at once; the store's acquisition stays the atomic check."""
    if lease is None or lease.manager_id in (None, me):
        return True, seen_before
    expired = (lease.epoch, lease.expires_at) if lease.expires_at <= lease.database_now else None
    return expired is not None and expired == seen_before, expired
