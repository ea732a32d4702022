"""How the agent uses kvmha-watchdog and reports its self-fence guarantee (issue 11): the composition of the
watchdog keeper, the isolation response, the link's messages and the takeover after a restart.

- Hello and every Ping carry the watchdog's state (armed, timeout, device); Hello also carries the disk lease
  configuration and the isolation policy, so the manager never has to guess what backs this host.
- Welcome's `isolation_after_s` wins over the agent's own configuration: the manager counts with its value.
- The pets are withheld while the isolation response is due and not complete (`IsolationMonitor.response_pending`).
- The note left with the daemon at every pet says when this agent last had contact; a restarted agent that takes
  the arm over continues from there (kvmha.agent.watchdog_client).
"""

from __future__ import annotations

import logging
import math
import time

from kvmha.agent.heartbeat import HeartbeatWriter
from kvmha.agent.isolation import IsolationMonitor
from kvmha.agent.lease import LockConfig
from kvmha.agent.link import AgentLink, LinkHooks
from kvmha.agent.watchdog_client import ContactNote, WatchdogClient, WatchdogKeeper, WatchdogState
from kvmha.proto.v1 import agent_pb2 as pb

log = logging.getLogger("kvmha.agent.watchdog")

MAX_ISOLATION_AFTER_S = 86400.0


class SelfFence:
    def __init__(self, isolation: IsolationMonitor, heartbeat: HeartbeatWriter, lock_config: LockConfig,
                 client: WatchdogClient | None, disabled_why: str = "disabled in the agent's configuration") -> None:
        self.isolation = isolation
        self.heartbeat = heartbeat
        self.lock_config = lock_config
        self.link: AgentLink | None = None  # set once built (the link takes our hooks)
        self._disabled_why = disabled_why
        self.keeper: WatchdogKeeper | None = None
        if client is not None:
            self.keeper = WatchdogKeeper(client, self.gate, self.note, self.takeover)

    # -- the keeper's callbacks -----------------------------------------------------------------------------
    def _manager_seen_at(self) -> float:
        assert self.link is not None
        return self.link.manager_seen_at

    def gate(self, now: float) -> str | None:
        return self.isolation.response_pending(now, self._manager_seen_at(), self.heartbeat.last_ok_at())

    def note(self) -> ContactNote:
        storage_ok_at = self.heartbeat.last_ok_at()
        storage_at = self.isolation.started_at if storage_ok_at is None else storage_ok_at
        return ContactNote(max(self._manager_seen_at(), storage_at), self.isolation.after_s)

    def takeover(self, note: ContactNote) -> None:
        """A restarted agent continues its predecessor's isolation clock (never a fresh one)."""
        assert self.link is not None
        if self.link.sessions_started == 0:
            self.link.manager_seen_at = min(self.link.manager_seen_at, note.contact_at)
        self.isolation.set_started_at(note.contact_at)
        self.isolation.set_after_s(note.isolation_after_s, "previous agent (watchdog takeover)")
        log.warning("event=watchdog_takeover contact_age_s=%.1f isolation_after_s=%.1f",
                    time.monotonic() - note.contact_at, note.isolation_after_s)

    # -- the link's hooks -----------------------------------------------------------------------------------
    def hooks(self) -> LinkHooks:
        return LinkHooks(hello=self._hello, ping=self._ping, welcome=self._welcome)

    def state(self) -> WatchdogState:
        if self.keeper is None:
            return WatchdogState(False, detail=self._disabled_why)
        return self.keeper.client.state

    def _status(self) -> pb.WatchdogStatus:
        s = self.state()
        return pb.WatchdogStatus(armed=s.armed, timeout_s=s.timeout_s, device_timeout_s=s.device_timeout_s,
                                 device=s.device, detail=s.detail[:500])

    def _hello(self, hello: pb.Hello) -> None:
        hello.watchdog.CopyFrom(self._status())
        c = self.lock_config
        hello.disk_leases.CopyFrom(pb.DiskLeaseConfig(
            lock_manager=c.lock_manager, auto_disk_leases=c.auto_disk_leases, file_lockspace_dir=c.file_lockspace_dir,
            require_lease_for_disks=c.require_lease_for_disks, error=c.error))
        hello.isolation_policy = self.isolation.policy

    def _ping(self, ping: pb.Ping) -> None:
        ping.watchdog.CopyFrom(self._status())

    def _welcome(self, welcome: pb.Welcome) -> None:
        after_s = welcome.isolation_after_s
        if after_s == 0:
            return  # a manager that does not say: the agent's own value stays
        if not (math.isfinite(after_s) and 0 < after_s <= MAX_ISOLATION_AFTER_S):
            log.error("event=welcome_isolation_after_ignored value=%r", after_s)
            return
        self.isolation.set_after_s(after_s, "manager (Welcome)")
