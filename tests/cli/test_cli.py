"""The `kvmha` CLI in process (typer's CliRunner) against the fake AdminService: what it sends, what it prints."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import grpc
import pytest

from kvmha.manager import cli
from kvmha.proto.v1 import admin_pb2 as pb
from tests.cli.fake_admin import FakeAdmin
from tests.cli.support import as_json, fields, kvmha, ok, refused

DOMAIN_XML = "<domain type='kvm'><name>web9</name><memory unit='MiB'>512</memory><vcpu>1</vcpu></domain>"


# --- hosts ---


def test_host_list_follows_the_page_tokens(fake: FakeAdmin, manager: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "PAGE_SIZE", 2)
    out = ok(kvmha(manager, "host", "list"))
    # Four hosts: two full pages, then an empty last one.
    assert fake.sent("ListHosts") == [pb.ListHostsRequest(page_size=2, page_token=t) for t in ("", "2", "4")]
    for name in ("h1", "h2", "h3", "h4"):
        assert name in out


def test_host_list_shows_every_host_with_status(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "host", "list"))
    assert fake.sent("ListHosts") == [pb.ListHostsRequest(page_size=500)]
    for name, status in [("h1", "Up"), ("h2", "Down"), ("h3", "Fencing")]:
        assert name in out and status in out
    assert "s ago" in out  # h1 pinged 2 s ago
    assert "never" in out  # h3 never pinged


def test_host_list_json_has_the_proto_fields(manager: str) -> None:
    hosts = as_json(kvmha(manager, "host", "list", "--json"))["hosts"]
    assert [h["name"] for h in hosts] == ["h1", "h2", "h3", "h4"]
    assert all(set(h) == fields(pb.HostInfo) for h in hosts)
    assert hosts[0]["id"] == 1 and hosts[0]["memory_mib"] == 65536  # numbers, not ProtoJSON's quoted int64
    assert hosts[1]["bmc_address"] == "10.0.1.2:623" and hosts[2]["last_ping_at"] == 0


def test_host_list_shows_which_hosts_run_without_watchdog_or_leases(manager: str) -> None:
    lines = {line.split()[1]: line for line in ok(kvmha(manager, "host", "list")).splitlines() if " h" in line}
    assert "20 s" in lines["h1"] and "lockd" in lines["h1"]
    assert lines["h3"].split()[-2:] == ["no", "none"]


def test_host_show_says_why_the_watchdog_is_not_armed(manager: str) -> None:
    out = ok(kvmha(manager, "host", "show", "h3"))
    assert "kvmha-watchdog unreachable" in " ".join(out.split()) and "silence never proves it dead" in out


def test_host_confirm_down_sends_who_confirms(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "host", "confirm-down", "h4", "--by", "alice"))
    assert fake.sent("ConfirmHostDown") == [pb.ConfirmHostDownRequest(host="h4", confirmed_by="alice")]
    assert "h4" in out and "confirmed down" in out


def test_host_confirm_down_defaults_to_the_login_name(fake: FakeAdmin, manager: str) -> None:
    ok(kvmha(manager, "host", "confirm-down", "h4"))
    (sent,) = fake.sent("ConfirmHostDown")
    assert isinstance(sent, pb.ConfirmHostDownRequest) and sent.confirmed_by != ""


def test_host_confirm_down_of_an_up_host_is_refused(manager: str) -> None:
    refused(kvmha(manager, "host", "confirm-down", "h1"), 4, "host h1 is Up")


@pytest.mark.parametrize("ref", ["h2", "2", "11111111-aaaa-4000-8000-000000000002"])
def test_host_show_by_name_id_or_uuid(fake: FakeAdmin, manager: str, ref: str) -> None:
    out = ok(kvmha(manager, "host", "show", ref))
    assert fake.sent("GetHost") == [pb.Ref(ref=ref)]
    assert "Host h2" in out and "Down" in out and "10.0.1.2:623" in out


def test_host_show_json(manager: str) -> None:
    host = as_json(kvmha(manager, "host", "show", "h1", "--json"))
    assert set(host) == fields(pb.HostInfo)
    assert (host["name"], host["status"], host["connected"], host["agent_version"]) == ("h1", "Up", True, "0.1.0")


def test_unknown_host_exits_3_with_the_managers_message(manager: str) -> None:
    refused(kvmha(manager, "host", "show", "nope"), 3, "no host 'nope'")


@pytest.mark.parametrize(("state", "on", "shown"), [("on", True, "PrepareForMaintenance"), ("off", False, "Enabled")])
def test_host_maintenance(fake: FakeAdmin, manager: str, state: str, on: bool, shown: str) -> None:
    out = ok(kvmha(manager, "host", "maintenance", "h1", state))
    assert fake.sent("SetMaintenance") == [pb.SetMaintenanceRequest(host="h1", on=on)]
    assert "Host h1 (id 1)" in out and shown in out


def test_host_maintenance_json(manager: str) -> None:
    assert as_json(kvmha(manager, "host", "maintenance", "h3", "on", "--json"))["resource_state"] == (
        "PrepareForMaintenance"
    )


# --- BMC: the password goes to the manager and nowhere else ---


def test_host_bmc_reads_the_password_from_stdin_and_never_prints_it(fake: FakeAdmin, manager: str) -> None:
    args = ["host", "bmc", "h1", "--address", "10.0.1.1", "--port", "6230", "--user", "admin", "--password-stdin"]
    result = kvmha(manager, *args, input="s3cret-pw\n")
    out = ok(result)
    assert fake.sent("SetHostBmc") == [
        pb.SetHostBmcRequest(host="h1", address="10.0.1.1", port=6230, user="admin", password="s3cret-pw")
    ]
    assert "BMC 10.0.1.1:6230" in out
    assert "s3cret" not in result.output


def test_host_bmc_prompts_for_the_password_without_echo(
    fake: FakeAdmin, manager: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "stdin_is_terminal", lambda: True)  # CliRunner's stdin is no terminal
    result = kvmha(manager, "host", "bmc", "h1", "--address", "10.0.1.1", "--user", "admin", input="s3cret-pw\n")
    ok(result)
    assert "BMC password" in result.output
    assert "s3cret" not in result.output
    sent = fake.sent("SetHostBmc")
    assert len(sent) == 1 and isinstance(sent[0], pb.SetHostBmcRequest)
    assert (sent[0].password, sent[0].port) == ("s3cret-pw", 623)


def test_host_bmc_json_has_no_password_field(manager: str) -> None:
    args = ["host", "bmc", "h1", "--address", "10.0.1.1", "--user", "admin", "--password-stdin", "--json"]
    result = kvmha(manager, *args, input="s3cret-pw")
    host = as_json(result)
    assert host["has_bmc"] is True and "password" not in host and "s3cret" not in result.output


def test_host_bmc_clear(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "host", "bmc", "h2", "--clear"))
    assert fake.sent("SetHostBmc") == [pb.SetHostBmcRequest(host="h2", clear=True)]
    assert "no BMC" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clear", "--address", "10.0.1.1"], "host bmc: --clear takes no --address, --user or --password-stdin"),
        (["--address", "10.0.1.1"], "host bmc: --address and --user are required (or --clear)"),
        (["--address", "10.0.1.1", "--user", "admin", "--password-stdin"], "host bmc: empty BMC password"),
        (
            ["--address", "10.0.1.1", "--user", "admin"],
            "host bmc: no terminal to prompt for the password on; pipe it in with --password-stdin",
        ),
    ],
)
def test_host_bmc_bad_options_are_refused_locally(fake: FakeAdmin, manager: str, args: list[str], message: str) -> None:
    refused(kvmha(manager, "host", "bmc", "h1", *args, input=""), 4, message)
    assert fake.sent("SetHostBmc") == []


# --- VMs ---


def test_vm_list(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "vm", "list"))
    assert fake.sent("ListVms") == [pb.ListVmsRequest(page_size=500)]
    for text in ["web1", "Running", "PowerOn", "db1", "Stopped", "stray", "Unmanaged"]:
        assert text in out


def test_vm_list_on_a_host_json(fake: FakeAdmin, manager: str) -> None:
    vms = as_json(kvmha(manager, "vm", "list", "--host", "h1", "--json"))["vms"]
    assert fake.sent("ListVms") == [pb.ListVmsRequest(host="h1", page_size=500)]
    assert [v["name"] for v in vms] == ["web1", "stray"]
    assert all(set(v) == fields(pb.VmInfo) for v in vms)


def test_vm_list_empty(manager: str) -> None:
    assert "No VMs." in ok(kvmha(manager, "vm", "list", "--host", "h3"))
    assert as_json(kvmha(manager, "vm", "list", "--host", "h3", "--json")) == {"vms": [], "next_page_token": ""}


def test_vm_show(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "vm", "show", "7"))
    assert fake.sent("GetVm") == [pb.Ref(ref="7")]
    assert "VM web1" in out and "Running" in out and "h1" in out and "web" in out
    vm = as_json(kvmha(manager, "vm", "show", "web1", "--json"))
    assert set(vm) == fields(pb.VmInfo)
    assert (vm["id"], vm["ha_enabled"], vm["restart_priority"], vm["anti_affinity_group"]) == (7, True, 10, "web")


def test_unknown_vm_exits_3(manager: str) -> None:
    refused(kvmha(manager, "vm", "start", "ghost"), 3, "no VM 'ghost'")


def test_vm_create_sends_the_xml_and_every_option(fake: FakeAdmin, manager: str, tmp_path: Path) -> None:
    xml = tmp_path / "web9.xml"
    xml.write_text(DOMAIN_XML)
    args = ["--ha", "--priority", "5", "--group", "web", "--start", "--host", "h2", "--name", "web9b"]
    out = ok(kvmha(manager, "vm", "create", "--xml", str(xml), *args))
    assert fake.sent("CreateVm") == [
        pb.CreateVmRequest(
            domain_xml=DOMAIN_XML, ha_enabled=True, restart_priority=5, anti_affinity_group="web", start=True,
            host="h2", name="web9b",
        )
    ]  # fmt: skip
    assert "Registered VM web9b (id 10): Starting on h2" in out


def test_vm_create_from_stdin_defaults_to_no_ha_and_no_start(fake: FakeAdmin, manager: str) -> None:
    vm = as_json(kvmha(manager, "vm", "create", "--xml", "-", "--json", input=DOMAIN_XML))
    assert fake.sent("CreateVm") == [pb.CreateVmRequest(domain_xml=DOMAIN_XML)]
    assert (vm["name"], vm["state"], vm["ha_enabled"]) == ("web9", "Stopped", False)


def test_vm_create_bad_xml_exits_4_with_the_managers_message(manager: str, tmp_path: Path) -> None:
    xml = tmp_path / "bad.xml"
    xml.write_text("<network/>")
    refused(kvmha(manager, "vm", "create", "--xml", str(xml)), 4, "domain XML: the root element is not <domain>")


def test_vm_create_missing_file_is_refused_before_calling(fake: FakeAdmin, manager: str, tmp_path: Path) -> None:
    result = kvmha(manager, "vm", "create", "--xml", str(tmp_path / "none.xml"))
    assert result.exit_code == 4 and result.stderr.startswith("kvmha: cannot read the domain XML ")
    assert fake.requests == []


def test_vm_start_and_stop(fake: FakeAdmin, manager: str) -> None:
    assert "Start requested. VM db1 (id 8): Starting on h1" in ok(kvmha(manager, "vm", "start", "db1"))
    assert "Stop requested. VM web1 (id 7): Stopping on h1" in ok(kvmha(manager, "vm", "stop", "web1"))
    assert fake.sent("StartVm") == [pb.Ref(ref="db1")]
    assert fake.sent("StopVm") == [pb.Ref(ref="web1")]


def test_vm_delete(fake: FakeAdmin, manager: str) -> None:
    assert "Deleted VM db1 (id 8)." in ok(kvmha(manager, "vm", "delete", "db1"))
    assert fake.sent("DeleteVm") == [pb.Ref(ref="db1")]
    refused(kvmha(manager, "vm", "delete", "web1"), 4, "VM web1 is Running; stop it first")


def test_vm_delete_json(fake: FakeAdmin, manager: str) -> None:
    assert as_json(kvmha(manager, "vm", "delete", "8", "--json")) == {"id": 8}


@pytest.mark.parametrize(("state", "enabled"), [("on", True), ("off", False)])
def test_vm_ha(fake: FakeAdmin, manager: str, state: str, enabled: bool) -> None:
    out = ok(kvmha(manager, "vm", "ha", "db1", state))
    assert fake.sent("SetVmHa") == [pb.SetVmHaRequest(vm="db1", enabled=enabled)]
    assert f"HA {state}: VM db1 (id 8)" in out


def test_on_off_is_checked_by_the_parser(fake: FakeAdmin, manager: str) -> None:
    result = kvmha(manager, "vm", "ha", "db1", "maybe")
    assert result.exit_code == 2 and fake.requests == []


# --- HA work, events, configuration ---


def test_ha_list(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "ha", "list"))
    assert fake.sent("ListHaWork") == [pb.ListHaWorkRequest(active_only=False)]
    assert "web2" in out and "Fencing" in out and "host h3 stopped pinging" in out and "in " in out
    assert "Done" in out


def test_ha_list_active_json(fake: FakeAdmin, manager: str) -> None:
    items = as_json(kvmha(manager, "ha", "list", "--active", "--json"))["items"]
    assert fake.sent("ListHaWork") == [pb.ListHaWorkRequest(active_only=True)]
    assert [w["id"] for w in items] == [12] and set(items[0]) == fields(pb.HaWorkInfo)


def test_events(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "events"))
    assert fake.sent("ListEvents") == [pb.ListEventsRequest()]
    assert "HostDown" in out and "h2 is Down" in out and "alert" in out


def test_events_filters_json(fake: FakeAdmin, manager: str) -> None:
    events = as_json(kvmha(manager, "events", "--after", "1", "--limit", "5", "--subject", "host:2", "--json"))
    assert fake.sent("ListEvents") == [pb.ListEventsRequest(after_id=1, limit=5, subject="host:2")]
    assert [e["kind"] for e in events["events"]] == ["HostDown"]
    assert set(events["events"][0]) == fields(pb.EventInfo)


def test_events_follow_prints_the_backlog_then_new_events(fake: FakeAdmin, manager: str) -> None:
    def later() -> None:
        # The CLI runs in this process; once the new event went out, end the stream so the command returns.
        fake.add_event("HostUp", "h2 is back", subject="host:2")
        fake.close_streams()

    timer = threading.Timer(0.3, later)
    timer.start()
    try:
        result = kvmha(manager, "events", "--follow", "--json", "--after", "1")
    finally:
        timer.cancel()
    assert fake.sent("FollowEvents") == [pb.ListEventsRequest(after_id=1)]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["id"] for e in lines] == [2, 3, 4] and lines[-1]["message"] == "h2 is back"


def test_events_follow_human(fake: FakeAdmin, manager: str) -> None:
    fake.close_streams()  # the backlog only
    result = kvmha(manager, "events", "-f", "--subject", "vm:7")
    assert result.stdout.count("\n") == 1 and "HaScheduled" in result.stdout and "web1 HA" in result.stdout


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (None, "the manager at {} ended the stream (restarting?)"),
        (grpc.StatusCode.CANCELLED, "the manager at {} ended the stream (restarting?)"),
        (grpc.StatusCode.UNAVAILABLE, "cannot reach the manager at {}: manager shutting down (set the address with "
         "--manager or KVMHA_MANAGER)"),
    ],
)  # fmt: skip
def test_events_follow_ended_by_the_manager_is_not_success(
    fake: FakeAdmin, manager: str, status: grpc.StatusCode | None, message: str
) -> None:
    fake.close_streams(status)
    result = kvmha(manager, "events", "--follow", "--json")
    assert len(result.stdout.splitlines()) == 3  # the backlog still came
    assert result.exit_code == 2
    assert result.stderr == f"kvmha: {message.format(manager)}\n"


def test_config_list(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "config", "list"))
    assert fake.sent("ListConfig") == [pb.ListConfigRequest()]
    assert "ping.timeout_s" in out and "host behind after" in out
    items = as_json(kvmha(manager, "config", "list", "--json"))["items"]
    assert items[1] == {
        "name": "ping.timeout_s", "value": "10", "default_value": "6", "description": "host behind after",
        "scope": "global",
    }  # fmt: skip


def test_config_set(fake: FakeAdmin, manager: str) -> None:
    assert "ping.interval_s = 3 (default 2)" in ok(kvmha(manager, "config", "set", "ping.interval_s", "3"))
    assert fake.sent("SetConfig") == [pb.SetConfigRequest(name="ping.interval_s", value="3")]
    assert as_json(kvmha(manager, "config", "set", "ping.interval_s", "4", "--json"))["value"] == "4"


def test_config_set_bad_value_and_unknown_name(manager: str) -> None:
    refused(kvmha(manager, "config", "set", "ping.interval_s", "fast"), 4, "ping.interval_s: 'fast' is not an integer")
    refused(kvmha(manager, "config", "set", "nope", "1"), 3, "no configuration item 'nope'")


# --- colours: for people only ---


def test_status_colours_on_a_terminal_and_none_in_json(manager: str) -> None:
    out = ok(kvmha(manager, "host", "list", env={"FORCE_COLOR": "1", "TERM": "xterm-256color"}))
    assert "\x1b[32mUp" in out  # green
    assert "\x1b[31mDown" in out  # red
    assert "\x1b[33mFencing" in out  # yellow
    assert "\x1b[" not in ok(kvmha(manager, "host", "list", "--json", env={"FORCE_COLOR": "1"}))


# --- capacity (issue 16) ---


def test_plan_lists_each_vm_in_restart_order_with_its_target_or_why_not(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "plan", "--fail", "h3, h4"))
    assert fake.sent("PlanFailure") == [pb.PlanFailureRequest(fail=["h3", "h4"])]
    assert "If h3, h4 lost power now" in out and "web" in out and "~2 s" in out
    assert "no capacity" in out and "not enough free memory: h2" in out and "not restarted" in out


def test_plan_json_and_a_missing_host_list(fake: FakeAdmin, manager: str) -> None:
    vms = as_json(kvmha(manager, "plan", "--fail", "h3", "--json"))["vms"]
    assert [v["vm"] for v in vms] == ["web", "db", "scratch"] and vms[0]["target"] == "h2"
    result = kvmha(manager, "plan", "--fail", " ,")
    assert result.exit_code == 4 and fake.sent("PlanFailure") == [pb.PlanFailureRequest(fail=["h3"])]


def test_capacity_shows_headroom_and_what_would_not_fit(fake: FakeAdmin, manager: str) -> None:
    out = ok(kvmha(manager, "capacity"))
    assert fake.sent("PlanFailure") == [pb.PlanFailureRequest()]
    assert "3072 MiB" in out and "1024 MiB" in out and "would not be restarted: db" in out
