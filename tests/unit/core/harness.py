"""A tiny hand-cranked driver for core flow tests: facts in, actions inspected, no simulator."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from kvmha.manager.core import actions as a
from kvmha.manager.core import facts as f
from kvmha.manager.core.config import CoreConfig
from kvmha.manager.core.core import Core
from kvmha.manager.core.model import (
    HaWorkRecord,
    HostCapacity,
    HostId,
    HostRecord,
    HostUuid,
    PowerState,
    RequestId,
    StopCause,
    VmId,
    VmRecord,
    VmState,
    VmUuid,
    WatchdogReport,
)

T = TypeVar("T")
FAST = CoreConfig(startup_grace_s=1.0)


def host(n: int, bmc: bool = True) -> HostRecord:
    return HostRecord(
        HostId(n), HostUuid(f"u{n}"), f"h{n}", f"10.0.0.{n}", has_bmc=bmc, capacity=HostCapacity(16, 16384)
    )


def vm(n: int, on: int | None, ha: bool = True, state: VmState = VmState.RUNNING) -> VmRecord:
    return VmRecord(
        VmId(n),
        VmUuid(f"v{n}"),
        f"vm{n}",
        state,
        host_id=HostId(on) if on else None,
        ha_enabled=ha,
        memory_mib=1024,
        vcpus=1,
    )


ARMED = WatchdogReport(armed=True, timeout_s=20.0)


class Harness:
    def __init__(
        self,
        hosts: int = 3,
        vms: Iterable[VmRecord] = (),
        config: CoreConfig = FAST,
        bmc: bool = True,
        works: Iterable[HaWorkRecord] = (),
        now: float = 0.0,
        prefix: str = "",
        watchdog: WatchdogReport = ARMED,
        lease_manager: str = "lockd",
    ) -> None:
        self.vm_records = list(vms)
        self.watchdog = watchdog  # what every agent reports (Hello and pings); the product default: armed
        self.lease_manager = lease_manager
        self.core = Core(
            config,
            now=now,
            hosts=[host(n, bmc) for n in range(1, hosts + 1)],
            vms=self.vm_records,
            works=works,
            request_prefix=prefix,
        )
        self.now = now
        self.log: list[a.Action] = []

    def handle(self, fact: f.Fact, at: float | None = None) -> list[a.Action]:
        self.now = self.now if at is None else at
        actions = self.core.handle(fact, self.now)
        self.log.extend(actions)
        return actions

    def tick_until(self, at: float, pinging: Iterable[int] = ()) -> list[a.Action]:
        """Run every deadline up to `at` (what a driver sleeping on next_deadline() does), while the hosts in
        `pinging` keep pinging every ping interval."""
        out: list[a.Action] = []
        alive = list(pinging)
        step = self.core.config.ping_interval_s
        while self.now < at:
            until = min(at, self.now + step) if alive else at
            while (deadline := self.core.next_deadline()) is not None and deadline <= until:
                self.now = max(self.now, deadline)
                out += self.core.tick(self.now)
            self.now = until
            for n in alive:
                out += self.core.handle(f.HeartbeatReceived(HostId(n), 0, True, True, self.watchdog), self.now)
        self.log.extend(out)
        return out

    def connect(self, n: int, running: Iterable[int] = (), at: float | None = None,
                ping: bool = True) -> list[a.Action]:
        """The agent's Hello, its first full report and (`ping`) its first ping, as a real agent sends them: a host
        that connected but never pinged is judged by its first-ping window instead (core/hostflow.py)."""
        out = self.handle(
            f.AgentConnected(
                HostId(n),
                f"u{n}",
                f"h{n}",
                f"10.0.0.{n}",
                HostCapacity(16, 16384),
                "b",
                self.watchdog,
                self.lease_manager,
            ),
            at,
        )
        domains = tuple(f.DomainReport(VmUuid(f"v{v}"), f"vm{v}", PowerState.POWER_ON) for v in running)
        out += self.handle(f.PowerStateReported(HostId(n), True, True, domains), at)
        if ping:
            out += self.handle(f.HeartbeatReceived(HostId(n), 0, True, True, self.watchdog), at)
        return out

    def connect_all(self, hosts: int = 3) -> None:
        for n in range(1, hosts + 1):
            self.connect(n, [v.id for v in self.vm_records if v.host_id == n])

    def report(
        self, n: int, vm_id: int, power: PowerState, cause: StopCause = StopCause.NONE, at: float | None = None
    ) -> list[a.Action]:
        domain = f.DomainReport(VmUuid(f"v{vm_id}"), f"vm{vm_id}", power, cause)
        return self.handle(f.PowerStateReported(HostId(n), False, True, (domain,)), at)

    def answer(
        self,
        command: a.SendCommand,
        ok: bool = True,
        error: str = "",
        payload: f.NeighborCheck | f.VmStartConfirmed | f.LeaseCheck | None = None,
        at: float | None = None,
    ) -> list[a.Action]:
        return self.handle(f.CommandCompleted(RequestId(command.request_id), ok, error, payload), at)


def of_type(actions: Iterable[a.Action], kind: type[T]) -> list[T]:
    return [action for action in actions if isinstance(action, kind)]


def starts(actions: Iterable[a.Action]) -> list[a.SendCommand]:
    return [c for c in of_type(actions, a.SendCommand) if isinstance(c.command, a.StartVm)]


def messages(actions: Iterable[a.Action]) -> list[str]:
    return [f"{e.subject} {e.message}" for e in of_type(actions, a.RecordEvent)]
