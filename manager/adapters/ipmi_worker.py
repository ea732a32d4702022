"""The IPMI zygote: a long-lived process that has pyghmi imported and forks one child per IPMI operation.

Run as ``python -m kvmha.manager.adapters.ipmi_worker`` by :mod:`kvmha.manager.adapters.ipmi_zygote`; this is the
only module that imports pyghmi. Why a zygote, and not pyghmi on a thread of the manager (pyghmi 1.6 against
``ipmi_sim``, see also the header of :mod:`kvmha.manager.adapters.ipmi`):

* a call cannot be bounded in a thread: a dead BMC blocks ``Command()`` about 5 s and ``get_power()`` about 28 s
  whatever the caller's deadline, and a thread can only be abandoned, not stopped;
* pyghmi keeps sessions in class-level tables: after one failure against a dead BMC every later ``Command()`` in
  that process got the broken cached session back ("Session no longer connected"), even after the BMC came back.

So every operation still runs in its own process with fresh pyghmi state, killed by PID at its deadline — but it
is forked from this zygote, which paid for the interpreter and the pyghmi import (about 1 s on a loaded machine,
which is what made BMC queries time out under load) once. A fork costs milliseconds. Forking is safe here: the
zygote is single-threaded and never opens an IPMI session itself (pyghmi starts its I/O thread with the first
session, in the child).

Protocol (JSON lines). The parent writes requests on the zygote's stdin:
``{"id": N, "op": "status"|"fence", "address", "port", "user", "password", "budget_s", "poll_interval_s"}`` or
``{"id": N, "cancel": true}``. The zygote answers on stdout with ``{"event": "ready"}`` once, then the child's
progress events tagged with their request id, and exactly one ``{"id": N, "event": "end", "killed": bool,
"status": int}`` per request. Invariants:

* every child is killed (SIGKILL, by the zygote, which is its parent and reaps it: no PID reuse race) at most
  ``budget_s + KILL_GRACE_S`` after it was forked, or at once on cancel;
* a child dies with the zygote (``PR_SET_PDEATHSIG``), and the zygote ends when its stdin closes (clean shutdown,
  or the manager died), killing its children first;
* the password arrives on stdin only; it is never on a command line and never written out.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NO_ANSWER = "no answer from the BMC"
# The child stops its own polling at budget_s and reports; the zygote kills it this long after, should it hang in
# a pyghmi call.
KILL_GRACE_S = 0.15
_PR_SET_PDEATHSIG = 1
# pyghmi resends an unanswered packet after initialtimeout + 0.5 * random() seconds (0.5-1.0 s by default). Its
# I/O thread often misses the first answer of a fresh session on a loaded machine (20 fresh sessions against
# ipmi_sim at load 3-4: median 0.63 s, max 1.4 s per status read), which alone ate a second of every early BMC
# query. Each child holds one session to one BMC, so the jitter (meant to spread many sessions' retries) buys
# nothing: 0.1 s and no jitter gave median 0.13 s, max 0.25 s. A BMC slower than that sees a resent packet, which
# IPMI's sequence numbers make harmless (pyghmi resends the same way after its default timeout).
RETRANSMIT_S = 0.1

Emit = Callable[..., None]


# --- the operation, run in a forked child ------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args and exc.args[0] is not None else ""
    if not text or text == "timeout":
        return NO_ANSWER
    return f"{text} ({type(exc).__name__})"


def run_operation(command_module: Any, request: dict[str, Any], emit: Emit) -> None:
    """One status read or fence, reporting progress through ``emit`` so a child killed at the deadline has still
    told how far it got (in particular whether a power-off was sent)."""
    deadline = time.monotonic() + float(request["budget_s"])
    stage = "login"
    ipmi: Any = None
    try:
        ipmi = command_module.Command(
            bmc=request["address"], port=int(request["port"]), userid=request["user"], password=request["password"]
        )
        stage = "power status"
        power = ipmi.get_power()["powerstate"]
        emit(event="power", state=power)
        if request["op"] != "fence" or power == "off":
            return
        stage = "power off"
        answer = ipmi.set_power("off", wait=False)
        if answer.get("powerstate") == "off":  # pyghmi re-reads the state first and found it off already
            emit(event="went_off_first")
            emit(event="confirmed_off")
            return
        emit(event="off_sent")
        stage = "confirm off"
        _confirm_off(ipmi, deadline, float(request["poll_interval_s"]), emit)
    except Exception as exc:  # every pyghmi failure becomes a reported error, never a traceback with locals
        emit(event="error", stage=stage, error=_describe(exc))
    finally:
        if ipmi is not None:
            with contextlib.suppress(Exception):  # the session is dropped with the process anyway
                ipmi.ipmi_session.logout()


def _confirm_off(ipmi: Any, deadline: float, poll_interval_s: float, emit: Emit) -> None:
    while True:
        power = ipmi.get_power()["powerstate"]
        emit(event="power", state=power)
        if power == "off":
            emit(event="confirmed_off")
            return
        if time.monotonic() + poll_interval_s >= deadline:
            emit(event="error", stage="confirm off", error="power still on at the deadline")
            return
        time.sleep(poll_interval_s)


# --- the zygote ----------------------------------------------------------------------------------------------------


@dataclass
class _Child:
    request_id: int
    pid: int
    fd: int  # read end of the child's event pipe
    kill_at: float
    killed: bool = False
    buffer: bytes = b""


class Zygote:
    def __init__(self, command_module: Any, out: Callable[[dict[str, Any]], None]) -> None:
        self._command = command_module
        self._out = out
        self._children: dict[int, _Child] = {}  # by fd
        self._selector = selectors.DefaultSelector()
        self._stdin_buffer = b""

    def run(self, stdin_fd: int) -> None:
        self._selector.register(stdin_fd, selectors.EVENT_READ, None)
        open_input = True
        while open_input or self._children:
            timeout_s = self._next_kill_in_s()
            for key, _ in self._selector.select(timeout_s):
                if key.data is None:
                    open_input = self._read_requests(stdin_fd)
                else:
                    self._read_child(key.data)
            self._kill_overdue()
            if not open_input:
                for child in self._children.values():  # shutting down: nothing waits for their answers
                    self._kill(child)

    def _next_kill_in_s(self) -> float | None:
        kill_at = min((c.kill_at for c in self._children.values() if not c.killed), default=None)
        return None if kill_at is None else max(0.0, kill_at - time.monotonic())

    def _read_requests(self, fd: int) -> bool:
        chunk = os.read(fd, 65536)
        if not chunk:
            self._selector.unregister(fd)
            return False
        self._stdin_buffer += chunk
        *lines, self._stdin_buffer = self._stdin_buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self._request(json.loads(line))
        return True

    def _request(self, request: dict[str, Any]) -> None:
        request_id = int(request["id"])
        if request.get("cancel"):
            for child in self._children.values():
                if child.request_id == request_id:
                    self._kill(child)
            return
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(read_fd)
            self._child_main(request, write_fd)
        os.close(write_fd)
        kill_at = time.monotonic() + float(request["budget_s"]) + KILL_GRACE_S
        child = self._children[read_fd] = _Child(request_id, pid, read_fd, kill_at)
        self._selector.register(read_fd, selectors.EVENT_READ, child)

    def _child_main(self, request: dict[str, Any], write_fd: int) -> None:
        code = 0
        try:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            os.close(0)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # the zygote's stdout is its answer channel: only the zygote writes there
            for child_fd in list(self._children):
                os.close(child_fd)
            if os.getppid() == 1:  # the zygote died between fork and prctl
                os._exit(1)

            def emit(**event: object) -> None:
                os.write(write_fd, (json.dumps(event) + "\n").encode())

            run_operation(self._command, request, emit)
        except BaseException:  # a child never unwinds into the zygote's loop
            code = 1
        os._exit(code)

    def _read_child(self, child: _Child) -> None:
        chunk = os.read(child.fd, 65536)
        if chunk:
            child.buffer += chunk
            *lines, child.buffer = child.buffer.split(b"\n")
            for line in lines:
                with contextlib.suppress(ValueError):
                    self._out({"id": child.request_id, **json.loads(line)})
            return
        self._selector.unregister(child.fd)
        os.close(child.fd)
        del self._children[child.fd]
        _, status = os.waitpid(child.pid, 0)  # EOF: it exited or was killed; reaped here, by its parent
        self._out({"id": child.request_id, "event": "end", "killed": child.killed, "status": status})

    def _kill_overdue(self) -> None:
        now = time.monotonic()
        for child in list(self._children.values()):
            if not child.killed and now >= child.kill_at:
                self._kill(child)

    def _kill(self, child: _Child) -> None:
        if not child.killed:
            child.killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)  # our own child, not yet reaped: the PID is still its own


def _write_line(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class _NoJitter:
    @staticmethod
    def random() -> float:
        return 0.0


def main() -> int:
    from pyghmi.ipmi import command  # the import every fork inherits: paid once per zygote
    from pyghmi.ipmi.private import session

    session.initialtimeout = RETRANSMIT_S  # see RETRANSMIT_S; inherited by every child
    session.random = _NoJitter  # session.py only calls random.random()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on the manager's terminal is the manager's to handle
    _write_line({"event": "ready", "pid": os.getpid()})
    try:
        Zygote(command, _write_line).run(sys.stdin.fileno())
    except BrokenPipeError:  # the manager is gone: the children die with us (PDEATHSIG)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
