"""Flap detection: which hosts failed often enough to be avoided as restart targets for a while.

Invariants:
- A host's failure counts only when it went silent on its own. When more than `fence.max.silent.ratio` of the
  enabled hosts are silent at once, the manager or the network was the problem (the same judgement that blocks
  fencing): the failures of that incident — the hosts that went silent within one ping timeout of it — count for no
  host, and a hold-out they caused is lifted.
- A hold-out is a preference, never an exclusion: placement uses a held host when no stable host fits
  (core/targeting.py), so flap detection can delay nothing but the choice of target.
- The window, the count and the hold-out are read from the configuration at each failure: a change applies at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmha.manager.core.context import Ctx
from kvmha.manager.core.fencing import silent_share
from kvmha.manager.core.model import HostId, HostRecord


@dataclass(slots=True)
class FlapLog:
    failures: dict[HostId, list[float]] = field(default_factory=dict)  # when each host went silent on its own

    def note(self, host_id: HostId, now: float, window_s: float) -> int:
        """Count a failure of `host_id`; returns its failures within the window."""
        times = [t for t in self.failures.get(host_id, []) if t > now - window_s] + [now]
        self.failures[host_id] = times
        return len(times)

    def forgive_since(self, since: float, max_failures: int) -> list[HostId]:
        """A mass incident began at `since`: its failures count for no host. Returns the hosts that are no longer
        flapping because of it."""
        cleared: list[HostId] = []
        for host_id, times in self.failures.items():
            kept = [t for t in times if t < since]
            if len(kept) != len(times):
                if len(times) >= max_failures > len(kept):
                    cleared.append(host_id)
                self.failures[host_id] = kept
        return sorted(cleared)

    def host_failed(self, ctx: Ctx, host: HostRecord) -> None:
        """`host` just went silent (or was found dead at once): count it, unless most hosts are silent with it."""
        config, now = ctx.config, ctx.now
        silent, managed = silent_share(ctx.hosts.values())
        if managed and silent / managed > config.fence_max_silent_ratio:
            for host_id in self.forgive_since(now - config.ping_timeout_s, config.flap_max_failures):
                ctx.held.release(host_id)
                ctx.event(
                    "info",
                    f"host:{host_id}",
                    "host.flapping",
                    "no longer flapping: its last failure was part of an incident that silenced most hosts",
                )
            ctx.event(
                "info",
                f"host:{host.id}",
                "host.flap.ignored",
                f"silent with {silent} of {managed} hosts at once: not counted as its own failure",
            )
            return
        failures = self.note(host.id, now, config.flap_window_s)
        if failures >= config.flap_max_failures:
            ctx.held.hold(host.id, now + config.flap_holdout_s)
            ctx.event(
                "warning",
                f"host:{host.id}",
                "host.flapping",
                f"flapping ({failures} failures in {config.flap_window_s:.0f} s): avoided as a restart target "
                f"for {config.flap_holdout_s:.0f} s (used only when no stable host fits)",
            )
