"""The agent's side of the self-fence guarantee without processes: the isolation response gates the watchdog pets
until it is complete, a restarted agent continues its predecessor's isolation clock, the manager's isolation delay
wins, and Hello/Ping say what backs the host. Also the [watchdog] configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmha.agent.commands import CommandRunner
from kvmha.agent.config import ConfigError, load_config
from kvmha.agent.heartbeat import HeartbeatWriter
from kvmha.agent.hypervisor import FakeHypervisor
from kvmha.agent.isolation import IsolationMonitor
from kvmha.agent.lease import LockConfig
from kvmha.agent.link import AgentLink, LinkSettings
from kvmha.agent.watchdog_agent import SelfFence
from kvmha.agent.watchdog_client import ContactNote, WatchdogClient
from kvmha.lab.domain import domain_xml
from kvmha.proto.v1 import agent_pb2 as pb
from tests.agent.conftest import new_uuid

AFTER_S = 30.0
HOST = "6d1f8f3e-3b39-4a3c-8f37-0a3f3f3f3f3f"


def monitor(hv: FakeHypervisor, policy: str = "destroy-vms") -> IsolationMonitor:
    return IsolationMonitor(hv, policy, AFTER_S, storage_configured=True, started_at=0.0, reboot=lambda: None)


def test_pets_are_withheld_from_isolation_until_the_response_is_complete() -> None:
    hv = FakeHypervisor()
    hv.open()
    vm = new_uuid()
    hv.start_vm(domain_xml("vm", vm))
    iso = monitor(hv)
    assert iso.response_pending(10.0, 0.0, 0.0) is None  # not isolated yet
    pending = iso.response_pending(31.0, 0.0, 0.0)
    assert pending is not None and "destroy-vms not complete" in pending  # declared: withheld at once
    hv.connected = False  # libvirtd gone: the destroy cannot happen
    iso.tick(31.0, 0.0, 0.0)
    assert iso.response_pending(32.0, 0.0, 0.0) is not None and hv.running_uuids() == {vm}
    hv.connected = True
    hv.fail_next = "Timed out during operation: cannot acquire state change lock"
    iso.tick(33.0, 0.0, 0.0)  # retried every tick; this destroy fails
    assert iso.response_pending(33.5, 0.0, 0.0) is not None and hv.running_uuids() == {vm}
    iso.tick(34.0, 0.0, 0.0)
    assert hv.running_uuids() == set() and iso.response_pending(34.5, 0.0, 0.0) is None  # complete: pets resume
    assert iso.response_pending(36.0, 36.0, 0.0) is None  # the manager is back
    iso.tick(36.0, 36.0, 0.0)
    assert iso.response_pending(70.0, 36.0, 0.0) is not None  # a new episode needs a new response


def test_policies_that_do_not_respond_never_withhold_and_a_reboot_is_never_complete() -> None:
    hv = FakeHypervisor()
    hv.open()
    assert monitor(hv, "none").response_pending(100.0, 0.0, 0.0) is None
    reboot = monitor(hv, "reboot-host")
    reboot.tick(31.0, 0.0, 0.0)
    assert reboot.response_pending(40.0, 0.0, 0.0) is not None


def test_the_managers_isolation_delay_and_a_takeover_move_the_deadline() -> None:
    hv = FakeHypervisor()
    hv.open()
    iso = monitor(hv)
    iso.set_after_s(8.0, "manager (Welcome)")
    assert iso.response_pending(9.0, 0.0, 0.0) is not None
    late = IsolationMonitor(hv, "destroy-vms", 8.0, storage_configured=True, started_at=100.0)
    assert late.response_pending(105.0, 100.0, None) is None
    late.set_started_at(90.0)  # the predecessor's last storage contact
    assert late.response_pending(105.0, 90.0, None) is not None


def make_self_fence(tmp_path: Path, client: WatchdogClient | None) -> tuple[SelfFence, AgentLink, IsolationMonitor]:
    hv = FakeHypervisor()
    iso = monitor(hv)
    heartbeat = HeartbeatWriter((str(tmp_path),), HOST, 1.0)
    fence = SelfFence(iso, heartbeat, LockConfig("lockd", True, "/srv/leases", True), client)
    settings = LinkSettings(managers=("127.0.0.1:1",), host_uuid=HOST, hostname="h", management_address="",
                            storage_paths=(), agent_version="t", boot_id="b")
    link = AgentLink(settings, hv, CommandRunner(hv, (), 22), None, fence.hooks())
    fence.link = link
    return fence, link, iso


def test_hello_ping_and_welcome_carry_the_guarantee(tmp_path: Path) -> None:
    fence, link, iso = make_self_fence(tmp_path, None)
    hooks = fence.hooks()
    assert hooks.hello is not None and hooks.welcome is not None
    hello = pb.Hello()
    hooks.hello(hello)
    assert not hello.watchdog.armed and "disabled" in hello.watchdog.detail
    assert hello.disk_leases.lock_manager == "lockd" and hello.disk_leases.file_lockspace_dir == "/srv/leases"
    assert hello.isolation_policy == "destroy-vms"
    ping = link._ping().ping
    assert ping.HasField("watchdog") and not ping.watchdog.armed
    hooks.welcome(pb.Welcome(isolation_after_s=12.5))
    assert iso.after_s == 12.5
    hooks.welcome(pb.Welcome())  # 0: the manager does not say
    assert iso.after_s == 12.5
    hooks.welcome(pb.Welcome(isolation_after_s=float("inf")))
    assert iso.after_s == 12.5


def test_a_takeover_continues_the_predecessors_clock(tmp_path: Path) -> None:
    fence, link, iso = make_self_fence(tmp_path, WatchdogClient(str(tmp_path / "none.sock"), 20.0))
    assert fence.keeper is not None and not fence.keeper.arm_now()  # no daemon: not armed, and says why
    assert "kvmha-watchdog at" in fence.state().detail
    link.manager_seen_at = 500.0
    fence.takeover(ContactNote(contact_at=480.0, isolation_after_s=8.0))
    assert link.manager_seen_at == 480.0 and iso.started_at == 0.0 and iso.after_s == 8.0
    note = fence.note()
    assert note == ContactNote(480.0, 8.0)


def test_watchdog_configuration(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    plaintext = "[tls]\nallow_insecure_plaintext = true\n"
    path.write_text(f'[agent]\nhost_uuid = "{HOST}"\n[watchdog]\nsocket = "/run/x.sock"\ntimeout_s = 12\n{plaintext}')
    cfg = load_config(["--config", str(path)], environ={})
    assert (cfg.watchdog_enabled, cfg.watchdog_socket, cfg.watchdog_timeout_s) == (True, "/run/x.sock", 12.0)
    assert not load_config(["--config", str(path), "--no-watchdog"], environ={}).watchdog_enabled
    assert not load_config(["--config", str(path)], environ={"KVMHA_AGENT_WATCHDOG_ENABLED": "false"}).watchdog_enabled
    for bad in ('enabled = "maybe"', 'socket = "relative.sock"', "timeout_s = -1", "unknown = 1"):
        path.write_text(f'[agent]\nhost_uuid = "{HOST}"\n{plaintext}[watchdog]\n{bad}\n')
        with pytest.raises(ConfigError):
            load_config(["--config", str(path)], environ={})
