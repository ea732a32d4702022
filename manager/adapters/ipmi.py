"""IPMI fencer: power a host off through its BMC with pyghmi, and confirm it is off.

Each operation runs pyghmi in a short-lived child process (``python -m kvmha.manager.adapters.ipmi``) that the
caller kills at the deadline. Threads were not enough; with pyghmi 1.6 against ``ipmi_sim`` we saw:

* a dead BMC makes ``Command()`` block about 5 s, and ``get_power()`` on a session made before the BMC died block
  about 28 s, whatever the caller's deadline — a thread cannot be stopped, only abandoned;
* pyghmi caches sessions in class-level tables keyed by (bmc, user, password, port). After one failure against a
  dead BMC, every later ``Command()`` in the process came back at once holding the broken cached session and
  failed with "Session no longer connected" — even after the BMC was restarted. A fencer living in the manager's
  process would have stayed broken until the manager restarted.

A child process per operation has its own pyghmi state (a fresh session, so reconnecting after a BMC restart just
works), is killed by PID when the deadline passes, and costs about 0.15 s to start. The password goes to the child
on its stdin, never on a command line; it is never logged, never in a result's detail, and masked in ``repr``.

The child reports progress as JSON lines (power read, power-off sent, confirmed off, error at a stage), so a child
killed at the deadline still tells the parent how far it got (in particular whether a power-off was sent).
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmha.manager.adapters.fencer import FenceOutcome, FenceResult, PowerStatus

log = logging.getLogger(__name__)

_WORKER_MODULE = "kvmha.manager.adapters.ipmi"
# The child stops its own polling this long before the parent's deadline, so it can still report "not confirmed
# off" itself rather than being killed mid-sentence.
_CHILD_MARGIN_S = 0.3
_KILL_WAIT_S = 5.0
_NO_ANSWER = "no answer from the BMC"


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
        python: str = sys.executable,
    ) -> None:
        self.address = address
        self.port = port
        self.user = user
        self._password = password
        self.name = name if name is not None else f"ipmi:{address}:{port}"
        self.poll_interval_s = poll_interval_s
        self._python = python

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
        if report.error == _NO_ANSWER:
            return FenceOutcome.FAILED, f"{where} did not answer ({report.error_stage})"
        if report.error is not None:
            return FenceOutcome.FAILED, f"{where} {report.error_stage} failed: {report.error}"
        return FenceOutcome.FAILED, f"{where} did not answer within {timeout_s:.1f} s"

    def _run(self, op: str, timeout_s: float) -> tuple[_Report, float]:
        """Run one operation in a child, killed at ``timeout_s``; the child's report and the time it took."""
        started = time.monotonic()
        if timeout_s <= _CHILD_MARGIN_S:
            return _Report(error_stage="start", error=f"timeout {timeout_s:.2f} s is too short"), 0.0
        request = {
            "op": op,
            "address": self.address,
            "port": self.port,
            "user": self.user,
            "password": self._password,
            "budget_s": timeout_s - _CHILD_MARGIN_S,
            "poll_interval_s": self.poll_interval_s,
        }
        try:
            child = subprocess.Popen(
                [self._python, "-m", _WORKER_MODULE],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        except OSError as exc:
            return _Report(error_stage="start", error=f"cannot start the IPMI worker: {exc.strerror}"), 0.0
        killed = False
        try:
            out, err = child.communicate(json.dumps(request), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()  # our own child, by PID
            out, err = child.communicate(timeout=_KILL_WAIT_S)
            killed = True
        report = _parse(out, killed, self._scrub)
        if report.error is None and report.power is None and not killed and child.returncode != 0:
            last = self._scrub(err.strip().splitlines()[-1]) if err.strip() else f"exit {child.returncode}"
            report = _Report(error_stage="worker", error=last)
        return report, time.monotonic() - started

    def _scrub(self, text: str) -> str:
        """Belt and braces: no library message should echo the password, but if one does, it is masked."""
        return text.replace(self._password, "***") if self._password else text


def _parse(out: str, killed: bool, scrub: Callable[[str], str]) -> _Report:
    fields: dict[str, Any] = {"killed": killed}
    for line in out.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
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
    return _Report(**fields)


# --- the child side: the only code that imports pyghmi -----------------------------------------------------------


def _emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def _describe(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args and exc.args[0] is not None else ""
    if not text or text == "timeout":
        return _NO_ANSWER
    return f"{text} ({type(exc).__name__})"


def _worker(request: dict[str, Any]) -> None:
    from pyghmi.ipmi import command  # imported here: the manager's process never loads pyghmi

    deadline = time.monotonic() + float(request["budget_s"])
    stage = "login"
    ipmi: Any = None
    try:
        ipmi = command.Command(
            bmc=request["address"], port=int(request["port"]), userid=request["user"], password=request["password"]
        )
        stage = "power status"
        power = ipmi.get_power()["powerstate"]
        _emit(event="power", state=power)
        if request["op"] != "fence" or power == "off":
            return
        stage = "power off"
        answer = ipmi.set_power("off", wait=False)
        if answer.get("powerstate") == "off":  # pyghmi re-reads the state first and found it off already
            _emit(event="went_off_first")
            _emit(event="confirmed_off")
            return
        _emit(event="off_sent")
        stage = "confirm off"
        _confirm_off(ipmi, deadline, float(request["poll_interval_s"]))
    except Exception as exc:  # every pyghmi failure becomes a reported error, never a traceback with locals
        _emit(event="error", stage=stage, error=_describe(exc))
    finally:
        if ipmi is not None:
            with contextlib.suppress(Exception):  # the session is dropped with the process anyway
                ipmi.ipmi_session.logout()


def _confirm_off(ipmi: Any, deadline: float, poll_interval_s: float) -> None:
    while True:
        power = ipmi.get_power()["powerstate"]
        _emit(event="power", state=power)
        if power == "off":
            _emit(event="confirmed_off")
            return
        if time.monotonic() + poll_interval_s >= deadline:
            _emit(event="error", stage="confirm off", error="power still on at the deadline")
            return
        time.sleep(poll_interval_s)


def _worker_main() -> int:
    request = json.loads(sys.stdin.read())
    _worker(request)
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
