"""Isolation response (self-fencing): what a host does when it can reach neither the manager nor its storage.

Why: the manager restarts the VMs of a host it cannot fence only after the host's storage heartbeat has been stale
for longer than `after_s` plus a margin (issue 7). A host that lost both the manager and its storage for `after_s`
must therefore assume its VMs are being started elsewhere, and stop them itself before two copies write one disk.

Rules (the pure `decide` below; times are monotonic seconds):
- Isolated = no manager link for more than `after_s` AND no successful heartbeat write on any path for more than
  `after_s`. One working path is enough to not be isolated (the neighbours can still read it).
- Without configured storage paths there is no heartbeat the manager could rely on, so the manager never restarts
  this host's VMs on heartbeat grounds, and the agent never self-fences: policy `none` in effect.
- The action runs once per isolation episode; the episode ends when the manager link or a heartbeat write returns.
- Policies: `none` (log only), `destroy-vms` (destroy every running domain), `reboot-host` (immediate reboot via
  sysrq, like CloudStack's agent; documented, never run by the tests).
- Backed by the watchdog (issue 11): from the moment isolation is declared until the response is *complete*
  (every domain verified off), `response_pending` says why the agent must withhold its watchdog pets; the
  response is retried every tick, and if it does not complete in time (a destroy fails, libvirtd hangs) the
  watchdog resets the host. `reboot-host` is never "complete" while the agent still runs.
- `after_s` is the manager's value once a Welcome carried one (`set_after_s`): the manager counts with it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from kvmha.agent.hypervisor import Hypervisor, HypervisorError, Power

log = logging.getLogger("kvmha.agent.isolation")


class Action(enum.Enum):
    NOTHING = "nothing"
    LOG_ONLY = "log-only"
    DESTROY_VMS = "destroy-vms"
    REBOOT_HOST = "reboot-host"


@dataclass(frozen=True)
class IsolationFacts:
    now: float
    manager_seen_at: float  # last moment the manager link was up (or the agent's start)
    storage_ok_at: float | None  # last successful heartbeat write on any path (None: never)
    started_at: float  # the agent's start: "never written" counts from here
    storage_configured: bool
    acted: bool  # the action already ran in this episode


@dataclass(frozen=True)
class Decision:
    isolated: bool
    action: Action
    reason: str


def decide(facts: IsolationFacts, policy: str, after_s: float) -> Decision:
    manager_lost_s = facts.now - facts.manager_seen_at
    storage_ok_at = facts.started_at if facts.storage_ok_at is None else facts.storage_ok_at
    storage_lost_s = facts.now - storage_ok_at
    if not facts.storage_configured:
        return Decision(False, Action.NOTHING, "no storage paths: isolation cannot be told from a manager outage")
    if manager_lost_s <= after_s or storage_lost_s <= after_s:
        lost = f"manager lost {manager_lost_s:.1f}s, storage lost {storage_lost_s:.1f}s"
        return Decision(False, Action.NOTHING, lost)
    reason = f"isolated: manager lost {manager_lost_s:.1f}s and storage lost {storage_lost_s:.1f}s > {after_s:.1f}s"
    if facts.acted:
        return Decision(True, Action.NOTHING, reason + " (already acted)")
    action = {"destroy-vms": Action.DESTROY_VMS, "reboot-host": Action.REBOOT_HOST}.get(policy, Action.LOG_ONLY)
    return Decision(True, action, reason)


def reboot_host_now() -> None:
    """Immediate reboot without syncing disks (sync on a dead NFS mount would hang): sysrq 'b'."""
    with open("/proc/sysrq-trigger", "w") as fh:
        fh.write("b")


class IsolationMonitor:
    """Evaluates `decide` once per `tick()` and carries out the action; the caller provides the clock and facts."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        policy: str,
        after_s: float,
        storage_configured: bool,
        started_at: float,
        reboot: Callable[[], None] = reboot_host_now,
    ) -> None:
        self._hypervisor = hypervisor
        self._policy = policy
        self._after_s = after_s
        self._storage_configured = storage_configured
        self._started_at = started_at
        self._reboot = reboot
        self._acted = False
        self._completed = False  # the response of this episode ran to the end (written by tick's thread only)

    @property
    def after_s(self) -> float:
        return self._after_s

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def started_at(self) -> float:
        return self._started_at

    def set_after_s(self, after_s: float, source: str) -> None:
        if after_s != self._after_s:
            log.warning("event=isolation_after_changed from_s=%.1f to_s=%.1f source=%s", self._after_s, after_s,
                        source)
            self._after_s = after_s

    def set_started_at(self, started_at: float) -> None:
        """An earlier start for "never written" (a restarted agent continues its predecessor's clock)."""
        self._started_at = min(self._started_at, started_at)

    def response_pending(self, now: float, manager_seen_at: float, storage_ok_at: float | None) -> str | None:
        """Why the watchdog must not be petted now: isolated, a response is due and it has not completed."""
        facts = IsolationFacts(now, manager_seen_at, storage_ok_at, self._started_at, self._storage_configured,
                               acted=False)
        decision = decide(facts, self._policy, self._after_s)
        if decision.action in (Action.NOTHING, Action.LOG_ONLY) or self._completed:
            return None
        return f"isolation response {decision.action.value} not complete ({decision.reason})"

    def tick(self, now: float, manager_seen_at: float, storage_ok_at: float | None) -> Decision:
        facts = IsolationFacts(now, manager_seen_at, storage_ok_at, self._started_at, self._storage_configured,
                               self._acted)
        decision = decide(facts, self._policy, self._after_s)
        if not decision.isolated:
            if self._acted:
                log.warning("event=isolation_ended reason=%r", decision.reason)
            self._acted = self._completed = False
            return decision
        if decision.action is not Action.NOTHING:
            self._acted = True
            log.error("event=isolation_response policy=%s action=%s reason=%r", self._policy,
                      decision.action.value, decision.reason)
            self._completed = self._execute(decision.action)
            if decision.action is Action.DESTROY_VMS and not self._completed:
                self._acted = False  # again on the next tick (libvirt may come back); the watchdog sets the limit
        return decision

    def _execute(self, action: Action) -> bool:
        """Carry out the action; True when it is complete (for destroy-vms: no domain left running)."""
        if action is Action.DESTROY_VMS:
            return self._destroy_running()
        if action is Action.REBOOT_HOST:
            # No sync first on purpose: a hung storage mount would block the reboot forever.
            self._reboot()
            return False  # still running after asking for a reboot: the watchdog finishes the job
        return True

    def _destroy_running(self) -> bool:
        try:
            domains = self._hypervisor.list_domains()
        except HypervisorError as exc:
            log.error("event=isolation_destroy_failed error=%r", exc.message)
            return False
        for dom in domains:
            if dom.power in (Power.ON, Power.PAUSED):
                try:
                    self._hypervisor.destroy_vm(dom.uuid)
                    log.error("event=isolation_destroyed_vm vm=%s name=%s", dom.uuid, dom.name)
                except HypervisorError as exc:
                    log.error("event=isolation_destroy_failed vm=%s error=%r", dom.uuid, exc.message)
        # Complete only when libvirt itself says nothing runs any more (a destroy may "succeed" on a stale view).
        try:
            left = [d.name for d in self._hypervisor.list_domains() if d.power in (Power.ON, Power.PAUSED)]
        except HypervisorError as exc:
            log.error("event=isolation_verify_failed error=%r", exc.message)
            return False
        if left:
            log.error("event=isolation_response_incomplete running=%s", ",".join(left))
            return False
        log.error("event=isolation_response_complete")
        return True
