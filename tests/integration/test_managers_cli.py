"""The CLI against several real managers on one PostgreSQL database (issue 15, point 4): given every manager's
admin address, an operator's change refused by a standby (nothing applied) goes on to the lease holder and is
applied once; reads are answered by whichever manager comes first; given only a standby, the change is refused
with exit code 4, naming the holder."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmha.lab.harness import BIN, ManagerHarness
from kvmha.lab.testing.databases import DatabaseUnavailable, fresh_database
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.proto.v1 import admin_pb2 as apb

FAST = {"ping.interval": "1", "ping.timeout": "3.5", "startup.grace": "4", "heartbeat.stale.after": "2"}


@pytest.fixture
def managers(tmp_path: Path) -> Iterator[tuple[ManagerHarness, ManagerHarness]]:
    """m1 holds the lease over h1; m2 is a standby."""
    try:
        with fresh_database("postgresql", tmp_path) as url:
            cluster = LocalCluster(tmp_path, url, core_config=dict(FAST))
            try:
                standby = cluster.add_manager("m2")
                cluster.start_manager()
                cluster.start_agent("h1", settings={"reconnect_max_s": 1.0})
                wait_for(lambda: (h := cluster.hosts()) and "h1" in h and h["h1"].status == "Up", 60, "h1 Up")
                standby.start_manager()
                view = wait_for(lambda: (r := standby.admin().ListManagers(apb.ListManagersRequest(), timeout=5))
                                and len(r.managers) == 2 and r, 30, "both managers registered")
                assert view.lease_holder == "m1"
                yield cluster, standby
            finally:
                cluster.close()
    except DatabaseUnavailable as reason:
        pytest.skip(str(reason))


def _cli(holder: ManagerHarness, managers: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("KVMHA_")}, **holder.cli_env(),
           "KVMHA_MANAGER": managers}
    return subprocess.run([str(BIN / "kvmha"), *args], capture_output=True, text=True, timeout=60, check=False,
                          env=env)


def test_a_change_given_to_a_standby_reaches_the_holder(managers: tuple[ManagerHarness, ManagerHarness]) -> None:
    holder, standby = managers
    both = f"{standby.admin_address},{holder.admin_address}"
    listed = _cli(holder, both, "host", "list")
    assert listed.returncode == 0 and "h1" in listed.stdout, listed.stderr

    alone = _cli(holder, standby.admin_address, "host", "disable", "h1")
    assert alone.returncode == 4, (alone.stdout, alone.stderr)
    assert "held by m1" in alone.stderr
    assert holder.hosts()["h1"].resource_state == "Enabled"

    done = _cli(holder, both, "host", "disable", "h1")
    assert done.returncode == 0, done.stderr
    assert holder.hosts()["h1"].resource_state == "Disabled"
    disabled = [e for e in holder.events() if e.kind == "host.resource" and "Enabled -> Disabled" in e.message]
    assert len(disabled) == 1, [e.message for e in holder.events()]
