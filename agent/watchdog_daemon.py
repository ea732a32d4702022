"""`kvmha-watchdog`: one small daemon per host that owns the watchdog device and multiplexes it among its clients.

The kvmha agent arms it at start and pets it from its main loop; the daemon keeps the device alive only while every
armed client keeps petting (the rules are in kvmha.agent.watchdog_mux). If the agent dies, hangs, is stopped, or
withholds its pets because its isolation response did not complete, the device resets the host. If this daemon
dies, the device is left armed and resets the host too: nothing here has to work for the reset to happen.

Moving parts, on purpose few: one thread, one selector over a Unix socket (root only, mode 0600), one device. It
imports nothing of grpc or libvirt. It refuses to start while its "active" marker exists (a previous daemon ended
with the device armed: a new one must not take that device over and keep a host alive that is due for a reset);
the marker lives on a tmpfs (/run), so a reboot clears it. SIGTERM with nothing armed closes the device cleanly
(magic close); with an arm left, the daemon exits without disarming, and the host resets (stop the agent first:
its systemd unit is ordered after this one, so systemd does).

Usage: kvmha-watchdog [--config /etc/kvmha/watchdog.toml] [--device /dev/watchdog|unix:PATH] ...
       kvmha-watchdog --status            the daemon's view as JSON (asks the running daemon)
Exit codes: 0 clean stop, 1 stopped with the device armed, 2 configuration error, 3 a previous daemon's marker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import selectors
import signal
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from types import FrameType
from typing import Any

from kvmha.agent import watchdog_protocol as wire
from kvmha.agent.watchdog_device import DEFAULT_DEVICE, DeviceError, WatchdogDevice, open_device
from kvmha.agent.watchdog_mux import Mux

log = logging.getLogger("kvmha.watchdog")

DEFAULT_CONFIG_PATH = "/etc/kvmha/watchdog.toml"
DEFAULT_MARKER = "/run/kvmha/watchdog.active"


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class DaemonConfig:
    device: str = DEFAULT_DEVICE
    device_timeout_s: int = 10  # what the device is programmed with (Proxmox uses 10 s too)
    socket: str = wire.DEFAULT_SOCKET
    active_marker: str = DEFAULT_MARKER
    pet_interval_s: float = 1.0
    log_format: str = "kv"


_KEYS = {f.name: f.type for f in fields(DaemonConfig)}


def _coerce(key: str, value: Any) -> Any:
    kind = _KEYS[key]
    try:
        if kind == "int":
            if isinstance(value, bool) or int(value) != float(value) or int(value) <= 0:
                raise ValueError("must be a positive whole number of seconds")
            return int(value)
        if kind == "float":
            number = float(value)
            if not math.isfinite(number) or number <= 0:
                raise ValueError("must be a positive number")
            return number
        if not isinstance(value, str) or not value:
            raise ValueError("must be a non-empty string")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc} (got {value!r})") from exc


def load_config(args: argparse.Namespace) -> DaemonConfig:
    """[watchdog] of the TOML file, then flags (later wins); validated."""
    values: dict[str, Any] = {}
    path = args.config or (DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None)
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if set(data) - {"watchdog"}:
            raise ConfigError(f"unknown sections: {sorted(set(data) - {'watchdog'})}")
        for key, value in dict(data.get("watchdog", {})).items():
            if key not in _KEYS:
                raise ConfigError(f"[watchdog] unknown key {key!r}")
            values[key] = _coerce(key, value)
    for key in _KEYS:
        value = getattr(args, key, None)
        if value is not None:
            values[key] = _coerce(key, value)
    cfg = DaemonConfig(**values)
    if cfg.pet_interval_s * 2 > cfg.device_timeout_s:
        raise ConfigError(f"pet_interval_s {cfg.pet_interval_s} must be at most half of device_timeout_s "
                          f"{cfg.device_timeout_s}")
    if cfg.log_format not in ("kv", "json"):
        raise ConfigError(f"log_format {cfg.log_format!r} is not kv or json")
    for key in ("socket", "active_marker"):
        if not os.path.isabs(getattr(cfg, key)):
            raise ConfigError(f"{key} must be an absolute path")
    return cfg


@dataclass
class _Conn:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)


class Daemon:
    """The daemon's state and event handlers; `run()` is the I/O loop around them."""

    def __init__(self, cfg: DaemonConfig, device: WatchdogDevice,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.device = device
        self.clock = clock
        self.mux = Mux(float(cfg.device_timeout_s), cfg.pet_interval_s)
        self.device_timeout_s = float(cfg.device_timeout_s)  # what the device took, once opened
        self._last_reason = ""
        self._last_device_error = ""
        self.stopping = False

    # -- events ---------------------------------------------------------------------------------------------
    def on_message(self, conn: int, message: dict[str, Any], now: float) -> tuple[dict[str, Any] | None, bool]:
        """Handle one message from `conn`; returns (answer or None, close the connection after it)."""
        op = message["op"]
        if op == "pet":
            self.mux.pet(conn, wire.note_of(message), now)
            return None, False
        if op == "arm":
            return self._arm(conn, message, now), False
        if op == "disarm":
            if self.mux.disarm(conn):
                log.info("event=client_disarmed conn=%d", conn)
            self.tick(now)
            return {"ok": True}, True
        if op == "status":
            return {"ok": True, "status": self.status(now)}, False
        return {"ok": False, "error": f"unknown op {op!r}"}, False

    def _arm(self, conn: int, message: dict[str, Any], now: float) -> dict[str, Any]:
        client, timeout_s = message.get("client"), message.get("timeout_s")
        if not isinstance(client, str) or not isinstance(timeout_s, int | float) or isinstance(timeout_s, bool):
            return {"ok": False, "error": "arm needs a string 'client' and a number 'timeout_s'"}
        result = self.mux.arm(conn, client, float(timeout_s), now)
        if not result.ok:
            log.warning("event=arm_refused conn=%d client=%s error=%r", conn, client, result.error)
            return {"ok": False, "error": result.error}
        if not self.mux.device_open:
            try:
                self._open_device(now)
            except (DeviceError, OSError) as exc:
                self.mux.disarm(conn)
                log.error("event=device_open_failed device=%s error=%r", self.device.name, str(exc))
                return {"ok": False, "error": f"watchdog device: {exc}"}
        log.info("event=client_armed conn=%d client=%s timeout_s=%g takeover=%s", conn, client, timeout_s,
                 result.takeover)
        self.tick(now)  # a takeover resumes the pets at once
        return {"ok": True, "takeover": result.takeover, "note": result.note, "device": self.device.name,
                "device_timeout_s": self.device_timeout_s, "timeout_s": float(timeout_s)}

    def on_closed(self, conn: int, now: float) -> None:
        arm = self.mux.arm_of(conn)
        self.mux.disconnect(conn, now)
        if arm is not None:
            log.error("event=client_lost client=%s why='connection ended without a disarm' "
                      "reset_in_s=%g unless_rearmed=true", arm.client, self.device_timeout_s)

    def tick(self, now: float) -> None:
        """Apply the mux's verdict to the device: pet it, or not, or close it cleanly when nothing is armed."""
        verdict = self.mux.verdict(now)
        if verdict.reason != self._last_reason:
            level = logging.INFO if verdict.pet or not self.mux.arms else logging.ERROR
            log.log(level, "event=verdict petting=%s reason=%r", verdict.pet, verdict.reason)
            self._last_reason = verdict.reason
        try:
            if verdict.pet:
                self.device.keepalive()
                self.mux.device_petted(now)
            elif verdict.close_device:
                self._close_device(now)
        except (DeviceError, OSError) as exc:
            if str(exc) != self._last_device_error:
                log.error("event=device_error device=%s error=%r", self.device.name, str(exc))
                self._last_device_error = str(exc)

    def _open_device(self, now: float) -> None:
        _write_marker(self.cfg.active_marker)
        try:
            taken = self.device.open(self.cfg.device_timeout_s)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.cfg.active_marker)
            raise
        if taken < self.cfg.device_timeout_s:
            log.warning("event=device_timeout_rounded asked_s=%d took_s=%d", self.cfg.device_timeout_s, taken)
        # The pets' limits are counted against what the device really does; a longer timeout is kept as asked
        # (arms count with the daemon's value and resets come later than promised): say so.
        self.device_timeout_s = float(max(taken, 1))
        self.mux.device_timeout_s = self.device_timeout_s
        self.mux.device_opened(now)
        log.info("event=device_opened device=%s timeout_s=%d", self.device.name, taken)

    def _close_device(self, now: float) -> None:
        if not self.device.can_disarm:
            self.device.keepalive()  # nowayout: a device that cannot be stopped must be petted forever
            self.mux.device_petted(now)
            return
        self.device.close(disarm=True)
        self.mux.device_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.cfg.active_marker)
        log.info("event=device_closed device=%s why='nothing armed: magic close'", self.device.name)

    def finish(self, now: float) -> int:
        """Stop: disarm if nothing is armed; otherwise leave the device armed, and the host resets."""
        verdict = self.mux.verdict(now)
        if self.mux.arms or self.mux.doomed:
            log.critical("event=stopping_armed clients=%s reason=%r why='the device stays armed: the host resets "
                         "within %g s'", ",".join(sorted(self.mux.arms)), verdict.reason, self.device_timeout_s)
            self.device.close(disarm=False)
            return 1
        if self.mux.device_open:
            self._close_device(now)
        log.info("event=watchdog_stopped")
        return 0

    def status(self, now: float) -> dict[str, Any]:
        return {"device": self.device.name, "pet_interval_s": self.cfg.pet_interval_s, **self.mux.status(now)}

    # -- the loop -------------------------------------------------------------------------------------------
    def run(self, listener: socket.socket) -> int:
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, None)
        conns: dict[int, _Conn] = {}
        next_id = 0
        next_tick = self.clock()
        while not self.stopping:
            for key, _ in sel.select(max(0.0, next_tick - self.clock())):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                        sock, _addr = listener.accept()
                        sock.setblocking(False)
                        next_id += 1
                        conns[next_id] = _Conn(sock)
                        sel.register(sock, selectors.EVENT_READ, next_id)
                    continue
                conn_id: int = key.data
                if not self._read(conn_id, conns[conn_id]):
                    sel.unregister(conns[conn_id].sock)
                    conns.pop(conn_id).sock.close()
                    self.on_closed(conn_id, self.clock())
            now = self.clock()
            if now >= next_tick:
                self.tick(now)
                # Absolute schedule, but never a burst of catch-up pets after a stall.
                next_tick = max(next_tick + self.cfg.pet_interval_s, now)
        code = self.finish(self.clock())
        for conn in conns.values():
            conn.sock.close()
        return code

    def _read(self, conn_id: int, conn: _Conn) -> bool:
        """Read what the client sent and answer it; False when the connection is over."""
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not data:
            return False
        conn.buffer += data
        try:
            for line in wire.split_lines(conn.buffer):
                answer, close = self.on_message(conn_id, wire.decode(line), self.clock())
                if answer is not None:
                    conn.sock.send(wire.encode(answer))  # tiny; a client that does not read is dropped
                if close:
                    return False
        except wire.ProtocolError as exc:
            log.warning("event=client_protocol_error conn=%d error=%r", conn_id, str(exc))
            with contextlib.suppress(OSError):
                conn.sock.send(wire.encode({"ok": False, "error": str(exc)}))
            return False
        except OSError:
            return False
        return True


def _write_marker(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(f"pid={os.getpid()} opened_at={time.time():.3f}\n")


def listen(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket file left by a daemon that died; the marker check came first
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600: only root may arm or disarm the host's watchdog
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(16)
    sock.setblocking(False)
    return sock


def query_status(path: str, timeout_s: float = 3.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(wire.encode({"op": "status"}))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def setup_logging(log_format: str) -> None:
    class _Formatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
            if log_format == "json":
                return json.dumps({"ts": ts, "level": record.levelname.lower(), "logger": record.name,
                                   "msg": record.getMessage()})
            return f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmha-watchdog",
        description="kvmha's watchdog multiplexer: keeps the host's watchdog device alive only while every client "
                    "that armed it (the kvmha agent) keeps petting it; otherwise the host resets.",
        epilog=f"Configuration: [watchdog] in {DEFAULT_CONFIG_PATH} (if it exists), then flags.")
    p.add_argument("--config", default=None, help="TOML file with a [watchdog] section")
    p.add_argument("--device", default=None, help=f"{DEFAULT_DEVICE} (default) or unix:PATH (the lab's device)")
    p.add_argument("--device-timeout-s", dest="device_timeout_s", type=int, default=None,
                   help="the device's timeout in whole seconds (default 10)")
    p.add_argument("--socket", default=None, help=f"where clients connect (default {wire.DEFAULT_SOCKET})")
    p.add_argument("--active-marker", dest="active_marker", default=None,
                   help=f"exists while the device is armed; must be on a tmpfs (default {DEFAULT_MARKER})")
    p.add_argument("--pet-interval-s", dest="pet_interval_s", type=float, default=None)
    p.add_argument("--log-format", dest="log_format", choices=("kv", "json"), default=None)
    p.add_argument("--status", action="store_true", help="print the running daemon's status as JSON and exit")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
        device = open_device(cfg.device)
    except (ConfigError, DeviceError) as exc:
        print(f"kvmha-watchdog: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.status:
        try:
            print(json.dumps(query_status(cfg.socket), indent=2))
        except (OSError, ValueError) as exc:
            print(f"kvmha-watchdog: no daemon answers on {cfg.socket}: {exc}", file=sys.stderr)
            return 1
        return 0
    setup_logging(cfg.log_format)
    if os.path.exists(cfg.active_marker):
        log.critical("event=refusing_to_start marker=%s why='a previous kvmha-watchdog ended with the device "
                     "armed: the host is due for a reset; a reboot clears the marker'", cfg.active_marker)
        return 3
    daemon = Daemon(replace(cfg), device)

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        daemon.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    listener = listen(cfg.socket)
    log.info("event=watchdog_started device=%s device_timeout_s=%d socket=%s pet_interval_s=%g", device.name,
             cfg.device_timeout_s, cfg.socket, cfg.pet_interval_s)
    try:
        return daemon.run(listener)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(cfg.socket)


if __name__ == "__main__":
    sys.exit(main())
