"""The manager's handle on the IPMI zygote (:mod:`kvmha.manager.adapters.ipmi_worker`): start it, send it
operations, collect their events, restart it when it dies, stop it cleanly.

Invariants:

* :meth:`IpmiZygote.call` returns within ``timeout_s`` (plus a few milliseconds), whatever the zygote does: a call
  whose end has not come by then is cancelled (the zygote kills its child) and returned as killed, with every event
  the child sent before;
* a zygote that exits or is killed fails the calls in flight at once (their events so far are kept) and is started
  again by the next call — a crash costs one start, never a stuck fencer;
* the zygote's stdin is its lifeline: :meth:`IpmiZygote.close` closes it (the zygote kills its children and exits),
  and so does the manager's own death; it is killed by PID if it does not exit in time.

One zygote serves every fencer of the manager (:func:`shared_zygote`): calls are multiplexed by request id, so
concurrent fences of many hosts run in parallel children.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

log = logging.getLogger(__name__)

_WORKER_MODULE = "kvmha.manager.adapters.ipmi_worker"
# The parent waits this much longer than the zygote's own kill time before it gives up on an answer.
_ANSWER_GRACE_S = 0.05
_EXIT_WAIT_S = 3.0


@dataclass
class CallResult:
    events: list[dict[str, Any]]
    killed: bool  # the child was killed (deadline or cancel) or never answered in time
    status: int | None  # the child's wait status; None if its end was not seen
    error: str | None = None  # the zygote itself failed (could not start, died mid-call)


@dataclass
class _Call:
    events: list[dict[str, Any]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    killed: bool = False
    status: int | None = None
    error: str | None = None


class _Process:
    """One incarnation of the zygote and the calls it carries."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen
        self.ready = threading.Event()
        self.calls: dict[int, _Call] = {}
        self.alive = True
        self.write_lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> bool:
        stdin = self.popen.stdin
        if stdin is None:
            return False
        try:
            with self.write_lock:
                stdin.write(json.dumps(message) + "\n")
                stdin.flush()
            return True
        except (OSError, ValueError):  # its end is closed: it died, the reader settles the calls
            return False


class IpmiZygote:
    def __init__(self, python: str = sys.executable) -> None:
        self._python = python
        self._lock = threading.Lock()
        self._process: _Process | None = None
        self._next_id = 0
        self._closed = False
        self.starts = 0  # how many zygotes were started (tests read it; restarts are visible)

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.popen.pid if process is not None and process.alive else None

    def start(self) -> None:
        """Start the zygote now (the manager does so at startup, so the first fence does not pay the import)."""
        with self._lock:
            self._ensure_process()

    def call(self, request: dict[str, Any], timeout_s: float, stop_early_s: float = 0.0) -> CallResult:
        """Run one operation (``request`` without id or budget); the child stops its own work ``stop_early_s``
        before the deadline so it can still report, and is killed shortly after that."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            if self._closed:
                return CallResult([], False, None, "the IPMI worker is shut down")
            try:
                process = self._ensure_process()
            except OSError as exc:
                return CallResult([], False, None, f"cannot start the IPMI worker: {exc.strerror}")
            self._next_id += 1
            request_id = self._next_id
            call = process.calls[request_id] = _Call()
        if not process.ready.wait(max(0.0, deadline - time.monotonic())):
            self._forget(process, request_id)
            return CallResult([], True, None, "the IPMI worker did not start in time")
        budget_s = deadline - time.monotonic() - _ANSWER_GRACE_S
        if not process.send({**request, "id": request_id, "budget_s": budget_s - stop_early_s}):
            call.done.wait(_ANSWER_GRACE_S)
        if not call.done.wait(max(0.0, deadline - time.monotonic())):
            call.killed = True
            process.send({"id": request_id, "cancel": True})
        self._forget(process, request_id)
        return CallResult(list(call.events), call.killed, call.status, call.error)

    def close(self) -> None:
        """Stop the zygote (its children are killed by it) and refuse further calls."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        if process is not None:
            self._stop(process)

    # ------------------------------------------------------------ internals

    def _ensure_process(self) -> _Process:
        process = self._process
        if process is not None and process.alive:
            return process
        popen = subprocess.Popen(
            [self._python, "-m", _WORKER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        process = self._process = _Process(popen)
        self.starts += 1
        reader = threading.Thread(target=self._read, args=(process,), name="ipmi-zygote-reader", daemon=True)
        reader.start()
        log.info("IPMI zygote started (pid %d)", popen.pid)
        return process

    def _forget(self, process: _Process, request_id: int) -> None:
        with self._lock:
            process.calls.pop(request_id, None)

    def _read(self, process: _Process) -> None:
        stdout: IO[str] | None = process.popen.stdout
        assert stdout is not None
        for line in stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "ready":
                process.ready.set()
                continue
            with self._lock:
                call = process.calls.get(int(event.get("id", -1)))
            if call is None:
                continue  # an answer nobody waits for any more (cancelled)
            if event.get("event") == "end":
                call.killed = call.killed or bool(event.get("killed"))
                call.status = int(event.get("status", 0))
                call.done.set()
            else:
                call.events.append(event)
        self._ended(process)

    def _ended(self, process: _Process) -> None:
        code = process.popen.wait()
        with self._lock:
            process.alive = False
            calls = list(process.calls.values())
            if self._process is process:
                self._process = None
        for call in calls:
            call.error = call.error or f"the IPMI worker exited (code {code}) during the call"
            call.done.set()
        process.ready.set()  # a call waiting for the start finds it dead, not late
        if not self._closed:
            log.warning("IPMI zygote (pid %d) exited with code %d: the next call starts a new one",
                        process.popen.pid, code)

    def _stop(self, process: _Process) -> None:
        if process.popen.stdin is not None:
            with contextlib.suppress(OSError):
                process.popen.stdin.close()
        try:
            process.popen.wait(_EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            process.popen.kill()  # our own child, by PID
            process.popen.wait(_EXIT_WAIT_S)


_shared_lock = threading.Lock()
_shared: IpmiZygote | None = None


def shared_zygote() -> IpmiZygote:
    """The manager-wide zygote (created on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared._closed:
            _shared = IpmiZygote()
        return _shared


def close_shared_zygote() -> None:
    global _shared
    with _shared_lock:
        zygote, _shared = _shared, None
    if zygote is not None:
        zygote.close()
