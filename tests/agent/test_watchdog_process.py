"""The host side of issue 11 in real processes, without root or a lab: a kvmha-agent (libvirt's test:///default) armed
on a kvmha-watchdog process that drives the lab's hardware watchdog (served in this test), reporting to a fake
manager. A killed agent resets the "host" within the device timeout, a stopped one within its watchdog timeout, a
clean stop disarms, and an agent restarted in time takes the arm over without a reset. What the lab adds (the reset
itself: the host killed and booted again) is tests/e2e/test_watchdog.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmha.lab.testing.fake_manager import FakeManager
from kvmha.lab.testing.local import AgentProcess
from kvmha.lab.watchdog_device import LabWatchdogDevice, read_status

pytestmark = pytest.mark.timeout(120)

WATCHDOG_BIN = str(Path(sys.executable).with_name("kvmha-watchdog"))
DEVICE_TIMEOUT_S = 3
TIMEOUT_S = 6.0
SLACK_S = 0.6  # the device polls every 50 ms, the daemon pets every 0.2 s, and this machine is shared


@dataclass
class Host:
    """A "host": the hardware watchdog (in this process), kvmha-watchdog and an agent, both real processes."""

    tmp: Path
    manager: FakeManager
    fired: list[float] = field(default_factory=list)
    device: LabWatchdogDevice | None = None
    daemon: subprocess.Popen[bytes] | None = None
    agent: AgentProcess | None = None

    def start(self) -> Host:
        self.device = LabWatchdogDevice(self.tmp / "hw", lambda _why: self.fired.append(time.monotonic()))
        self.device.start()
        log = open(self.tmp / "watchdog.log", "ab")  # noqa: SIM115 - the child's; closed with this process
        self.daemon = subprocess.Popen(
            [WATCHDOG_BIN, "--device", f"unix:{self.device.socket_path}", "--device-timeout-s", str(DEVICE_TIMEOUT_S),
             "--socket", str(self.tmp / "wd.sock"), "--active-marker", str(self.tmp / "run" / "active"),
             "--pet-interval-s", "0.2"],
            stdout=log, stderr=log, env={**os.environ, "KVMHA_WATCHDOG_NO_KERNEL_DEVICE": "1"})
        deadline = time.monotonic() + 10
        while not (self.tmp / "wd.sock").exists():
            assert time.monotonic() < deadline, (self.tmp / "watchdog.log").read_text()
            time.sleep(0.05)
        (self.tmp / "libvirt").mkdir()
        (self.tmp / "libvirt" / "qemu.conf").write_text('lock_manager = "lockd"\n')
        (self.tmp / "libvirt" / "qemu-lockd.conf").write_text(f'file_lockspace_dir = "{self.tmp}/leases"\n')
        self.agent = self.new_agent()
        return self

    def new_agent(self) -> AgentProcess:
        """An agent process with this host's identity and configuration (a restart is a new process)."""
        agent = AgentProcess(self.tmp, [self.manager.address], storage_paths=[str(self.tmp / "shared")],
                             host_uuid=self.agent.host_uuid if self.agent else None)
        text = agent.config_path.read_text().replace(
            "[agent]\n", f'[agent]\nlibvirt_config_dir = "{self.tmp}/libvirt"\n', 1)
        agent.config_path.write_text(
            text + f'[watchdog]\nsocket = "{self.tmp}/wd.sock"\ntimeout_s = {TIMEOUT_S}\n')
        return agent.start()

    def stop(self) -> None:
        for proc in (self.agent.process if self.agent else None, self.daemon):
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.wait(10)
        if self.device is not None:
            self.device.stop()

    def wait_armed(self) -> None:
        self.manager.wait_for(lambda r: r.kind == "ping" and r.msg.ping.watchdog.armed, 15)

    def device_running(self) -> bool:
        return read_status(self.tmp / "hw").get("running") is True


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    manager = FakeManager(ping_interval_s=0.2).start()
    manager.welcome.isolation_after_s = 9.0
    test_host = Host(tmp_path, manager)
    try:
        yield test_host.start()
    finally:
        test_host.stop()
        manager.close()


def test_hello_and_pings_report_the_armed_watchdog_and_a_clean_stop_disarms(host: Host) -> None:
    hello = host.manager.wait_for(lambda r: r.kind == "hello").msg.hello
    assert hello.watchdog.armed and hello.watchdog.timeout_s == TIMEOUT_S, hello.watchdog
    assert hello.watchdog.device_timeout_s == DEVICE_TIMEOUT_S and hello.watchdog.device.startswith("unix:")
    assert hello.disk_leases.lock_manager == "lockd" and hello.disk_leases.auto_disk_leases
    assert hello.disk_leases.file_lockspace_dir == f"{host.tmp}/leases"
    assert hello.isolation_policy == "none"
    host.wait_armed()
    assert host.device_running()
    assert host.agent is not None
    log = host.agent.log()
    assert "event=isolation_after_changed from_s=30.0 to_s=9.0 source=manager" in log, log[-2000:]
    assert host.agent.stop() == 0
    assert "event=watchdog_disarmed confirmed=True" in host.agent.log()
    deadline = time.monotonic() + 3
    while host.device_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not host.device_running(), "the last client disarmed: the device is stopped (magic close)"
    time.sleep(DEVICE_TIMEOUT_S + SLACK_S)
    assert not host.fired


def test_a_killed_agent_resets_the_host_within_the_device_timeout(host: Host) -> None:
    host.wait_armed()
    assert host.agent is not None and host.agent.process is not None
    host.agent.process.kill()
    killed_at = time.monotonic()
    deadline = killed_at + DEVICE_TIMEOUT_S + 3
    while not host.fired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.fired, "no reset after the agent died"
    assert host.fired[0] - killed_at <= DEVICE_TIMEOUT_S + SLACK_S


def test_a_stopped_agent_resets_the_host_within_its_watchdog_timeout(host: Host) -> None:
    host.wait_armed()
    assert host.agent is not None
    os.kill(host.agent.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    deadline = stopped_at + TIMEOUT_S + 3
    while not host.fired and time.monotonic() < deadline:
        time.sleep(0.05)
    assert host.fired, "no reset after the agent froze"
    # Its last pet came at most one pet interval (0.6 s here: min(1, (6 - 3) / 5)) before the SIGSTOP.
    assert TIMEOUT_S - 0.6 - 0.3 <= host.fired[0] - stopped_at <= TIMEOUT_S + SLACK_S


def test_an_agent_restarted_within_the_device_timeout_takes_over_without_a_reset(host: Host) -> None:
    host.wait_armed()
    assert host.agent is not None and host.agent.process is not None
    host.agent.process.kill()
    host.agent.process.wait(5)
    since = host.manager.mark()
    host.agent = host.new_agent()  # as systemd's Restart=always does, at once
    host.manager.wait_for(lambda r: r.kind == "hello" and r.msg.hello.watchdog.armed, 15, since)
    time.sleep(TIMEOUT_S + SLACK_S)
    assert not host.fired, "a restart in time must not reset the host"
    assert "takeover=True" in host.agent.log() and "event=watchdog_takeover" in host.agent.log()
    assert host.agent.stop() == 0
