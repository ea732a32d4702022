"""`kvmha vm migrate`: ask for a live migration, then follow the VM's events with a progress bar until it settles.

The manager decides and reports everything; this only reads the VM's events (FollowEvents, subject vm:ID): the
migration's start (vm.migrating), its progress (vm.migration.progress, whose message starts with the share of memory
copied: "43% ..."), and its end: vm.migrated (exit 0), vm.migration.failed / vm.migration.lost / operator.migrate
(refused) (exit 4). Ctrl-C stops following; the migration goes on (the manager owns it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from kvmha.manager import cli_render as render
from kvmha.manager.cli_client import Exit, Link, fail
from kvmha.proto.v1 import admin_pb2 as pb

PROGRESS = "vm.migration.progress"
DONE = "vm.migrated"
FAILED = frozenset({"vm.migration.failed", "vm.migration.lost", "operator.migrate"})
_PERCENT = re.compile(r"^(\d{1,3})%")


def percent_of(message: str) -> int | None:
    match = _PERCENT.match(message)
    return min(int(match.group(1)), 100) if match else None


def follow_migration(events: Iterable[pb.EventInfo], vm_name: str, console: Console) -> tuple[Exit, str]:
    """Render the migration's events; returns the exit code and the final event's message."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TextColumn("{task.fields[detail]}"), TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"migrating {vm_name}", total=100, detail="waiting for the manager")
        for event in events:
            if event.kind == "vm.migrating":
                progress.update(task, detail=event.message)
            elif event.kind == PROGRESS:
                share = percent_of(event.message)
                progress.update(task, completed=share if share is not None else None, detail=event.message)
            elif event.kind == DONE:
                progress.update(task, completed=100, detail="done")
                return Exit.OK, event.message
            elif event.kind in FAILED:
                progress.update(task, detail="failed")
                return Exit.REFUSED, event.message
    return Exit.NO_ANSWER, "the event stream ended before the migration settled"


def migrate(link: Link, vm: str, to: str, *, follow: bool) -> pb.VmInfo | None:
    """Ask for the migration; without `follow` return the VM as the manager recorded it, else follow it to its end
    (exits non-zero when it failed) and return None."""
    record = link.call(link.stub.GetVm, pb.Ref(ref=vm))
    subject = f"vm:{record.id}"
    after = _last_event_id(link, subject)
    reply = link.call(link.stub.MigrateVm, pb.MigrateVmRequest(vm=vm, to_host=to))
    if not follow:
        return reply
    events = link.stream(link.stub.FollowEvents, pb.ListEventsRequest(after_id=after, subject=subject))
    try:
        code, message = follow_migration(events, record.name, render.console())
    except KeyboardInterrupt:
        render.print_line(f"Stopped following; the migration goes on (kvmha events -f --subject {subject}).")
        return None
    if code is not Exit.OK:
        fail(f"vm migrate: {message}", code)
    render.print_line(f"VM {record.name}: {message}")
    return None


def _last_event_id(link: Link, subject: str) -> int:
    """The newest event about `subject` so far: the migration's events are the ones after it."""
    after = 0
    for _ in range(1000):  # pages of the manager's largest page (10,000)
        page = link.call(link.stub.ListEvents, pb.ListEventsRequest(after_id=after, limit=10_000, subject=subject))
        if not page.events:
            break
        after = page.events[-1].id
    return after
