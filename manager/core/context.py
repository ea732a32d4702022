"""Shared state of one Core: the records, the timers, the commands in flight, and the batch of actions being built.

The flows (hosts, power sync, HA work, operator) each own part of the behaviour and reach the records through
this context; only the flows mutate records, and every mutation goes with a Save* action and, for a state change,
a RecordEvent with its reason (the audit invariant). `config` is the one copy of the configuration in the core:
everything reads it from here at the moment it needs a value, so a ConfigChanged takes effect everywhere at once.
The leaf indexes of `shared` (`up`, `held`, `absent`, `migrations`) carry what one flow learns for another.
"""

from __future__ import annotations

import copy

from kvmha.manager.core.actions import (
    Action,
    AgentCommand,
    RecordEvent,
    SaveHost,
    SaveVm,
    SaveWork,
    SendCommand,
    Severity,
)
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.model import HaWorkRecord, HostId, HostRecord, RequestId, VmRecord, WorkId
from kvmha.manager.core.routing import CommandDeadline, Owner, Pending, TimerKey
from kvmha.manager.core.shared import Absences, HeldOut, Migrations, UpHosts
from kvmha.manager.core.timers import Timers
from kvmha.manager.core.vmindex import VmIndex


class Ctx:
    def __init__(self, config: CoreConfig, now: float, request_prefix: str) -> None:
        self.config = config
        self.now = now
        self.received_at = now  # when the fact being handled arrived (<= now); see Core.handle
        self.started_at = now
        self.hosts: dict[HostId, HostRecord] = {}
        self.vms = VmIndex()
        self.works: dict[WorkId, HaWorkRecord] = {}
        self.timers: Timers[TimerKey] = Timers()
        self.pending: dict[RequestId, Pending] = {}
        self.connected: set[HostId] = set()  # hosts whose agent link is open
        self.up = UpHosts()  # written by HostFlow
        self.held = HeldOut()  # written by HostFlow
        self.absent = Absences()  # written by PowerSync
        self.migrations = Migrations()  # written by MigrationFlow
        self.out: list[Action] = []
        self._request_prefix = request_prefix
        self._request_counter = 0
        self.decisions = 0  # facts and timers handled, for the benchmark

    # ------------------------------------------------------------ names for messages

    def host_name(self, host_id: HostId | None) -> str:
        if host_id is None:
            return "-"
        host = self.hosts.get(host_id)
        return host.name if host else f"host#{host_id}"

    # ------------------------------------------------------------ actions

    def event(self, severity: Severity, subject: str, kind: str, message: str) -> None:
        self.out.append(RecordEvent(self.now, severity, subject, kind, message))

    def save_host(self, host: HostRecord) -> None:
        self.out.append(SaveHost(copy.copy(host)))

    def save_vm(self, vm: VmRecord) -> None:
        self.out.append(SaveVm(copy.copy(vm)))

    def save_work(self, work: HaWorkRecord) -> None:
        work.updated_at = self.now
        self.out.append(SaveWork(copy.copy(work)))

    def new_request_id(self) -> RequestId:
        self._request_counter += 1
        return RequestId(f"{self._request_prefix}{self._request_counter}")

    def send(self, owner: Owner, host_id: HostId, command: AgentCommand, timeout_s: float) -> RequestId:
        """Send a command and arm its deadline: a missing answer becomes a failure at `now + timeout_s`."""
        request_id = self.track(owner, host_id, timeout_s)
        self.out.append(SendCommand(request_id, host_id, command, timeout_s))
        return request_id

    def track(self, owner: Owner, host_id: HostId, timeout_s: float) -> RequestId:
        request_id = self.new_request_id()
        self.pending[request_id] = Pending(owner, host_id, self.now, timeout_s)
        self.timers.schedule(CommandDeadline(request_id), self.now + timeout_s)
        return request_id

    def dispatched(self, request_id: RequestId) -> Pending | None:
        """The command left only now (its batch waited for the store): its deadline counts from now. Returns it
        when it was moved."""
        pending = self.pending.get(request_id)
        if pending is None or pending.sent_at >= self.now:
            return None
        pending.sent_at = self.now
        self.timers.schedule(CommandDeadline(request_id), self.now + pending.timeout_s)
        return pending

    def settle(self, request_id: RequestId) -> Pending | None:
        """Forget a command that was answered (or timed out); None when it is unknown or already settled."""
        self.timers.cancel(CommandDeadline(request_id))
        return self.pending.pop(request_id, None)
