"""The lab's hardware watchdog: a timer per host that lives outside the host, in its power supply.

A real watchdog is hardware: nothing running on the host can stop it firing once it is armed and no longer petted,
not even the death of the process that armed it, and when it fires the board resets (the power stays on as far as
the BMC is concerned; the OS goes down and boots again). The lab's is the same: the host's power supply
(kvmha.lab.power, outside the host's namespaces, the BMC's startcmd) runs this device, and when it expires the power
supply kills the host and boots it again. Inside the host, kvmha-watchdog drives it as `--device unix:<socket>`
(kvmha.agent.watchdog_device.SocketWatchdog).

Semantics, copied from the Linux watchdog driver core (drivers/watchdog/watchdog_dev.c), line by line over a Unix
stream socket:
- connect = open(/dev/watchdog): starts the timer (default 60 s, like softdog); only one opener at a time
  ("BUSY"). Greeting "OK".
- "T <seconds>" = WDIOC_SETTIMEOUT (1..3600; also a keepalive), answered "OK <seconds>".
- "K" = a keepalive (WDIOC_KEEPALIVE / any write); it also clears a pending magic close, as any other write does.
- "V" = the magic character: a keepalive that allows the next close to stop the timer.
- close after "V": the timer stops. Close without it (also: the opener died): "watchdog did not stop!", one last
  keepalive, and the timer runs on; it fires `timeout` later unless someone opens and pets it again.

Files in the host's watchdog folder (<host dir>/watchdog/): `device.sock`, `device.json` (the timer's state, written
on every change but keepalives) and `resets.log` (one JSON line per reset, written by the power supply).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_TIMEOUT_S = 60
SOCKET_NAME = "device.sock"
STATUS_NAME = "device.json"
RESETS_NAME = "resets.log"


class WatchdogTimer:
    """The timer's state; times come from the caller (tests use a fake clock)."""

    def __init__(self) -> None:
        self.timeout_s = DEFAULT_TIMEOUT_S
        self.running = False
        self.deadline: float | None = None
        self.opener: int | None = None
        self.expect_close = False
        self.fired = False

    def open(self, conn: int, now: float) -> bool:
        if self.opener is not None or self.fired:
            return False
        self.opener, self.expect_close = conn, False
        self.running = True
        self.keepalive(now)
        return True

    def keepalive(self, now: float) -> None:
        if self.running:
            self.deadline = now + self.timeout_s

    def command(self, conn: int, line: str, now: float) -> str | None:
        """One line from the opener; returns the answer to send, if any."""
        if conn != self.opener:
            return None
        word, _, arg = line.strip().partition(" ")
        if word == "T":
            try:
                self.timeout_s = max(1, min(3600, int(arg)))
            except ValueError:
                return "ERR bad timeout"
            self.keepalive(now)
            return f"OK {self.timeout_s}"
        self.expect_close = word == "V"
        self.keepalive(now)
        return None

    def close(self, conn: int, now: float) -> str:
        if conn != self.opener:
            return ""
        self.opener = None
        if self.expect_close:
            self.running, self.deadline = False, None
            return "stopped (magic close)"
        self.keepalive(now)  # as the kernel does on an unexpected close
        return f"watchdog did not stop! fires in {self.timeout_s} s unless petted"

    def expired(self, now: float) -> bool:
        if self.running and not self.fired and self.deadline is not None and now >= self.deadline:
            self.fired = True
        return self.fired

    def state(self, now: float) -> dict[str, object]:
        return {"running": self.running, "timeout_s": self.timeout_s, "open": self.opener is not None,
                "expect_close": self.expect_close, "fired": self.fired,
                "fires_in_s": None if self.deadline is None or not self.running else round(self.deadline - now, 3)}


class LabWatchdogDevice:
    """Serves one WatchdogTimer on `<folder>/device.sock` from a thread; calls `on_expire(why)` when it fires."""

    def __init__(self, folder: Path, on_expire: Callable[[str], None], poll_s: float = 0.05) -> None:
        self.folder = folder
        self.socket_path = folder / SOCKET_NAME
        self._on_expire = on_expire
        self._poll_s = poll_s
        self._timer = WatchdogTimer()
        self._lock = threading.RLock()  # status writes happen under it too
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._conns: dict[int, socket.socket] = {}
        self._buffers: dict[int, bytearray] = {}
        self._sel = selectors.DefaultSelector()
        self._next_conn = 0

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # left by a power supply that was SIGKILLed
        if len(str(self.socket_path)) > 107:
            raise ValueError(f"{self.socket_path}: too long for a Unix socket path (108 bytes)")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(4)
        listener.setblocking(False)
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ, None)
        self._write_status()
        self._thread = threading.Thread(target=self._run, name="lab-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in self._conns.values():
            sock.close()
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def reset(self) -> None:
        """The host was reset: the hardware comes back disarmed (its opener died with the host)."""
        with self._lock:
            for conn_id in list(self._conns):
                self._drop(conn_id)
            self._timer = WatchdogTimer()
        self._write_status()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(self._poll_s):
                with self._lock:
                    if key.data is None:
                        self._accept()
                    else:
                        self._read(key.data)
            now = time.monotonic()
            with self._lock:
                was_fired = self._timer.fired
                fired = self._timer.expired(now)
                timeout_s = self._timer.timeout_s
            if fired and not was_fired:
                self._write_status()
                self._on_expire(f"lab watchdog expired ({timeout_s} s without a keepalive)")

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        self._next_conn += 1
        conn_id = self._next_conn
        if not self._timer.open(conn_id, time.monotonic()):
            with contextlib.suppress(OSError):
                sock.sendall(b"BUSY (one opener at a time)\n")
            sock.close()
            return
        sock.setblocking(False)
        self._conns[conn_id], self._buffers[conn_id] = sock, bytearray()
        self._sel.register(sock, selectors.EVENT_READ, conn_id)
        with contextlib.suppress(OSError):
            sock.sendall(b"OK\n")
        self._write_status()

    def _read(self, conn_id: int) -> None:
        sock = self._conns[conn_id]
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._timer.close(conn_id, time.monotonic())
            self._drop(conn_id)
            self._write_status()
            return
        buffer = self._buffers[conn_id]
        buffer += data
        changed = False
        while (end := buffer.find(b"\n")) >= 0:
            line = buffer[:end].decode(errors="replace")
            del buffer[: end + 1]
            changed = changed or not line.startswith("K")
            answer = self._timer.command(conn_id, line, time.monotonic())
            if answer is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(answer.encode() + b"\n")
        if changed:
            self._write_status()

    def _drop(self, conn_id: int) -> None:
        sock = self._conns.pop(conn_id)
        self._buffers.pop(conn_id, None)
        self._sel.unregister(sock)
        sock.close()

    def _write_status(self) -> None:
        with self._lock:
            state = self._timer.state(time.monotonic())
        state["at"] = time.time()
        tmp = self.folder / (STATUS_NAME + ".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.folder / STATUS_NAME)


def read_status(folder: Path) -> dict[str, object]:
    try:
        state: dict[str, object] = json.loads((folder / STATUS_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return state


def record_reset(folder: Path, why: str) -> None:
    with open(folder / RESETS_NAME, "a") as fh:
        fh.write(json.dumps({"at": time.time(), "why": why}) + "\n")


def read_resets(folder: Path) -> list[dict[str, object]]:
    try:
        lines = (folder / RESETS_NAME).read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.strip()]
