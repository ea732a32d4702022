"""kvmha-watchdog over its real socket: in a thread with a recording device (the protocol, takeover, disarm), and as
a process driving the lab's hardware watchdog (the daemon's own death fires the device; its marker stops a second
daemon from taking an armed device over). The machine's own /dev/watchdog is never opened: the kernel device class
is only tried on a regular file (its error path)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmha.agent import watchdog_protocol as wire
from kvmha.agent.watchdog_client import ContactNote, WatchdogClient, WatchdogError, WatchdogKeeper, arm_at_start
from kvmha.agent.watchdog_daemon import (
    ConfigError,
    Daemon,
    DaemonConfig,
    build_parser,
    listen,
    load_config,
    query_status,
)
from kvmha.agent.watchdog_device import DeviceError, KernelWatchdog
from kvmha.lab.watchdog_device import LabWatchdogDevice, read_status

WATCHDOG_BIN = str(Path(sys.executable).with_name("kvmha-watchdog"))


def wait_until(predicate: Callable[[], object], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@dataclass
class RecordingDevice:
    name: str = "recording"
    can_disarm: bool = True
    opened: int = 0
    keepalives: list[float] = field(default_factory=list)
    closes: list[bool] = field(default_factory=list)

    def open(self, timeout_s: int) -> int:
        self.opened += 1
        return timeout_s

    def keepalive(self) -> None:
        self.keepalives.append(time.monotonic())

    def close(self, disarm: bool) -> None:
        self.closes.append(disarm)


@dataclass
class Running:
    daemon: Daemon
    device: RecordingDevice
    socket_path: str
    thread: threading.Thread

    def client(self, timeout_s: float = 2.0, client_id: str = "kvmha-agent") -> WatchdogClient:
        return WatchdogClient(self.socket_path, timeout_s, client_id)

    def petted_recently(self, within_s: float = 0.3) -> bool:
        return bool(self.device.keepalives) and time.monotonic() - self.device.keepalives[-1] < within_s


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    cfg = DaemonConfig(device="recording", device_timeout_s=1, socket=str(tmp_path / "wd.sock"),
                       active_marker=str(tmp_path / "run" / "active"), pet_interval_s=0.1)
    device = RecordingDevice()
    daemon = Daemon(cfg, device)
    listener = listen(cfg.socket)
    thread = threading.Thread(target=daemon.run, args=(listener,), daemon=True)
    thread.start()
    try:
        yield Running(daemon, device, cfg.socket, thread)
    finally:
        daemon.stopping = True
        thread.join(5)
        listener.close()


def test_arm_pet_and_clean_disarm(running: Running, tmp_path: Path) -> None:
    client = running.client()
    assert client.arm() is None  # a first arm: no takeover
    state = client.state
    assert state.armed and state.timeout_s == 2.0 and state.device_timeout_s == 1.0 and state.device == "recording"
    assert (tmp_path / "run" / "active").exists()  # the marker exists while the device is armed
    for _ in range(5):
        assert client.pet(ContactNote(1.0, 30.0))
        time.sleep(0.1)
    assert running.petted_recently()
    status = query_status(running.socket_path)["status"]
    assert status["petting"] and status["clients"][0]["client"] == "kvmha-agent"
    assert client.disarm() and not client.state.armed
    assert wait_until(lambda: running.device.closes == [True])  # the magic close
    assert not (tmp_path / "run" / "active").exists()


def test_a_lost_client_stops_the_pets_until_the_same_identity_takes_over(running: Running) -> None:
    first = running.client()
    first.arm()
    first.pet(ContactNote(42.0, 8.0))
    time.sleep(0.2)
    assert first._sock is not None
    first._sock.close()  # the agent crashed: no disarm
    first._sock = None
    assert wait_until(lambda: not running.petted_recently(0.15))
    second = running.client()
    note = second.arm()
    assert note == ContactNote(42.0, 8.0)  # the old agent's contact, for the new agent's isolation clock
    second.pet(None)
    assert wait_until(running.petted_recently)
    second.disarm()


@pytest.mark.parametrize(("due", "responds", "pets"), [(False, True, True), (True, True, False), (True, False, True)])
def test_a_restarted_agent_pets_at_once_unless_its_predecessors_isolation_response_is_due(
        running: Running, due: bool, responds: bool, pets: bool) -> None:
    first = running.client(timeout_s=3.0)
    first.arm()
    contact_at = time.monotonic() - (100.0 if due else 0.0)
    first.pet(ContactNote(contact_at, 30.0))
    time.sleep(0.5)
    assert first._sock is not None
    first._sock.close()  # crashed
    first._sock = None
    client, note = arm_at_start(running.socket_path, 3.0, responds_to_isolation=responds)
    assert note is not None and note.contact_at == pytest.approx(contact_at, abs=0.01)
    [arm] = running.daemon.mux.arms.values()
    petted = wait_until(lambda: time.monotonic() - arm.last_pet_at < 0.4, 0.3)
    assert petted is pets  # arming alone keeps the old agent's last pet (0.5 s old here)
    client.disarm()


def test_a_second_live_agent_is_refused_and_a_silent_one_expires(running: Running) -> None:
    first = running.client()
    first.arm()
    with pytest.raises(WatchdogError, match="another live connection"):
        running.client().arm()
    time.sleep(1.3)  # silent beyond timeout_s - device timeout = 1 s
    status = query_status(running.socket_path)["status"]
    assert not status["petting"] and "silent" in status["doomed"]
    assert not running.petted_recently(0.3)
    with pytest.raises(WatchdogError, match="being reset"):
        running.client(client_id="other").arm()


def test_garbage_ends_the_connection_with_an_error(running: Running) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(running.socket_path)
        sock.sendall(b"not json\n")
        answer = json.loads(sock.recv(4096))
        assert answer["ok"] is False and "not JSON" in answer["error"]
        assert sock.recv(4096) == b""  # closed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(running.socket_path)
        sock.sendall(wire.encode({"op": "arm", "client": "x", "timeout_s": 0.5}))
        assert "timeout_s must be between" in json.loads(sock.recv(4096))["error"]


def test_the_keeper_withholds_pets_while_the_gate_says_so(running: Running) -> None:
    withheld: list[str | None] = [None]
    notes: list[ContactNote] = []
    keeper = WatchdogKeeper(running.client(timeout_s=3.0), lambda _now: withheld[0],
                            lambda: ContactNote(1.0, 30.0), notes.append, interval_s=0.1)
    assert keeper.arm_now()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(keeper.run(stop))
        await asyncio.sleep(0.5)
        assert keeper.pets >= 3
        withheld[0] = "isolation response destroy-vms not complete"
        await asyncio.sleep(0.3)
        pets = keeper.pets
        await asyncio.sleep(0.5)
        assert keeper.pets == pets  # nothing while withheld
        withheld[0] = None
        await asyncio.sleep(0.3)
        assert keeper.pets > pets
        stop.set()
        await task

    asyncio.run(scenario())
    keeper.disarm()
    assert running.device.closes == [True] and notes == []


def test_the_kernel_device_class_refuses_what_is_not_a_watchdog(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "watchdog"
    fake.write_bytes(b"")
    monkeypatch.delenv("KVMHA_WATCHDOG_NO_KERNEL_DEVICE", raising=False)
    with pytest.raises(DeviceError, match="not a usable watchdog device"):
        KernelWatchdog(str(fake)).open(10)
    monkeypatch.setenv("KVMHA_WATCHDOG_NO_KERNEL_DEVICE", "1")
    with pytest.raises(DeviceError, match="refusing to open"):
        KernelWatchdog(str(fake)).open(10)
    with pytest.raises(DeviceError, match="cannot open"):
        monkeypatch.delenv("KVMHA_WATCHDOG_NO_KERNEL_DEVICE")
        KernelWatchdog(str(tmp_path / "missing")).open(10)


# ---------------------------------------------------------------------------------------------- as a process


@dataclass
class Hardware:
    """The lab's hardware watchdog, served in this process; `fired` records each expiry."""

    device: LabWatchdogDevice
    folder: Path
    fired: list[tuple[float, str]] = field(default_factory=list)


@pytest.fixture
def hardware(tmp_path: Path) -> Iterator[Hardware]:
    fired: list[tuple[float, str]] = []
    folder = tmp_path / "hw"
    device = LabWatchdogDevice(folder, lambda why: fired.append((time.monotonic(), why)))
    device.start()
    try:
        yield Hardware(device, folder, fired)
    finally:
        device.stop()


def start_daemon(tmp_path: Path, hardware: Hardware, device_timeout_s: int = 1) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "watchdog.log", "ab")  # noqa: SIM115 - handed to the child; closed by the GC
    proc = subprocess.Popen(
        [WATCHDOG_BIN, "--device", f"unix:{hardware.device.socket_path}", "--device-timeout-s", str(device_timeout_s),
         "--socket", str(tmp_path / "wd.sock"), "--active-marker", str(tmp_path / "run" / "active"),
         "--pet-interval-s", "0.2"],
        stdout=log, stderr=log, env={**os.environ, "KVMHA_WATCHDOG_NO_KERNEL_DEVICE": "1"})
    assert wait_until(lambda: (tmp_path / "wd.sock").exists()), (tmp_path / "watchdog.log").read_text()
    return proc


def test_the_daemon_killed_leaves_the_device_armed_and_a_new_daemon_refuses_to_take_it_over(
        tmp_path: Path, hardware: Hardware) -> None:
    daemon = start_daemon(tmp_path, hardware)
    try:
        client = WatchdogClient(str(tmp_path / "wd.sock"), 3.0)
        client.arm()
        assert read_status(hardware.folder)["running"] is True
        for _ in range(5):
            client.pet(None)
            time.sleep(0.2)
        assert not hardware.fired
        daemon.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        daemon.wait(5)
        assert wait_until(lambda: bool(hardware.fired), 4.0), "the device did not fire after the daemon died"
        assert hardware.fired[0][0] - killed_at <= 1.0 + 0.5  # the device timeout (1 s), plus polling
        again = subprocess.run([WATCHDOG_BIN, "--device", f"unix:{hardware.device.socket_path}", "--socket",
                                str(tmp_path / "wd2.sock"), "--active-marker", str(tmp_path / "run" / "active")],
                               capture_output=True, text=True, timeout=30,
                               env={**os.environ, "KVMHA_WATCHDOG_NO_KERNEL_DEVICE": "1"})
        assert again.returncode == 3 and "refusing_to_start" in again.stderr
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(5)


def test_a_clean_disarm_and_sigterm_stop_the_device_without_a_reset(tmp_path: Path, hardware: Hardware) -> None:
    daemon = start_daemon(tmp_path, hardware)
    client = WatchdogClient(str(tmp_path / "wd.sock"), 3.0)
    client.arm()
    client.pet(None)
    assert client.disarm()
    assert wait_until(lambda: read_status(hardware.folder).get("running") is False)
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(5) == 0
    time.sleep(1.5)
    assert not hardware.fired
    assert not (tmp_path / "run" / "active").exists()


def test_a_silent_client_resets_the_host_within_its_timeout(tmp_path: Path, hardware: Hardware) -> None:
    daemon = start_daemon(tmp_path, hardware)
    try:
        client = WatchdogClient(str(tmp_path / "wd.sock"), 2.5)
        client.arm()
        client.pet(None)
        last_pet = time.monotonic()
        assert wait_until(lambda: bool(hardware.fired), 5.0)
        # In theory at most 2.5 s; the rest is scheduling noise of two processes on a shared 2-core machine.
        assert hardware.fired[0][0] - last_pet <= 2.5 + 0.6
        assert daemon.poll() is None  # the daemon runs on; the reset is the device's doing
    finally:
        daemon.kill()
        daemon.wait(5)


def test_the_example_configuration_loads_and_flags_win(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "config" / "watchdog.toml"
    cfg = load_config(build_parser().parse_args(["--config", str(example)]))
    assert cfg == DaemonConfig()  # the example spells out the defaults
    cfg = load_config(build_parser().parse_args(["--config", str(example), "--device", "unix:/x.sock",
                                                 "--device-timeout-s", "4", "--pet-interval-s", "0.5"]))
    assert (cfg.device, cfg.device_timeout_s, cfg.pet_interval_s) == ("unix:/x.sock", 4, 0.5)
    bad = tmp_path / "bad.toml"
    for text in ("[watchdog]\ndevice_timeout_s = 2.5\n", "[watchdog]\npet_interval_s = 9\n",
                 "[watchdog]\nsocket = \"rel.sock\"\n", "[other]\n", "[watchdog]\nnope = 1\n"):
        bad.write_text(text)
        with pytest.raises(ConfigError):
            load_config(build_parser().parse_args(["--config", str(bad)]))
