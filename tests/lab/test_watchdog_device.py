"""The lab's hardware watchdog behaves like the kernel's (no root needed): timer semantics on a fake clock, then the
device served over its socket to kvmha-watchdog's SocketWatchdog client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvmha.agent import config
from kvmha.agent.watchdog_device import DeviceError, SocketWatchdog
from kvmha.lab import host
from kvmha.lab.state import HostSpec, LabSpec
from kvmha.lab.watchdog_device import DEFAULT_TIMEOUT_S, LabWatchdogDevice, WatchdogTimer, read_status


def test_open_starts_the_timer_and_keepalives_push_the_deadline() -> None:
    timer = WatchdogTimer()
    assert timer.open(1, 0.0) and timer.running and timer.deadline == DEFAULT_TIMEOUT_S
    assert not timer.open(2, 0.0)  # one opener at a time
    assert timer.command(1, "T 5", 1.0) == "OK 5"  # SETTIMEOUT also pets
    assert timer.command(2, "T 9", 1.0) is None  # not the opener: ignored
    timer.command(1, "K", 4.0)
    assert not timer.expired(8.9) and timer.expired(9.0)
    assert timer.expired(100.0) and not timer.open(3, 100.0)  # fired: stays fired until the host is reset


def test_magic_close_stops_it_and_a_plain_close_leaves_it_running() -> None:
    timer = WatchdogTimer()
    timer.open(1, 0.0)
    timer.command(1, "T 3", 0.0)
    timer.command(1, "V", 1.0)
    assert timer.close(1, 1.0).startswith("stopped")
    assert not timer.running and not timer.expired(1000.0)
    timer.open(2, 2000.0)
    timer.command(2, "T 3", 2000.0)
    timer.command(2, "V", 2001.0)
    timer.command(2, "K", 2001.5)  # any later write cancels the magic character, as in the kernel
    assert "did not stop" in timer.close(2, 2002.0)
    assert not timer.expired(2004.9) and timer.expired(2005.0)  # one last keepalive at the close, then it fires


def test_served_over_its_socket_to_the_daemons_client(tmp_path: Path) -> None:
    fired: list[str] = []
    device = LabWatchdogDevice(tmp_path / "wd", fired.append)
    device.start()
    try:
        client = SocketWatchdog(str(device.socket_path))
        assert client.open(1) == 1
        with pytest.raises(DeviceError, match="BUSY"):
            SocketWatchdog(str(device.socket_path)).open(1)
        assert read_status(tmp_path / "wd")["running"] is True
        for _ in range(6):
            client.keepalive()
            time.sleep(0.25)
        assert not fired
        client.close(disarm=True)
        time.sleep(1.3)
        assert not fired and read_status(tmp_path / "wd")["running"] is False
        again = SocketWatchdog(str(device.socket_path))
        again.open(1)
        again.close(disarm=False)  # "watchdog did not stop!"
        deadline = time.monotonic() + 3
        while not fired and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fired and "expired" in fired[0]
        device.reset()  # the power supply reset the host: the device comes back disarmed
        assert read_status(tmp_path / "wd")["running"] is False and read_status(tmp_path / "wd")["fired"] is False
    finally:
        device.stop()
    assert not device.socket_path.exists()


def test_a_lab_with_a_watchdog_gives_each_host_the_device_the_daemon_and_an_armed_agent(tmp_path: Path) -> None:
    spec = LabSpec(state_dir=str(tmp_path), prefix="kvmhat", subnet="10.251.0.192/26", bridge="kvmhat-br0",
                   bridge_address="10.251.0.193", shared_dir=str(tmp_path / "shared"), manager="10.251.0.193:50051",
                   domain_type="kvm", bmc_user="admin", bmc_password="pw", watchdog_device_timeout_s=4)
    h1 = HostSpec(name="h1", index=1, netns="kvmhat-h1", veth="kvmhat-h1", address="10.251.0.203", bmc_port=623,
                  host_uuid="6f1d3a52-9c0e-4a55-8d11-000000000001", dir=str(tmp_path / "hosts" / "h1"))
    spec.hosts.append(h1)
    host.prepare(spec, h1, {"watchdog.timeout_s": 9.0})
    boot = host.boot_config(spec, h1)
    names = [s.name for s in boot.services]
    assert names.index("kvmha-watchdog") < names.index("kvmha-agent")  # armed by the agent at its start
    [daemon] = [s for s in boot.services if s.name == "kvmha-watchdog"]
    assert daemon.argv[:2] == ["env", "KVMHA_WATCHDOG_NO_KERNEL_DEVICE=1"]  # never the machine's /dev/watchdog
    assert f"unix:{h1.dir}/watchdog/device.sock" in daemon.argv and "/dev/watchdog" not in " ".join(daemon.argv)
    assert f"{h1.dir}/run" in boot.tmpfs  # the daemon's marker dies with the boot, as on /run
    assert f"--watchdog {h1.dir}/watchdog --" in host.startcmd(h1, spec)
    cfg = config.load_config(["--config", f"{h1.dir}/agent.toml"], environ={})
    assert cfg.watchdog_enabled and cfg.watchdog_timeout_s == 9.0 and cfg.watchdog_socket == daemon.wait_for
    spec.watchdog_device_timeout_s = 0
    host.prepare(spec, h1, {})
    assert not config.load_config(["--config", f"{h1.dir}/agent.toml"], environ={}).watchdog_enabled
    assert "kvmha-watchdog" not in [s.name for s in host.boot_config(spec, h1).services]
    assert "--watchdog" not in host.startcmd(h1, spec)
