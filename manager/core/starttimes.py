"""Measured VM start times, for the what-if planner's estimate of when each VM runs again (issue 16).

A start is timed from the StartVm the scheduler sends to the power report that shows the VM on (what a restart waits
for before it is Done). The planner reads the median of the last `HOST_WINDOW` starts on a target host once it has
`MIN_SAMPLES` of them, else the median of the last `CLUSTER_WINDOW` starts anywhere, else `DEFAULT_START_S`.

Invariants:
- Medians, not means: one start that waited for a slow host or spanned a manager restart does not move the estimate.
- Memory is bounded: a window per host that ever started a VM, and one for the cluster. Nothing is persisted; a
  new manager estimates from its own starts.
- An estimate only: nothing decides on it.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvmha.manager.core.model import HostId

DEFAULT_START_S = 1.1  # a VM start confirmed by its target's power report (bench/failover.py, lab)
HOST_WINDOW = 20
CLUSTER_WINDOW = 50
MIN_SAMPLES = 3


@dataclass(frozen=True, slots=True)
class StartEstimate:
    """Seconds a start takes: on a given host when measured there, else in the cluster."""

    cluster_s: float = DEFAULT_START_S
    per_host_s: Mapping[HostId, float] = field(default_factory=dict)
    samples: int = 0  # starts the cluster estimate is the median of (0: the default)

    def on(self, host_id: HostId | None) -> float:
        return self.per_host_s.get(host_id, self.cluster_s) if host_id is not None else self.cluster_s


class StartTimes:
    def __init__(self) -> None:
        self._cluster: deque[float] = deque(maxlen=CLUSTER_WINDOW)
        self._hosts: dict[HostId, deque[float]] = {}

    def observe(self, host_id: HostId, took_s: float) -> None:
        if took_s < 0:
            return
        self._cluster.append(took_s)
        self._hosts.setdefault(host_id, deque(maxlen=HOST_WINDOW)).append(took_s)

    def estimate(self) -> StartEstimate:
        if len(self._cluster) < MIN_SAMPLES:
            return StartEstimate()
        return StartEstimate(
            statistics.median(self._cluster),
            {h: statistics.median(times) for h, times in self._hosts.items() if len(times) >= MIN_SAMPLES},
            len(self._cluster),
        )
