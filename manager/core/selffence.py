"""The self-fence guarantee of a host, as the manager counts on it (issue 11).

Invariants:
- A host's self-fence is BACKED only when its agent reported an armed kvmha-watchdog at its last contact (Hello or
  the last Ping) and `isolation.self.fence` is on; the value is kept on the host record (saved with its last ping),
  so a restarted manager counts with the same facts. Anything else — not armed, daemon gone, an old agent, an
  unusable bound — is NONE: the host's silence never proves it dead.
- The bound is the agent's last contact + `isolation.after` + the watchdog's bound T + `isolation.margin` of stale
  heartbeat (investigation.self_fenced_after_s), and that + `isolation.link.slack` of agent silence.
- A host that cannot be fenced and whose self-fence is NONE gets one `host.needs.operator` alert per silence: why,
  and what the operator can do.
"""

from __future__ import annotations

from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.context import Ctx
from kvmha.manager.core.investigation import SelfFence, self_fenced_after_s
from kvmha.manager.core.model import HostRecord, WatchdogReport


def self_fence(config: CoreConfig, host: HostRecord) -> tuple[SelfFence, float]:
    """Whether the host's self-fence is guaranteed, and the heartbeat age after which it has surely happened."""
    backed = config.isolation_self_fence and host.watchdog_timeout_s is not None
    bound_s = self_fenced_after_s(config.isolation_after_s, config.isolation_margin_s, host.watchdog_timeout_s)
    return (SelfFence.BACKED if backed else SelfFence.NONE), bound_s


def note_watchdog(ctx: Ctx, host: HostRecord, report: WatchdogReport) -> bool:
    """Keep the host's self-fence guarantee as its agent last reported it; True when it changed. A change is an event
    when it matters to the operator: a host that lost its watchdog will not be declared dead by its silence."""
    timeout_s = report.timeout_s if report.armed else None
    detail = "" if report.armed else report.detail or "no detail"
    if (timeout_s, detail) == (host.watchdog_timeout_s, host.watchdog_detail):
        return False
    known_before = host.watchdog_timeout_s is not None or bool(host.watchdog_detail)
    host.watchdog_timeout_s, host.watchdog_detail = timeout_s, detail
    if timeout_s is None:
        ctx.event(
            "warning",
            f"host:{host.id}",
            "host.watchdog",
            f"watchdog not armed ({detail}): if this host goes silent, its silence will not prove it dead",
        )
    elif known_before:
        ctx.event(
            "info",
            f"host:{host.id}",
            "host.watchdog",
            f"watchdog armed: the host resets at most {timeout_s:.0f} s after its agent's last sign of life",
        )
    return True


def tell_operator(ctx: Ctx, host: HostRecord) -> None:
    """Why a silent host that cannot be fenced is not declared dead, and what the operator can do."""
    if not ctx.config.isolation_self_fence:
        why = "agents are not counted on to self-fence (isolation.self.fence=false)"
    else:
        why = f"its watchdog was not armed at its agent's last contact ({host.watchdog_detail or 'no detail'})"
    fence = "its BMC does not answer" if host.has_bmc else "it has no BMC"
    ctx.event(
        "alert",
        f"host:{host.id}",
        "host.needs.operator",
        f"{host.name} is silent, {fence}, and {why}: it is never declared dead by its silence, its HA VMs wait. "
        f"To recover them: fix its BMC (`kvmha host bmc {host.name} ...`), or make sure it is powered off and run "
        f"`kvmha host confirm-down {host.name}`",
    )
