"""Flap detection: which hosts failed often enough to be avoided as restart targets for a while.

Invariants:
- A host's failure counts only when it went silent on its own. When more than `fence.max.silent.ratio` of the
  enabled hosts are silent at once, the manager or the network was the problem (the same judgement that blocks
  fencing): the failures of that incident — the hosts that went silent within one ping timeout of it — count for no
  host, and a hold-out they caused is lifted.
- A hold-out is a preference, never an exclusion: placement uses a held host when no stable host fits (the
  scheduler's `_place`), so flap detection can delay nothing but the choice of target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmha.manager.core.model import HostId


@dataclass(slots=True)
class FlapLog:
    window_s: float
    max_failures: int
    failures: dict[HostId, list[float]] = field(default_factory=dict)  # when each host went silent on its own

    def note(self, host_id: HostId, now: float) -> int:
        """Count a failure of `host_id`; returns its failures within the window (flapping at `max_failures`)."""
        times = [t for t in self.failures.get(host_id, []) if t > now - self.window_s] + [now]
        self.failures[host_id] = times
        return len(times)

    def forgive_since(self, since: float) -> list[HostId]:
        """A mass incident began at `since`: its failures count for no host. Returns the hosts that are no longer
        flapping because of it."""
        cleared: list[HostId] = []
        for host_id, times in self.failures.items():
            kept = [t for t in times if t < since]
            if len(kept) != len(times):
                if len(times) >= self.max_failures > len(kept):
                    cleared.append(host_id)
                self.failures[host_id] = kept
        return sorted(cleared)
