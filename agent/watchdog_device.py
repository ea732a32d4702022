"""Watchdog devices kvmha-watchdog can drive: the Linux kernel's, and one served over a Unix socket (the lab's).

`KernelWatchdog` speaks the Linux watchdog API (Documentation/watchdog/watchdog-api.rst): opening /dev/watchdog
starts the timer, WDIOC_SETTIMEOUT sets it (the driver may round it; the value it took is read back),
WDIOC_KEEPALIVE pets it, and writing the magic character 'V' right before close() stops it. A close without it
("watchdog did not stop!") leaves the timer running: the host resets. That is also what happens when the process
holding the device dies. Only production exercises this class (the machines that run the tests have no softdog and
must never have their own watchdog opened); the tests cover its error path on a file that is not a device.

`SocketWatchdog` ("unix:PATH") is a watchdog timer that lives outside the host and is reached over a Unix stream
socket; the lab's power supply serves one per host (kvmha.lab.watchdog_device) and power-cycles the host when it
expires. Its protocol mirrors the kernel's semantics line by line: on connect "OK" (or "BUSY": one opener at a
time), "T <seconds>" -> "OK <seconds>" (SETTIMEOUT), "K" (keepalive), "V" (magic character), then close.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from typing import Protocol

DEFAULT_DEVICE = "/dev/watchdog"
SOCKET_PREFIX = "unix:"

# <linux/watchdog.h>, _IOR/_IOWR('W', n, ...) on Linux (dir << 30 | size << 16 | 'W' << 8 | n).
WDIOC_GETSUPPORT = 0x80285700  # _IOR('W', 0, struct watchdog_info): u32 options, u32 firmware, u8 identity[32]
WDIOC_KEEPALIVE = 0x80045705
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
WDIOF_SETTIMEOUT = 0x0080
WDIOF_MAGICCLOSE = 0x0100


class DeviceError(RuntimeError):
    pass


class WatchdogDevice(Protocol):
    name: str

    def open(self, timeout_s: int) -> int:
        """Start the timer with this timeout; returns the timeout the device took (it may round)."""

    def keepalive(self) -> None: ...

    def close(self, disarm: bool) -> None:
        """disarm=True: the magic close (the timer stops). False: close and leave it running (the host resets)."""

    @property
    def can_disarm(self) -> bool:
        """False when the magic close is not supported (or nowayout): the timer can then never be stopped."""


class KernelWatchdog:
    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        self.name = path
        self._fd: int | None = None
        self._options = 0

    @property
    def can_disarm(self) -> bool:
        return bool(self._options & WDIOF_MAGICCLOSE)

    def open(self, timeout_s: int) -> int:
        if os.environ.get("KVMHA_WATCHDOG_NO_KERNEL_DEVICE"):
            # Set by the lab and the tests: a misconfigured daemon there must never open the machine's watchdog.
            raise DeviceError(f"refusing to open {self.name}: KVMHA_WATCHDOG_NO_KERNEL_DEVICE is set")
        try:
            fd = os.open(self.name, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DeviceError(f"cannot open {self.name}: {exc.strerror} (is a watchdog driver loaded? softdog?)") \
                from exc
        self._fd = fd
        try:
            info = bytearray(40)
            fcntl.ioctl(fd, WDIOC_GETSUPPORT, info)
            self._options = struct.unpack_from("I", info)[0]
            if self._options & WDIOF_SETTIMEOUT:
                value = bytearray(struct.pack("i", timeout_s))
                fcntl.ioctl(fd, WDIOC_SETTIMEOUT, value)
            value = bytearray(4)
            fcntl.ioctl(fd, WDIOC_GETTIMEOUT, value)
            return int(struct.unpack("i", value)[0])
        except OSError as exc:
            # Leave it running rather than guess: a device we cannot program is not one to stop blindly either.
            os.close(fd)
            self._fd = None
            raise DeviceError(f"{self.name} is not a usable watchdog device: {exc.strerror}") from exc

    def keepalive(self) -> None:
        if self._fd is None:
            raise DeviceError(f"{self.name} is not open")
        try:
            fcntl.ioctl(self._fd, WDIOC_KEEPALIVE, 0)
        except OSError:
            os.write(self._fd, b"\0")  # every driver treats a write as a keepalive

    def close(self, disarm: bool) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if disarm:
                os.write(fd, b"V")
        finally:
            os.close(fd)


class SocketWatchdog:
    """A watchdog timer served over a Unix stream socket (the lab's hardware); same semantics as the kernel's."""

    def __init__(self, path: str, connect_timeout_s: float = 5.0) -> None:
        self.name = f"{SOCKET_PREFIX}{path}"
        self.path = path
        self._connect_timeout_s = connect_timeout_s
        self._sock: socket.socket | None = None

    @property
    def can_disarm(self) -> bool:
        return True

    def open(self, timeout_s: int) -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._connect_timeout_s)
        try:
            sock.connect(self.path)
            greeting = _readline(sock)
            if greeting != "OK":
                raise DeviceError(f"{self.name}: {greeting or 'closed at open'}")
            sock.sendall(f"T {timeout_s}\n".encode())
            answer = _readline(sock).split()
            if len(answer) != 2 or answer[0] != "OK":
                raise DeviceError(f"{self.name}: SETTIMEOUT answered {answer!r}")
            taken = int(answer[1])
        except (OSError, ValueError) as exc:
            sock.close()
            raise DeviceError(f"cannot open {self.name}: {exc}") from exc
        except DeviceError:
            sock.close()
            raise
        self._sock = sock
        return taken

    def keepalive(self) -> None:
        if self._sock is None:
            raise DeviceError(f"{self.name} is not open")
        try:
            self._sock.sendall(b"K\n")
        except OSError as exc:
            raise DeviceError(f"{self.name}: keepalive failed: {exc}") from exc

    def close(self, disarm: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        with contextlib.suppress(OSError):
            if disarm:
                sock.sendall(b"V\n")
        sock.close()


def _readline(sock: socket.socket, limit: int = 256) -> str:
    """One short answer line, read a byte at a time so that nothing after it is consumed."""
    data = bytearray()
    while len(data) < limit:
        byte = sock.recv(1)
        if not byte or byte == b"\n":
            break
        data += byte
    return data.decode(errors="replace").strip()


def open_device(spec: str) -> WatchdogDevice:
    """'/dev/watchdog' (or another kernel device path) or 'unix:PATH'."""
    if spec.startswith(SOCKET_PREFIX):
        return SocketWatchdog(spec.removeprefix(SOCKET_PREFIX))
    if not os.path.isabs(spec):
        raise DeviceError(f"device {spec!r}: an absolute device path or unix:PATH")
    return KernelWatchdog(spec)
