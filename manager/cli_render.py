"""How the operator CLI shows admin messages: rich tables for people, JSON for scripts.

Everything here is a pure function of a protobuf message and the current time, so the CLI commands stay short and
the formats are easy to test. The console reads no rich markup: a VM named ``[red]x`` or an event message quoting
``[Errno 111]`` is shown as it is, styles come only from ``Text`` objects built here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvmha.proto.v1 import admin_pb2 as pb

GREEN, YELLOW, RED, DIM = "green", "yellow", "red", "dim"
PIPE_WIDTH = 250
# On a narrow terminal times and free text wrap (at spaces); names, ids and states are read (and grepped) whole.
WRAPPING_COLUMNS = {"Last ping", "Next try", "Created", "Time", "Reason", "Message", "Description"}

# Operators scan for trouble first: anything that may end in fencing or lost VMs is yellow or red.
STATUS_STYLE: dict[str, str] = {
    # host status
    "Up": GREEN,
    "Connecting": "cyan",
    "Disconnected": YELLOW,
    "Investigating": YELLOW,
    "Alert": YELLOW,
    "Fencing": YELLOW,
    "Fenced": RED,
    "Down": RED,
    "Removed": DIM,
    # host resource state
    "Maintenance": "cyan",
    "PrepareForMaintenance": "cyan",
    "ErrorInMaintenance": RED,
    "Disabled": DIM,
    # VM state and power state
    "Running": GREEN,
    "Starting": YELLOW,
    "Stopping": YELLOW,
    "Migrating": YELLOW,
    "Error": RED,
    "Unmanaged": DIM,
    "PowerOn": GREEN,
    "PowerReportMissing": YELLOW,
    "PowerUnknown": YELLOW,
    # HA work step
    "Scheduled": YELLOW,
    "Restarting": YELLOW,
    "Done": GREEN,
    "Cancelled": DIM,
    # event severity
    "warning": YELLOW,
    "alert": RED,
}


def styled(value: str) -> Text:
    return Text(value, style=STATUS_STYLE.get(value, ""))


def console() -> Console:
    # Built per use, not at import: tests and pipes swap sys.stdout, and rich decides on colour from the stream.
    # Piped into grep or less, a table folded at rich's default 80 columns would split values across lines.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    # No markup, emoji codes or highlighting: names and messages come from the manager and are shown as they are.
    return Console(markup=False, emoji=False, highlight=False, width=PIPE_WIDTH if wide else None)


# --- time -------------------------------------------------------------------------------------------------------


def age(at: float, now: float) -> str:
    """'12 s ago' / 'in 3 min': coarse on purpose, an operator wants the order of magnitude at a glance."""
    delta = now - at
    magnitude = abs(delta)
    for limit, unit, size in ((120, "s", 1), (120 * 60, "min", 60), (48 * 3600, "h", 3600)):
        if magnitude < limit:
            amount = f"{int(magnitude // size)} {unit}"
            break
    else:
        amount = f"{int(magnitude // 86400)} d"
    return f"{amount} ago" if delta >= 0 else f"in {amount}"


def when(at: float, now: float | None = None) -> Text:
    """Local time and age; the proto uses 0 for 'never'."""
    if at <= 0:
        return Text("never", style=DIM)
    now = time.time() if now is None else now
    local = datetime.fromtimestamp(at)
    same_day = local.date() == datetime.fromtimestamp(now).date()
    clock = local.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S")
    return Text(f"{clock} ({age(at, now)})")


# --- JSON -------------------------------------------------------------------------------------------------------


def to_dict(message: Message) -> dict[str, Any]:
    """Proto field names as keys, every field present, ids as JSON numbers (they stay far below 2**53)."""
    data = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )
    return _in_field_order(message, data)


def _in_field_order(message: Message, data: dict[str, Any]) -> dict[str, Any]:
    # MessageToDict puts the fields that are set first; the .proto's order makes the output the same every time.
    ordered: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.name not in data:
            continue  # an unset sub-message
        value = data[field.name]
        if field.message_type is not None and field.is_repeated:
            value = [_in_field_order(m, d) for m, d in zip(getattr(message, field.name), value, strict=True)]
        elif field.message_type is not None:
            value = _in_field_order(getattr(message, field.name), value)
        ordered[field.name] = value
    return ordered


def print_json(message: Message, *, compact: bool = False) -> None:
    # Plain write, not rich: scripts get exactly the JSON, no colour codes and no wrapping at the terminal width.
    text = json.dumps(to_dict(message), separators=(",", ":")) if compact else json.dumps(to_dict(message), indent=2)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# --- tables -----------------------------------------------------------------------------------------------------


def _table(*columns: str) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in columns:
        table.add_column(column, overflow="fold", no_wrap=column not in WRAPPING_COLUMNS)
    return table


def _yes(flag: bool) -> Text:
    return Text("yes", style=GREEN) if flag else Text("no", style=DIM)


def _or_dash(value: str) -> str:
    return value or "-"


def _print_rows(title: str, rows: Iterable[tuple[str, str | Text]]) -> None:
    table = Table(box=None, show_header=False, title=title, title_justify="left", pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console().print(table)


def print_hosts(hosts: Iterable[pb.HostInfo], now: float | None = None) -> None:
    # CPUs and memory are left to `host show` and --json, so that the list fits a terminal.
    # Watchdog "no" and Leases "none": a silence of that host proves nothing / its VMs' disks cannot be probed.
    table = _table("ID", "Name", "Address", "Status", "Resource", "Agent", "Last ping", "VMs", "BMC", "Watchdog",
                   "Leases")
    for h in hosts:
        table.add_row(
            str(h.id), h.name, h.address, styled(h.status), styled(h.resource_state), _yes(h.connected),
            when(h.last_ping_at, now), str(h.vms_running), _yes(h.has_bmc), watchdog_text(h, short=True),
            _leases_text(h),
        )  # fmt: skip
    console().print(table)


def watchdog_text(h: pb.HostInfo, *, short: bool) -> Text:
    """Armed with its bound, or why not: a host without an armed watchdog is never declared dead by silence."""
    if h.watchdog_armed:
        return Text(f"{h.watchdog_timeout_s:g} s" if short else f"armed, resets within {h.watchdog_timeout_s:g} s")
    if short:
        return Text("no", style=YELLOW)
    return Text(f"not armed ({h.watchdog_detail or 'never reported'}): silence never proves it dead", style=YELLOW)


def _leases_text(h: pb.HostInfo) -> Text:
    return Text(h.lease_manager) if h.lease_manager else Text("none", style=YELLOW)


def print_host(h: pb.HostInfo, now: float | None = None) -> None:
    _print_rows(
        f"Host {h.name}",
        [
            ("ID", str(h.id)), ("UUID", h.uuid), ("Address", h.address), ("Status", styled(h.status)),
            ("Resource state", styled(h.resource_state)), ("Role", h.role), ("Agent connected", _yes(h.connected)),
            ("Agent version", _or_dash(h.agent_version)), ("Last ping", when(h.last_ping_at, now)),
            ("CPUs", str(h.cpus)), ("Memory MiB", str(h.memory_mib)), ("VMs running", str(h.vms_running)),
            ("BMC", h.bmc_address if h.has_bmc else "none"), ("Watchdog", watchdog_text(h, short=False)),
            ("Disk leases", _leases_text(h)), ("Manager", _or_dash(h.manager_id)),
        ],
    )  # fmt: skip


def print_vms(vms: Iterable[pb.VmInfo]) -> None:
    table = _table("ID", "Name", "State", "Power", "Host", "HA", "Priority", "Group", "Mem MiB", "vCPUs")
    for v in vms:
        table.add_row(
            str(v.id), v.name, styled(v.state), styled(v.power_state), _or_dash(v.host), _yes(v.ha_enabled),
            str(v.restart_priority), _or_dash(v.anti_affinity_group), str(v.memory_mib), str(v.vcpus),
        )  # fmt: skip
    console().print(table)


def print_vm(v: pb.VmInfo, now: float | None = None) -> None:
    _print_rows(
        f"VM {v.name}",
        [
            ("ID", str(v.id)), ("UUID", v.uuid), ("State", styled(v.state)), ("Power state", styled(v.power_state)),
            ("Power state updated", when(v.power_state_updated_at, now)), ("Host", _or_dash(v.host)),
            ("Last host", _or_dash(v.last_host)), ("HA", _yes(v.ha_enabled)),
            ("Restart priority", str(v.restart_priority)), ("Anti-affinity group", _or_dash(v.anti_affinity_group)),
            ("Memory MiB", str(v.memory_mib)), ("vCPUs", str(v.vcpus)), ("Update count", str(v.update_count)),
            ("Why here", _or_dash(v.reason)),
        ],
    )  # fmt: skip


def print_work(items: Iterable[pb.HaWorkInfo], now: float | None = None) -> None:
    table = _table("ID", "VM", "Type", "Step", "Host", "Tried", "Next try", "Reason", "Created", "Taken by")
    for w in items:
        table.add_row(
            str(w.id), w.vm, w.type, styled(w.step), _or_dash(w.host), str(w.tried), when(w.time_to_try_at, now),
            w.reason, when(w.created_at, now), _or_dash(w.taken_by),
        )  # fmt: skip
    console().print(table)


def print_events(events: Iterable[pb.EventInfo], now: float | None = None) -> None:
    table = _table("ID", "Time", "Severity", "Subject", "Kind", "Message")
    for e in events:
        table.add_row(str(e.id), when(e.at, now), styled(e.severity), e.subject, e.kind, e.message)
    console().print(table)


def event_line(e: pb.EventInfo) -> Text:
    """One line per event for `events --follow`, where a table cannot grow."""
    stamp = datetime.fromtimestamp(e.at).strftime("%Y-%m-%d %H:%M:%S")
    line = Text(f"{e.id:>6}  {stamp}  ")
    line.append(f"{e.severity:<7}", style=STATUS_STYLE.get(e.severity, ""))
    line.append(f"  {e.subject:<10}  {e.kind:<16}  {e.message}")
    return line


def print_config(items: Iterable[pb.ConfigItem]) -> None:
    table = _table("Name", "Value", "Default", "Scope", "Description")
    for c in items:
        # A changed value is bold so an operator sees at once what differs from the shipped defaults.
        value = Text(c.value, style="bold" if c.value != c.default_value else "")
        table.add_row(c.name, value, c.default_value, c.scope, c.description)
    console().print(table)


def print_managers(reply: pb.ListManagersResponse, now: float | None = None) -> None:
    now = time.time() if now is None else now
    table = _table("Manager", "Address", "Version", "Lease", "Hosts", "Heartbeat", "Started")
    for m in reply.managers:
        lease = Text("holder", style="bold green") if m.holds_lease else Text("standby", style=DIM)
        name = Text(m.id + (" *" if m.answering else ""))
        table.add_row(name, m.address, m.version, lease, str(m.hosts_owned), when(m.last_heartbeat_at, now),
                      when(m.started_at, now))
    console().print(table)
    if reply.lease_holder:
        left_s = reply.lease_expires_in_s
        state = f"expires in {left_s:.1f} s" if left_s >= 0 else f"EXPIRED {-left_s:.1f} s ago (holder dead or cut off)"
        print_line(f"Lease over the hosts: {reply.lease_holder}, epoch {reply.lease_epoch}, ", Text(state),
                   Text("  (* answered this call)", style=DIM))
    else:
        print_line(Text("Nobody has held the lease yet.", style=DIM))


def print_line(*parts: str | Text) -> None:
    console().print(Text.assemble(*parts))


def print_plan(reply: pb.PlanFailureResponse) -> None:
    """`kvmha plan`: per VM of the failed hosts, in restart order, its target or why none, and when."""
    console().print(Text(f"If {', '.join(reply.failed) or 'nothing'} lost power now:", style="bold"))
    table = _table("Order", "VM", "From", "HA", "Target", "ETA", "Why not")
    for v in reply.vms:
        eta = f"~{v.eta_s:.0f} s" if v.HasField("eta_s") else "-"
        table.add_row(str(v.order) if v.order else "-", v.vm, v.from_host, "yes" if v.ha else "no",
                      v.target or Text("no capacity" if v.ha else "not restarted", style="red" if v.ha else DIM),
                      eta, v.reason or "")
    console().print(table)


def print_capacity(reply: pb.PlanFailureResponse) -> None:
    """`kvmha capacity`: the reserve, the headroom per host, what would not fit after the worst failure."""
    table = _table("Host", "Free memory", "Reserve", "Free vCPUs", "Inventory")
    for h in reply.hosts:
        table.add_row(h.host, f"{h.free_memory_mib} MiB", f"{h.reserve_mib} MiB", str(h.free_vcpus),
                      "reported" if h.inventory_reported else Text("not reported", style=DIM))
    console().print(table)
    stranded = [v.vm for v in reply.vms if v.ha and not v.target]
    n = reply.admission_host_failures
    worst = ", ".join(reply.failed) or "-"
    if stranded:
        console().print(Text(f"After the worst {max(n, 1)} host failure(s) ({worst}) these HA VMs would not be "
                             f"restarted: {', '.join(stranded)}", style="red"))
    else:
        console().print(Text(f"Every HA VM would be restarted after the worst {max(n, 1)} host failure(s) ({worst})."
                             + ("" if n else " Admission control is off (admission.host.failures = 0).")))
