"""The installed `kvmha` console script against a real `kvmha-manager` with two real agents (h1, h2) on 127.0.0.1.

Each command is a subprocess (`kvmha --manager 127.0.0.1:<admin port> ...`), as an operator or a script runs it:
its exit code, its stdout (`--json` parsed) and its stderr are what is checked, and where a command changes state
the change is read back through another command. The manager runs on SQLite with one setting in manager.toml's
[config] table (flap.holdout), which wins over `kvmha config set`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from kvmha.lab.bmc import find_free_port
from kvmha.lab.domain import domain_xml
from kvmha.lab.harness import BIN
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

KVMHA = str(BIN / "kvmha")
ENV = {k: v for k, v in os.environ.items() if k not in ("KVMHA_MANAGER", "KVMHA_TLS_CA", "COLUMNS", "FORCE_COLOR")}
PASSWORD = "bmc-s3cret-Pa55"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("cli")
    running = LocalCluster(tmp, f"sqlite:///{tmp / 'kvmha.sqlite'}", core_config={"flap.holdout": "600"})
    try:
        running.start_manager()
        for name in ("h1", "h2"):
            running.start_agent(name)
        wait_for(lambda: (h := running.hosts()) and all(n in h and h[n].status == "Up" for n in ("h1", "h2")),
                 30, "h1 and h2 Up")
        yield running
    finally:
        running.close()


def kvmha(cluster: LocalCluster, *args: str, input: str = "", manager: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([KVMHA, "--manager", manager or cluster.admin_address, *args], input=input,
                          capture_output=True, text=True, env={**ENV, **cluster.cli_env()}, timeout=30)


def ok(cluster: LocalCluster, *args: str, input: str = "") -> Any:
    """Run a `--json` command that must succeed and return its parsed output."""
    done = kvmha(cluster, *args, "--json", input=input)
    assert done.returncode == 0 and done.stderr == "", (args, done)
    return json.loads(done.stdout)


def test_host_list(cluster: LocalCluster) -> None:
    hosts = {h["name"]: h for h in ok(cluster, "host", "list")["hosts"]}
    assert sorted(hosts) == ["h1", "h2"]
    for name, host in hosts.items():
        assert host["status"] == "Up" and host["connected"] is True and host["resource_state"] == "Enabled", host
        assert host["uuid"] == cluster.host_uuids[name] and host["cpus"] == 8 and host["memory_mib"] == 4096, host
        assert host["has_bmc"] is False and host["last_ping_at"] > 0, host
    # A human table on a pipe: the names, no colour codes.
    done = kvmha(cluster, "host", "list")
    assert done.returncode == 0 and "h1" in done.stdout and "h2" in done.stdout and "\x1b[" not in done.stdout, done


def test_vm_life_cycle(cluster: LocalCluster, tmp_path: Path) -> None:
    xml = tmp_path / "web.xml"
    xml.write_text(domain_xml("web", domain_type="test", memory_mib=64))
    created = ok(cluster, "vm", "create", "--xml", str(xml), "--ha", "--start")
    assert created["name"] == "web" and created["ha_enabled"] is True and created["memory_mib"] == 64, created

    def running() -> dict[str, Any] | None:
        vms = {v["name"]: v for v in ok(cluster, "vm", "list")["vms"]}
        vm = vms.get("web")
        return vm if vm and vm["state"] == "Running" and vm["power_state"] == "PowerOn" else None

    vm = wait_for(running, 30, "web Running (vm list --json)", interval_s=0.5)
    assert vm["host"] in ("h1", "h2") and vm["uuid"] == created["uuid"], vm
    assert ok(cluster, "host", "show", vm["host"])["vms_running"] == 1
    assert ok(cluster, "vm", "list", "--host", vm["host"])["vms"][0]["name"] == "web"
    # A running VM is not deleted.
    done = kvmha(cluster, "vm", "delete", "web")
    assert done.returncode == 4 and "stop it before deleting it" in done.stderr and done.stdout == "", done

    assert ok(cluster, "vm", "ha", "web", "off")["ha_enabled"] is False
    assert ok(cluster, "vm", "show", "web")["ha_enabled"] is False
    stopping = ok(cluster, "vm", "stop", "web")
    assert stopping["state"] in ("Stopping", "Stopped"), stopping
    stopped = wait_for(lambda: (v := ok(cluster, "vm", "show", "web"))["state"] == "Stopped" and v, 30,
                       "web Stopped (vm show --json)", interval_s=0.5)
    assert stopped["power_state"] == "PowerOff", stopped

    assert ok(cluster, "vm", "delete", "web")["id"] == created["id"]
    done = kvmha(cluster, "vm", "show", "web")
    assert (done.returncode, done.stdout) == (3, "") and "no VM 'web'" in done.stderr, done
    assert ok(cluster, "vm", "list")["vms"] == []


def test_config(cluster: LocalCluster) -> None:
    items = {i["name"]: i for i in ok(cluster, "config", "list")["items"]}
    assert items["ping.interval"]["value"] == "2.0" and items["ping.interval"]["default_value"] == "2.0", items
    assert "ping" in items["ping.interval"]["description"]
    # The manager.toml value is the one in effect, and the listing says where it comes from.
    assert (items["flap.holdout"]["value"], items["flap.holdout"]["scope"]) == ("600", "manager.toml"), items

    done = kvmha(cluster, "config", "set", "ping.interval", "0")
    assert done.returncode == 4 and done.stdout == "", done
    assert done.stderr == "kvmha: ping.interval: '0' must be a finite number greater than 0\n", done
    done = kvmha(cluster, "config", "set", "ping.interval", "8")  # longer than ping.timeout (7 s)
    assert done.returncode == 4 and "must be longer than ping.interval" in done.stderr, done
    done = kvmha(cluster, "config", "set", "no.such.setting", "1")
    assert done.returncode == 3 and "no setting named 'no.such.setting'" in done.stderr, done
    done = kvmha(cluster, "config", "set", "flap.holdout", "60")
    assert done.returncode == 4 and "manager.toml" in done.stderr, done

    changed = ok(cluster, "config", "set", "ping.timeout", "9.5")
    assert (changed["name"], changed["value"], changed["default_value"]) == ("ping.timeout", "9.5", "7.0"), changed
    items = {i["name"]: i for i in ok(cluster, "config", "list")["items"]}
    assert items["ping.timeout"]["value"] == "9.5" and items["flap.holdout"]["value"] == "600", items
    events = ok(cluster, "events", "--subject", "manager")["events"]
    assert any(e["kind"] == "config.changed" and "ping.timeout = 9.5" in e["message"] for e in events), events
    assert not any("ping.interval" in e["message"] for e in events), events  # the refused values left no trace
    # Still pinging well within the new timeout.
    assert all(h["status"] == "Up" for h in ok(cluster, "host", "list")["hosts"])


def test_maintenance(cluster: LocalCluster) -> None:
    assert not ok(cluster, "vm", "list", "--host", "h1")["vms"]
    host = ok(cluster, "host", "maintenance", "h1", "on")
    assert host["name"] == "h1" and host["resource_state"] == "Maintenance", host
    assert ok(cluster, "host", "show", "h1")["resource_state"] == "Maintenance"
    assert ok(cluster, "host", "show", "h2")["resource_state"] == "Enabled"
    done = kvmha(cluster, "host", "maintenance", "h9", "on")
    assert done.returncode == 3 and "no host 'h9'" in done.stderr, done
    done = kvmha(cluster, "host", "maintenance", "h1", "maybe")
    assert done.returncode == 2 and "maybe" in done.stderr, done  # a usage error, told by typer
    assert ok(cluster, "host", "maintenance", "h1", "off")["resource_state"] == "Enabled"


def test_bmc_password_never_shown(cluster: LocalCluster) -> None:
    port = find_free_port()
    args = ["host", "bmc", "h1", "--address", "127.0.0.1", "--port", str(port), "--user", "u", "--password-stdin"]
    done = kvmha(cluster, *args, "--json", input=PASSWORD + "\n")
    assert done.returncode == 0 and done.stderr == "", done
    assert json.loads(done.stdout)["has_bmc"] is True and json.loads(done.stdout)["bmc_address"] == f"127.0.0.1:{port}"
    outputs = [done.stdout, done.stderr]
    for command in (["host", "show", "h1", "--json"], ["host", "show", "h1"], ["host", "list", "--json"],
                    ["host", "list"], ["events", "--json"], ["events"]):
        shown = kvmha(cluster, *command)
        assert shown.returncode == 0, shown
        outputs += [shown.stdout, shown.stderr]
    host = json.loads(kvmha(cluster, "host", "show", "h1", "--json").stdout)
    assert host["has_bmc"] is True and host["bmc_address"] == f"127.0.0.1:{port}", host
    assert not [o for o in outputs if PASSWORD in o], "the BMC password was printed"
    assert cluster.manager is not None and PASSWORD not in cluster.manager.log_path.read_text(errors="replace")
    # At rest it is sealed with the manager's key (a copy of the database holds no password).
    engine = create_engine(cluster.database)
    with engine.connect() as connection:
        stored = connection.execute(text("SELECT bmc_password FROM host WHERE name = 'h1'")).scalar_one()
    engine.dispose()
    assert stored.startswith("fernet:") and PASSWORD not in stored
    # Without --password-stdin and without a terminal: refused before anything is sent.
    done = kvmha(cluster, "host", "bmc", "h2", "--address", "127.0.0.1", "--user", "u")
    assert done.returncode == 4 and "--password-stdin" in done.stderr, done
    assert ok(cluster, "host", "show", "h2")["has_bmc"] is False


def test_events_and_ha_list(cluster: LocalCluster) -> None:
    events = ok(cluster, "events")["events"]
    kinds = {e["kind"] for e in events}
    assert "host.registered" in kinds and "host.status" in kinds, kinds
    assert all(e["id"] > 0 and e["at"] > 0 and e["severity"] in ("info", "warning", "alert") for e in events)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    later = ok(cluster, "events", "--after", str(events[0]["id"]))["events"]
    assert [e["id"] for e in later] == [e["id"] for e in events[1:]][: len(later)]
    h1 = ok(cluster, "host", "show", "h1")
    mine = ok(cluster, "events", "--subject", f"host:{h1['id']}")["events"]
    assert mine and all(e["subject"] == f"host:{h1['id']}" for e in mine), mine
    work = ok(cluster, "ha", "list")
    assert work == {"items": []}, work  # nothing failed here: no HA work
    assert ok(cluster, "ha", "list", "--active") == {"items": []}


def test_unreachable_manager(cluster: LocalCluster) -> None:
    closed = f"127.0.0.1:{find_free_port()}"
    for args in (["host", "list", "--json"], ["vm", "stop", "web"], ["config", "set", "ping.timeout", "8"]):
        done = kvmha(cluster, *args, manager=closed)
        assert done.returncode == 2 and done.stdout == "", done
        assert done.stderr.startswith(f"kvmha: cannot reach the manager at {closed}: "), done
        assert done.stderr.count("\n") == 1 and "--manager" in done.stderr and "Traceback" not in done.stderr, done
    # The real manager was not touched by those.
    items = {i["name"]: i["value"] for i in ok(cluster, "config", "list")["items"]}
    assert items["ping.timeout"] != "8"


def test_host_list_shows_the_self_fence_guarantee_and_leases(cluster: LocalCluster) -> None:
    """These agents run without kvmha-watchdog: the manager knows (from their Hello and pings) and says so."""
    hosts = {h["name"]: h for h in ok(cluster, "host", "list")["hosts"]}
    for host in hosts.values():
        assert host["watchdog_armed"] is False and host["watchdog_detail"], host
    done = kvmha(cluster, "host", "show", "h1")
    assert done.returncode == 0 and "silence never proves it dead" in " ".join(done.stdout.split()), done


def test_confirm_down_is_refused_for_a_host_that_is_up(cluster: LocalCluster) -> None:
    done = kvmha(cluster, "host", "confirm-down", "h2", "--by", "alice")
    assert done.returncode == 4 and "host h2 is Up" in done.stderr, done
    assert ok(cluster, "host", "show", "h2")["status"] == "Up"
    done = kvmha(cluster, "host", "confirm-down", "h9")
    assert done.returncode == 3 and "no host 'h9'" in done.stderr, done


def test_capacity_plan_and_admission_control(cluster: LocalCluster, tmp_path: Path) -> None:
    """Issue 16 against real agents (which report their inventory): the planner names where an HA VM would go, and a
    second big HA VM that would leave the first without a place after a host failure is refused with exit code 4,
    at its start and when HA is switched on while it runs."""
    rooms = {h["host"]: h for h in ok(cluster, "capacity")["hosts"]}
    assert sorted(rooms) == ["h1", "h2"] and all(r["inventory_reported"] for r in rooms.values()), rooms
    for name in ("big1", "big2"):
        (tmp_path / f"{name}.xml").write_text(domain_xml(name, domain_type="test", memory_mib=2500))
        ok(cluster, "vm", "create", "--xml", str(tmp_path / f"{name}.xml"), "--ha")
    try:
        ok(cluster, "vm", "start", "big1")
        big1 = wait_for(lambda: (v := ok(cluster, "vm", "show", "big1"))["state"] == "Running" and v, 30,
                        "big1 Running", interval_s=0.5)
        other = "h2" if big1["host"] == "h1" else "h1"
        plan = ok(cluster, "plan", "--fail", big1["host"])
        assert plan["failed"] == [big1["host"]] and plan["vms"][0]["vm"] == "big1", plan
        assert plan["vms"][0]["target"] == other and plan["vms"][0]["order"] == 1, plan
        refused = kvmha(cluster, "vm", "start", "big2")
        assert refused.returncode == 4 and "admission control" in refused.stderr, refused
        assert ok(cluster, "vm", "show", "big2")["state"] == "Stopped"
        # HA off, big2 starts (no reserve to keep for it); switching its HA on while it runs is refused the same way.
        ok(cluster, "vm", "ha", "big2", "off")
        ok(cluster, "vm", "start", "big2")
        wait_for(lambda: ok(cluster, "vm", "show", "big2")["state"] == "Running", 30, "big2 Running", interval_s=0.5)
        refused = kvmha(cluster, "vm", "ha", "big2", "on")
        assert refused.returncode == 4 and "admission control" in refused.stderr, refused
        assert ok(cluster, "vm", "show", "big2")["ha_enabled"] is False
        unknown = kvmha(cluster, "plan", "--fail", "nosuchhost")
        assert unknown.returncode == 3, unknown
    finally:
        for name in ("big1", "big2"):
            kvmha(cluster, "vm", "stop", name)
        wait_for(lambda: all(ok(cluster, "vm", "show", n)["state"] == "Stopped" for n in ("big1", "big2")), 30,
                 "both Stopped", interval_s=0.5)
        for name in ("big1", "big2"):
            ok(cluster, "vm", "delete", name)
