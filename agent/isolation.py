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

    def tick(self, now: float, manager_seen_at: float, storage_ok_at: float | None) -> Decision:
        facts = IsolationFacts(now, manager_seen_at, storage_ok_at, self._started_at, self._storage_configured,
                               self._acted)
        decision = decide(facts, self._policy, self._after_s)
        if not decision.isolated:
            if self._acted:
                log.warning("event=isolation_ended reason=%r", decision.reason)
            self._acted = False
            return decision
        if decision.action is not Action.NOTHING:
            self._acted = True
            log.error("event=isolation_response policy=%s action=%s reason=%r", self._policy,
                      decision.action.value, decision.reason)
            self._execute(decision.action)
        return decision

    def _execute(self, action: Action) -> None:
        if action is Action.DESTROY_VMS:
            self._destroy_running()
        elif action is Action.REBOOT_HOST:
            # No sync first on purpose: a hung storage mount would block the reboot forever.
            self._reboot()

    def _destroy_running(self) -> None:
        try:
            domains = self._hypervisor.list_domains()
        except HypervisorError as exc:
            log.error("event=isolation_destroy_failed error=%r", exc.message)
            self._acted = False  # try again on the next tick: libvirt may come back
            return
        for dom in domains:
            if dom.power in (Power.ON, Power.PAUSED):
                try:
                    self._hypervisor.destroy_vm(dom.uuid)
                    log.error("event=isolation_destroyed_vm vm=%s name=%s", dom.uuid, dom.name)
                except HypervisorError as exc:
                    log.error("event=isolation_destroy_failed vm=%s error=%r", dom.uuid, exc.message)
