"""Storage heartbeat: proof, readable by the neighbours, that this host still writes to its shared storage.

Every interval the agent writes its wall-clock time to `<storage path>/kvmha/heartbeat/<host uuid>` on each
configured path. The write is atomic (temporary file, fsync, rename, fsync of the directory) so a reader never sees
a half-written file. Each path has its own thread: a hung NFS mount blocks only its own writes, and a write that hangs
is reported as a failure (after two intervals) instead of looking healthy forever.

The file holds epoch seconds; a reader on another host compares them with its own clock (as CloudStack's `hb-<ip>`
files do), so hosts need NTP; a negative age from clock skew is reported as 0.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("kvmha.agent.heartbeat")

HEARTBEAT_DIR = os.path.join("kvmha", "heartbeat")


def heartbeat_file(storage_path: str, host_uuid: str) -> str:
    return os.path.join(storage_path, HEARTBEAT_DIR, host_uuid)


def write_heartbeat(storage_path: str, host_uuid: str, now_epoch_s: float) -> None:
    """Write one heartbeat atomically; raises OSError on any failure."""
    # Never create the storage path itself: if the share is not mounted there, a heartbeat on the local disk
    # would look healthy here while no neighbour can read it.
    if not os.path.isdir(storage_path):
        raise FileNotFoundError(2, "storage path missing (not mounted?)", storage_path)
    directory = os.path.join(storage_path, HEARTBEAT_DIR)
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, host_uuid)
    tmp = f"{final}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{now_epoch_s:.3f}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    # The rename is only durable once the directory is synced; on NFS this is also what pushes it to the server.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass(frozen=True)
class HeartbeatReading:
    found: bool
    age_s: float = -1.0
    path: str = ""
    error: str = ""


def read_heartbeat(storage_paths: tuple[str, ...], host_uuid: str, now_epoch_s: float) -> HeartbeatReading:
    """The freshest heartbeat of `host_uuid` over all storage paths (the reader used by CheckNeighbor)."""
    best: HeartbeatReading | None = None
    errors: list[str] = []
    for storage_path in storage_paths:
        path = heartbeat_file(storage_path, host_uuid)
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                text = fh.read(64)
            try:
                written_s = float(text.strip())
            except ValueError:
                # Not our format (a torn or foreign file): the mtime still says when it was last touched.
                written_s = os.stat(path).st_mtime
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
            continue
        age_s = max(0.0, now_epoch_s - written_s)
        if best is None or age_s < best.age_s:
            best = HeartbeatReading(True, age_s, path)
    if best is not None:
        return best
    return HeartbeatReading(False, error="; ".join(errors))


@dataclass(frozen=True)
class PathStatus:
    path: str
    ok: bool
    last_ok_age_s: float  # negative: never written
    error: str


class _PathState:
    def __init__(self, path: str, started_at: float) -> None:
        self.path = path
        self.ok = False
        self.error = "not written yet"
        self.last_ok_at: float | None = None
        self.write_started_at: float | None = None
        self.started_at = started_at


class HeartbeatWriter:
    """Writes the heartbeat on every path from its own daemon thread; `status()` never blocks on storage."""

    def __init__(self, storage_paths: tuple[str, ...], host_uuid: str, interval_s: float) -> None:
        self._host_uuid = host_uuid
        self._interval_s = interval_s
        now = time.monotonic()
        self._states = [_PathState(p, now) for p in storage_paths]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for state in self._states:
            thread = threading.Thread(target=self._run, args=(state,), name=f"heartbeat:{state.path}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()

    def _run(self, state: _PathState) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                state.write_started_at = started
            try:
                write_heartbeat(state.path, self._host_uuid, time.time())
            except OSError as exc:
                error = f"{exc.strerror or exc} ({exc.filename or state.path})"
                with self._lock:
                    # Log the first failure and every change of error, not every retry of the same one.
                    changed = state.ok or state.error != error
                    state.ok, state.error, state.write_started_at = False, error, None
                if changed:
                    log.warning("event=heartbeat_write_failed path=%s error=%r", state.path, error)
            else:
                with self._lock:
                    recovered = not state.ok and state.last_ok_at is not None
                    state.ok, state.error = True, ""
                    state.last_ok_at, state.write_started_at = time.monotonic(), None
                if recovered:
                    log.info("event=heartbeat_write_recovered path=%s", state.path)
            self._stop.wait(max(0.0, self._interval_s - (time.monotonic() - started)))

    def status(self) -> list[PathStatus]:
        now = time.monotonic()
        out = []
        with self._lock:
            for s in self._states:
                ok, error = s.ok, s.error
                if s.write_started_at is not None and now - s.write_started_at > 2 * self._interval_s:
                    ok, error = False, f"write hanging for {now - s.write_started_at:.1f}s"
                age_s = -1.0 if s.last_ok_at is None else now - s.last_ok_at
                out.append(PathStatus(s.path, ok, age_s, error))
        return out

    def last_ok_at(self) -> float | None:
        """Monotonic time of the latest successful write on any path (None: never); for the isolation response."""
        with self._lock:
            times = [s.last_ok_at for s in self._states if s.last_ok_at is not None]
        return max(times) if times else None
