"""Fencing policy: when the core may power a host off, and how long it waits after a failed attempt.

Fencing is the only action that can hurt a healthy host, so it has guards (peers.md: oVirt's policy, Proxmox's
disarm): no fencing during the start-up grace (agents have not reconnected yet and would all look silent), and none
while more than `fence.max.silent.ratio` of the enabled hosts are silent at once (a switch or the manager's own link
failed; fencing them would turn a network blip into a cluster-wide outage). A blocked fence leaves the host in Alert
and its VMs where they are: no restart on hope.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvmha.manager.core.hoststate import SILENT
from kvmha.manager.core.model import HostRecord, HostRole, HostStatus, ResourceState


def silent_share(hosts: Iterable[HostRecord]) -> tuple[int, int]:
    """(silent, managed) among enabled routing hosts; silent = lost unexpectedly and not yet resolved."""
    silent = managed = 0
    for host in hosts:
        if host.role is not HostRole.ROUTING or host.status is HostStatus.REMOVED:
            continue
        if host.resource_state is not ResourceState.ENABLED:
            continue
        managed += 1
        silent += host.status in SILENT
    return silent, managed


def fence_block_reason(
    *, now: float, started_at: float, startup_grace_s: float, silent: int, managed: int, max_silent_ratio: float
) -> str | None:
    """Why fencing is not allowed now, or None."""
    if now < started_at + startup_grace_s:
        return f"manager started {now - started_at:.1f} s ago (startup.grace {startup_grace_s:.0f} s)"
    if managed and silent / managed > max_silent_ratio:
        return (
            f"{silent} of {managed} hosts are silent (> {max_silent_ratio:.0%}): the manager is probably cut off, "
            "not the hosts"
        )
    return None


def fence_backoff_s(failed_attempts: int, first_s: float, max_s: float) -> float:
    """Delay before the next attempt after `failed_attempts` failures: first_s, 2x, 4x, … capped at max_s."""
    return float(min(max_s, first_s * 2 ** max(failed_attempts - 1, 0)))
