"""Explicit host enrolment on a real manager with automatic registration off (the product default): a host is let
in only after `kvmha host add NAME --uuid UUID`, and refused again after `kvmha host remove`."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
KVMHA = str(Path(sys.executable).with_name("kvmha"))


@pytest.fixture
def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCluster]:
    monkeypatch.setenv("KVMHA_MANAGER_AUTO_REGISTER_HOSTS", "false")  # the default; the harness's toml says true
    running = LocalCluster(tmp_path, f"sqlite:///{tmp_path / 'kvmha.sqlite'}",
                           core_config={"ping.interval": "1", "ping.timeout": "3.5"})
    try:
        running.start_manager()
        yield running
    finally:
        running.close()


def kvmha(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVMHA_")}, **cluster.cli_env()}
    return subprocess.run([KVMHA, *args], capture_output=True, text=True, env=env, timeout=30)


def test_add_then_connect_then_remove(cluster: LocalCluster) -> None:
    h1 = cluster.host_uuids.setdefault("h1", str(uuid_module.uuid4()))
    added = kvmha(cluster, "host", "add", "h1", "--uuid", h1.upper(), "--address", "127.0.0.1")
    assert added.returncode == 0 and "Host h1" in added.stdout, added
    again = kvmha(cluster, "host", "add", "other", "--uuid", h1)
    assert again.returncode == 4 and "already registered" in again.stderr, again
    cluster.start_agent("h1")
    cluster.start_agent("stranger")  # a certificate of our CA, but never enrolled
    cluster.wait_hosts_up(["h1"], 30)
    stranger = wait_for(lambda: "REJECT_UNKNOWN_HOST" in (log := cluster.agents["stranger"].log()) and log, 20,
                        "the stranger refused")
    assert "not registered" in stranger and "kvmha host add" in stranger
    assert sorted(cluster.hosts()) == ["h1"]

    cluster.agents["h1"].stop()
    wait_for(lambda: not cluster.hosts()["h1"].connected, 20, "h1's stream gone")
    removed = kvmha(cluster, "host", "remove", "h1")
    assert removed.returncode == 0 and "Host h1" in removed.stdout, removed
    assert cluster.hosts()["h1"].status == "Removed"
    cluster.start_agent("h1")
    log = wait_for(lambda: (text := cluster.agents["h1"].log()).count("REJECT_UNKNOWN_HOST") >= 1 and text, 20,
                   "the removed host refused")
    assert "was removed" in log
    assert cluster.hosts()["h1"].status == "Removed" and not cluster.hosts()["h1"].connected


def test_enrolment_needs_the_admin_role(cluster: LocalCluster) -> None:
    from kvmha.manager.security.roles import Role

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVMHA_")}, **cluster.cli_env(Role.OPERATOR)}
    done = subprocess.run([KVMHA, "host", "add", "h9", "--uuid", str(uuid_module.uuid4())], capture_output=True,
                          text=True, env=env, timeout=30)
    assert done.returncode == 4 and "AddHost needs the admin role" in done.stderr, done
    assert cluster.hosts() == {}


def test_the_managers_state_is_its_own(cluster: LocalCluster, tmp_path: Path) -> None:
    """UMask 0077 in the manager itself: its database file and its secrets key are 0600 wherever it runs."""
    import stat

    for path in (tmp_path / "kvmha.sqlite", cluster.workdir / "secrets.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
