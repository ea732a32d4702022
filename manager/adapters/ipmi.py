"""IPMI fencer: power a host off through its BMC with pyghmi, and confirm it is off.

Each operation runs pyghmi in its own short-lived process, forked by the IPMI zygote
(:mod:`kvmha.manager.adapters.ipmi_zygote`, one per manager) and killed at the deadline. Threads were not enough;
with pyghmi 1.6 against ``ipmi_sim`` we saw:

* a dead BMC makes ``Command()`` block about 5 s, and ``get_power()`` on a session made before the BMC died block
  about 28 s, whatever the caller's deadline — a thread cannot be stopped, only abandoned;
* pyghmi caches sessions in class-level tables keyed by (bmc, user, password, port). After one failure against a
  dead BMC, every later ``Command()`` in the process came back at once holding the broken cached session and
  failed with "Session no longer connected" — even after the BMC was restarted. A fencer living in the manager's
  process would have stayed broken until the manager restarted.

A process per operation has its own pyghmi state (a fresh session, so reconnecting after a BMC restart just
works). Until the zygote, each one was a fresh interpreter importing pyghmi: about 0.15 s idle but over a second on
a loaded machine, so BMC queries timed out under load and read "unknown" (a needless fence). Forked from the zygote
it starts in milliseconds. The password goes to the zygote on its stdin, never on a command line; it is never
logged, never in a result's detail, and masked in ``repr``.

The child reports progress as JSON lines (power read, power-off sent, confirmed off, error at a stage), so a child
killed at the deadline still tells how far it got (in particular whether a power-off was sent).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmha.manager.adapters.fencer import FenceOutcome, FenceResult, PowerStatus
from kvmha.manager.adapters.ipmi_worker import NO_ANSWER
from kvmha.manager.adapters.ipmi_zygote import CallResult, IpmiZygote, shared_zygote

log = logging.getLogger(__name__)

# The child stops its own polling this long before the caller's deadline, so it can still report "not confirmed
# off" itself rather than being killed mid-sentence.
_CHILD_MARGIN_S = 0.3


@dataclass(frozen=True)
class _Report:
    """What the child said before it ended or was killed."""

    power: str | None = None  # first power reading: "on" / "off"
    off_sent: bool = False
    went_off_first: bool = False  # pyghmi found the power off itself and sent nothing
    confirmed_off: bool = False
    last_power: str | None = None
    error_stage: str | None = None
    error: str | None = None
    killed: bool = False


class IpmiFencer:
    """A :class:`~kvmha.manager.adapters.fencer.Fencer` that talks IPMI 2.0 (RMCP+) to one BMC."""

    def __init__(
        self,
        address: str,
        port: int = 623,
        user: str = "",
        password: str = "",
        name: str | None = None,
        *,
        poll_interval_s: float = 0.25,
        zygote: IpmiZygote | None = None,
    ) -> None:
        self.address = address
        self.port = port
        self.user = user
        self._password = password
        self.name = name if name is not None else f"ipmi:{address}:{port}"
        self.poll_interval_s = poll_interval_s
        self._zygote = zygote

    def __repr__(self) -> str:
        return (
            f"IpmiFencer(name={self.name!r}, address={self.address!r}, port={self.port}, "
            f"user={self.user!r}, password='***')"
        )

    def power_status(self, timeout_s: float) -> PowerStatus:
        report, _ = self._run("status", timeout_s)
        if report.power == "on":
            return PowerStatus.ON
        if report.power == "off":
            return PowerStatus.OFF
        return PowerStatus.UNKNOWN

    def fence(self, timeout_s: float) -> FenceResult:
        started = time.monotonic()
        report, elapsed_s = self._run("fence", timeout_s)
        outcome, detail = self._judge(report, timeout_s)
        log.info("%s: fence %s in %.2f s: %s", self.name, outcome.value, elapsed_s, detail)
        return FenceResult(outcome, detail, time.monotonic() - started)

    def _judge(self, report: _Report, timeout_s: float) -> tuple[FenceOutcome, str]:
        where = f"BMC {self.address}:{self.port}"
        if report.confirmed_off:
            if report.went_off_first:
                return FenceOutcome.ALREADY_OFF, f"{where} power went off before the power-off was sent"
            return FenceOutcome.FENCED, f"{where} power-off sent and power confirmed off"
        if report.power == "off":
            return FenceOutcome.ALREADY_OFF, f"{where} reports power off; no power-off sent"
        if report.off_sent:
            # The worst case for safety: the host may or may not be going down. Never a success.
            state = report.last_power or "unknown"
            why = f" ({report.error})" if report.error else ""
            return FenceOutcome.FAILED, (
                f"{where} power-off sent but not confirmed off within {timeout_s:.1f} s; last power reading: "
                f"{state}{why}"
            )
        if report.error == NO_ANSWER:
            return FenceOutcome.FAILED, f"{where} did not answer ({report.error_stage})"
        if report.error is not None:
            return FenceOutcome.FAILED, f"{where} {report.error_stage} failed: {report.error}"
        return FenceOutcome.FAILED, f"{where} did not answer within {timeout_s:.1f} s"

    def _run(self, op: str, timeout_s: float) -> tuple[_Report, float]:
        """Run one operation in a child forked by the zygote, killed at ``timeout_s``; its report and the time."""
        started = time.monotonic()
        if timeout_s <= _CHILD_MARGIN_S:
            return _Report(error_stage="start", error=f"timeout {timeout_s:.2f} s is too short"), 0.0
        request = {
            "op": op,
            "address": self.address,
            "port": self.port,
            "user": self.user,
            "password": self._password,
            "poll_interval_s": self.poll_interval_s,
        }
        zygote = self._zygote if self._zygote is not None else shared_zygote()
        result = zygote.call(request, timeout_s, stop_early_s=_CHILD_MARGIN_S)
        return _parse(result, self._scrub), time.monotonic() - started

    def _scrub(self, text: str) -> str:
        """Belt and braces: no library message should echo the password, but if one does, it is masked."""
        return text.replace(self._password, "***") if self._password else text


def _parse(result: CallResult, scrub: Callable[[str], str]) -> _Report:
    fields: dict[str, Any] = {"killed": result.killed}
    for event in result.events:
        kind = event.get("event")
        if kind == "power":
            fields.setdefault("power", event["state"])
            fields["last_power"] = event["state"]
        elif kind == "off_sent":
            fields["off_sent"] = True
        elif kind == "went_off_first":
            fields["went_off_first"] = True
        elif kind == "confirmed_off":
            fields["confirmed_off"] = True
        elif kind == "error":
            fields["error_stage"] = str(event.get("stage"))
            fields["error"] = scrub(str(event.get("error")))
    if "error" not in fields and "power" not in fields:
        if result.error is not None:
            fields.update(error_stage="worker", error=scrub(result.error))
        elif not result.killed and result.status not in (None, 0):
            code = os.waitstatus_to_exitcode(result.status)
            fields.update(error_stage="worker", error=f"the IPMI child failed (exit {code})")
    return _Report(**fields)
