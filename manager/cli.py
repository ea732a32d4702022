"""`kvmha`: the operator CLI, a thin client of the manager's AdminService (proto/kvmha/v1/admin.proto).

Every command opens one channel, makes one call with a deadline (``--timeout``, 5 s by default) and prints the
answer: rich tables for people, ``--json`` for scripts (the proto field names as keys). The manager decides
everything; the CLI only validates what it must read locally (files, the BMC password).

Exit codes and the gRPC client are in cli_client.py, the tables and JSON in cli_render.py.
"""

from __future__ import annotations

import enum
import getpass
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from google.protobuf.message import Message
from rich.text import Text

from kvmha.manager import cli_render as render
from kvmha.manager.cli_client import DEFAULT_ADMIN_PORT, Exit, Link, TlsFiles, connect, fail
from kvmha.manager.cli_migrate import migrate
from kvmha.manager.cli_pki import pki_app
from kvmha.manager.dashboard.cli import dashboard_app
from kvmha.proto.v1 import admin_pb2 as pb

DEFAULT_MANAGER = f"127.0.0.1:{DEFAULT_ADMIN_PORT}"
DEFAULT_TIMEOUT_S = 5.0
PAGE_SIZE = 500  # hosts or VMs per ListHosts/ListVms call; the CLI follows the page tokens
DEFAULT_BMC_PORT = 623  # IPMI over LAN

M = TypeVar("M", bound=Message)


@dataclass
class Session:
    """The global options, and the link opened on first use (``--help`` never connects)."""

    manager: str
    timeout_s: float
    tls: TlsFiles = field(default_factory=lambda: TlsFiles(None, None, None))
    _link: Link | None = field(default=None, repr=False)

    def link(self, ctx: typer.Context) -> Link:
        if self._link is None:
            self._link = connect(self.manager, self.timeout_s, self.tls)
            ctx.call_on_close(self._link.close)
        return self._link


def _link(ctx: typer.Context) -> Link:
    session = ctx.find_object(Session)
    assert session is not None, "the main callback stores the Session"
    return session.link(ctx)


# --- command line -----------------------------------------------------------------------------------------------

# show_locals is off: a traceback of `host bmc` would otherwise print the BMC password held in a local.
app = typer.Typer(
    name="kvmha",
    help="Operate a kvmha cluster: hosts, VMs, HA work, events and configuration, through the manager.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
host_app = typer.Typer(help="Hypervisor hosts.", no_args_is_help=True)
vm_app = typer.Typer(help="Virtual machines registered with the manager.", no_args_is_help=True)
ha_app = typer.Typer(help="HA work items (restarts in progress and done).", no_args_is_help=True)
config_app = typer.Typer(help="Manager configuration.", no_args_is_help=True)
manager_app = typer.Typer(help="The managers sharing the database and the lease over the hosts.",
                          no_args_is_help=True)
app.add_typer(host_app, name="host")
app.add_typer(vm_app, name="vm")
app.add_typer(ha_app, name="ha")
app.add_typer(config_app, name="config")
app.add_typer(manager_app, name="manager")
app.add_typer(pki_app, name="pki")
app.add_typer(dashboard_app, name="dashboard")


class Switch(enum.StrEnum):
    ON = "on"
    OFF = "off"


Json = Annotated[bool, typer.Option("--json", help="Print JSON (proto field names as keys) instead of a table.")]
HostRef = Annotated[str, typer.Argument(metavar="HOST", help="Host id, uuid or name.")]
VmRef = Annotated[str, typer.Argument(metavar="VM", help="VM id, uuid or name.")]


@app.callback()
def _options(
    ctx: typer.Context,
    manager: Annotated[
        str,
        typer.Option(
            "--manager", envvar="KVMHA_MANAGER", metavar="ADDR",
            help="The manager's admin address (HOST[:PORT]); for several managers on one database, a comma-separated "
                 "list: a call goes to the next one only if the previous was unreachable or a standby refusing a "
                 "change."
        ),
    ] = DEFAULT_MANAGER,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, metavar="SECONDS", help="Deadline of each call.")
    ] = DEFAULT_TIMEOUT_S,
    tls_ca: Annotated[
        Path | None,
        typer.Option(
            "--tls-ca", envvar="KVMHA_TLS_CA", metavar="FILE", help="CA certificate of the manager's TLS (PEM)."
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--cert", envvar="KVMHA_TLS_CERT", metavar="FILE", help="Your operator certificate (PEM)."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--key", envvar="KVMHA_TLS_KEY", metavar="FILE", help="Its private key (PEM).")
    ] = None,
    env_file: Annotated[
        Path | None,
        typer.Option("--env-file", envvar="KVMHA_ENV_FILE", metavar="FILE",
                     help="KEY=VALUE lines (KVMHA_MANAGER, KVMHA_TLS_*) for the options not given otherwise; "
                          "the lab writes one (<state dir>/cli.env)."),
    ] = None,
) -> None:
    if env_file is not None:
        values = _read_env_file(env_file)
        manager = manager if manager != DEFAULT_MANAGER else values.get("KVMHA_MANAGER", manager)
        tls_ca, tls_cert, tls_key = (
            given or (Path(values[key]) if values.get(key) else None)
            for given, key in ((tls_ca, "KVMHA_TLS_CA"), (tls_cert, "KVMHA_TLS_CERT"), (tls_key, "KVMHA_TLS_KEY")))
    ctx.obj = Session(manager=manager, timeout_s=timeout, tls=TlsFiles(tls_ca, tls_cert, tls_key))


def _read_env_file(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        fail(f"cannot read the env file {path}: {err}", Exit.REFUSED)
    values = {}
    for line in lines:
        key, sep, value = line.strip().removeprefix("export ").partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip().strip("'\"")
    return values


def _vm_line(vm: pb.VmInfo, as_json: bool, verb: str = "") -> None:
    if as_json:
        render.print_json(vm)
        return
    where = f" on {vm.host}" if vm.host else ""
    render.print_line(f"{verb}VM {vm.name} (id {vm.id}): ", render.styled(vm.state), where)


def _host_line(host: pb.HostInfo, as_json: bool, extra: str = "") -> None:
    if as_json:
        render.print_json(host)
        return
    render.print_line(
        f"Host {host.name} (id {host.id}): ", render.styled(host.status), ", ", render.styled(host.resource_state),
        extra,
    )  # fmt: skip


def _show(reply: M, as_json: bool, human: Callable[[M], None]) -> None:
    if as_json:
        render.print_json(reply)
    else:
        human(reply)


def _show_list(
    reply: Message, items: Sequence[M], what: str, as_json: bool, human: Callable[[Sequence[M]], None]
) -> None:
    if as_json:
        render.print_json(reply)  # the whole response message, so that fields added to it later reach scripts
    elif items:
        human(items)
    else:
        render.print_line(Text(f"No {what}.", style=render.DIM))


# --- host -------------------------------------------------------------------------------------------------------


@host_app.command("list")
def host_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List hosts with their status, agent link and last ping."""
    link = _link(ctx)
    reply = link.call(link.stub.ListHosts, pb.ListHostsRequest(page_size=PAGE_SIZE))
    while reply.next_page_token:  # pages keep each call short on the manager, however many hosts there are
        page = link.call(link.stub.ListHosts, pb.ListHostsRequest(page_size=PAGE_SIZE,
                                                                  page_token=reply.next_page_token))
        reply.hosts.extend(page.hosts)
        reply.next_page_token = page.next_page_token
    _show_list(reply, reply.hosts, "hosts", as_json, render.print_hosts)


@host_app.command("show")
def host_show(ctx: typer.Context, host: HostRef, as_json: Json = False) -> None:
    """Show one host."""
    link = _link(ctx)
    reply = link.call(link.stub.GetHost, pb.Ref(ref=host))
    _show(reply, as_json, render.print_host)


@host_app.command("add")
def host_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The host's name.")],
    uuid: Annotated[str, typer.Option("--uuid", help="Its agent's host_uuid (the one its certificate binds).")],
    address: Annotated[str, typer.Option(metavar="ADDR", help="Its management address.")] = "",
    as_json: Json = False,
) -> None:
    """Enrol a host: its agent (with a certificate for this uuid) is then welcomed."""
    link = _link(ctx)
    _host_line(link.call(link.stub.AddHost, pb.AddHostRequest(name=name, uuid=uuid, address=address)), as_json)


@host_app.command("maintenance")
def host_maintenance(ctx: typer.Context, host: HostRef, state: Switch, as_json: Json = False) -> None:
    """Put a host in maintenance (on) or give it back to the cluster (off)."""
    request = pb.SetMaintenanceRequest(host=host, on=state is Switch.ON)
    link = _link(ctx)
    _host_line(link.call(link.stub.SetMaintenance, request), as_json)


@host_app.command("disable")
def host_disable(ctx: typer.Context, host: HostRef, as_json: Json = False) -> None:
    """No new VMs on this host; its running HA VMs stay protected (config ha.disabled.hosts)."""
    link = _link(ctx)
    _host_line(link.call(link.stub.SetHostEnabled, pb.SetHostEnabledRequest(host=host, enabled=False)), as_json)


@host_app.command("enable")
def host_enable(ctx: typer.Context, host: HostRef, as_json: Json = False) -> None:
    """Place VMs on this host again."""
    link = _link(ctx)
    _host_line(link.call(link.stub.SetHostEnabled, pb.SetHostEnabledRequest(host=host, enabled=True)), as_json)


@host_app.command("remove")
def host_remove(ctx: typer.Context, host: HostRef, as_json: Json = False) -> None:
    """Remove a host (admin); refused while VMs run on it: `host maintenance HOST on` moves them off first."""
    link = _link(ctx)
    _host_line(link.call(link.stub.RemoveHost, pb.Ref(ref=host)), as_json)


@host_app.command("confirm-down")
def host_confirm_down(
    ctx: typer.Context,
    host: HostRef,
    by: Annotated[str, typer.Option(metavar="NAME", help="Who confirms (default: your login name).")] = "",
    as_json: Json = False,
) -> None:
    """State that a silent host is powered off (admin). Its HA VMs may then be restarted elsewhere: use it only when
    you know the host is off and it cannot be fenced (no working BMC, no armed watchdog). Signs of life still win."""
    request = pb.ConfirmHostDownRequest(host=host, confirmed_by=by or _login_name())
    link = _link(ctx)
    _host_line(link.call(link.stub.ConfirmHostDown, request), as_json, ": confirmed down, investigating")


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid
        return ""


@host_app.command("bmc")
def host_bmc(
    ctx: typer.Context,
    host: HostRef,
    address: Annotated[str, typer.Option(metavar="ADDR", help="BMC address (IPMI over LAN).")] = "",
    port: Annotated[int, typer.Option(min=1, max=65535, help="BMC port.")] = DEFAULT_BMC_PORT,
    user: Annotated[str, typer.Option(metavar="USER", help="BMC user.")] = "",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin instead of prompting.")
    ] = False,
    clear: Annotated[bool, typer.Option("--clear", help="Remove the host's BMC (no fencing through it).")] = False,
    as_json: Json = False,
) -> None:
    """Set (or --clear) the BMC the manager uses to fence a host. The password is never shown."""
    if clear:
        if address or user or password_stdin:
            fail("host bmc: --clear takes no --address, --user or --password-stdin", Exit.REFUSED)
        request = pb.SetHostBmcRequest(host=host, clear=True)
    else:
        if not address or not user:
            fail("host bmc: --address and --user are required (or --clear)", Exit.REFUSED)
        request = pb.SetHostBmcRequest(
            host=host, address=address, port=port, user=user, password=_password(password_stdin)
        )
    link = _link(ctx)
    reply = link.call(link.stub.SetHostBmc, request)
    _host_line(reply, as_json, f", BMC {reply.bmc_address}" if reply.has_bmc else ", no BMC")


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _password(from_stdin: bool) -> str:
    # Never an option: a password on the command line lands in the process list and the shell history.
    if from_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif stdin_is_terminal():
        password = typer.prompt("BMC password", hide_input=True, default="", show_default=False)
    else:
        # Without a terminal the "hidden" prompt cannot hide anything and only warns: ask for the explicit form.
        fail("host bmc: no terminal to prompt for the password on; pipe it in with --password-stdin", Exit.REFUSED)
    if not password:
        fail("host bmc: empty BMC password", Exit.REFUSED)
    return password


# --- vm ---------------------------------------------------------------------------------------------------------


@vm_app.command("list")
def vm_list(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Only VMs on this host (id, uuid or name).")] = "",
    as_json: Json = False,
) -> None:
    """List VMs, managed and unmanaged."""
    link = _link(ctx)
    reply = link.call(link.stub.ListVms, pb.ListVmsRequest(host=host, page_size=PAGE_SIZE))
    while reply.next_page_token:
        page = link.call(link.stub.ListVms, pb.ListVmsRequest(host=host, page_size=PAGE_SIZE,
                                                              page_token=reply.next_page_token))
        reply.vms.extend(page.vms)
        reply.next_page_token = page.next_page_token
    _show_list(reply, reply.vms, "VMs", as_json, render.print_vms)


@vm_app.command("show")
def vm_show(ctx: typer.Context, vm: VmRef, as_json: Json = False) -> None:
    """Show one VM."""
    link = _link(ctx)
    reply = link.call(link.stub.GetVm, pb.Ref(ref=vm))
    _show(reply, as_json, render.print_vm)


@vm_app.command("create")
def vm_create(
    ctx: typer.Context,
    xml: Annotated[
        Path, typer.Option("--xml", metavar="FILE", allow_dash=True, help="libvirt domain XML ('-' for stdin).")
    ],
    ha: Annotated[bool, typer.Option("--ha/--no-ha", help="Restart it elsewhere when its host fails.")] = False,
    priority: Annotated[int, typer.Option(help="Restart priority; higher restarts first.")] = 0,
    group: Annotated[str, typer.Option(help="Anti-affinity group: its members avoid sharing a host.")] = "",
    start: Annotated[bool, typer.Option("--start", help="Start it at once.")] = False,
    host: Annotated[str, typer.Option(help="Host to start it on (default: placement decides).")] = "",
    name: Annotated[str, typer.Option(help="Name to register (default: the XML's <name>).")] = "",
    as_json: Json = False,
) -> None:
    """Register a VM from its domain XML (and optionally start it)."""
    request = pb.CreateVmRequest(
        domain_xml=_read_xml(xml), ha_enabled=ha, restart_priority=priority, anti_affinity_group=group,
        start=start, host=host, name=name,
    )  # fmt: skip
    link = _link(ctx)
    _vm_line(link.call(link.stub.CreateVm, request), as_json, "Registered ")


def _read_xml(path: Path) -> str:
    try:
        return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        fail(f"cannot read the domain XML {path}: {err}", Exit.REFUSED)


@vm_app.command("start")
def vm_start(ctx: typer.Context, vm: VmRef, as_json: Json = False) -> None:
    """Start a VM (placement picks the host); the manager answers before it runs (watch `events -f`)."""
    link = _link(ctx)
    _vm_line(link.call(link.stub.StartVm, pb.Ref(ref=vm)), as_json, "Start requested. ")


@vm_app.command("stop")
def vm_stop(ctx: typer.Context, vm: VmRef, as_json: Json = False) -> None:
    """Stop a VM; HA will not restart it."""
    link = _link(ctx)
    _vm_line(link.call(link.stub.StopVm, pb.Ref(ref=vm)), as_json, "Stop requested. ")


@vm_app.command("migrate")
def vm_migrate(
    ctx: typer.Context,
    vm: VmRef,
    to: Annotated[str, typer.Option("--to", metavar="HOST", help="Target host (default: placement picks).")] = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Follow the migration with a progress bar.")] = True,
    cancel: Annotated[bool, typer.Option("--cancel", help="Abort its migration in progress instead.")] = False,
    as_json: Json = False,
) -> None:
    """Live-migrate a running VM to another host, with a progress bar until it runs there (or stays put)."""
    if cancel:
        link = _link(ctx)
        _vm_line(link.call(link.stub.CancelMigration, pb.Ref(ref=vm)), as_json, "Cancel requested. ")
        return
    reply = migrate(_link(ctx), vm, to, follow=wait and not as_json)
    if reply is not None:
        _vm_line(reply, as_json, "Migration requested. ")


@vm_app.command("delete")
def vm_delete(ctx: typer.Context, vm: VmRef, as_json: Json = False) -> None:
    """Forget a VM (the manager refuses while it runs)."""
    link = _link(ctx)
    reply = link.call(link.stub.DeleteVm, pb.Ref(ref=vm))
    _show(reply, as_json, lambda deleted: render.print_line(f"Deleted VM {vm} (id {deleted.id})."))


@vm_app.command("ha")
def vm_ha(ctx: typer.Context, vm: VmRef, state: Switch, as_json: Json = False) -> None:
    """Turn HA on or off for a VM."""
    link = _link(ctx)
    reply = link.call(link.stub.SetVmHa, pb.SetVmHaRequest(vm=vm, enabled=state is Switch.ON))
    _vm_line(reply, as_json, f"HA {'on' if reply.ha_enabled else 'off'}: ")


# --- ha, events, config -----------------------------------------------------------------------------------------


@ha_app.command("list")
def ha_list(
    ctx: typer.Context,
    active: Annotated[bool, typer.Option("--active", help="Only work still in progress.")] = False,
    as_json: Json = False,
) -> None:
    """List HA work items with their step and reason."""
    link = _link(ctx)
    reply = link.call(link.stub.ListHaWork, pb.ListHaWorkRequest(active_only=active))
    _show_list(reply, reply.items, "HA work", as_json, render.print_work)


@app.command("plan")
def plan(
    ctx: typer.Context,
    failing: Annotated[str, typer.Option("--fail", metavar="HOST[,HOST]", help="Hosts that lose power.")],
    as_json: Json = False,
) -> None:
    """What-if: what the manager would do if these hosts lost power now (its own placement, on a copy)."""
    link = _link(ctx)
    hosts = [name.strip() for name in failing.split(",") if name.strip()]
    if not hosts:
        fail("--fail needs at least one host", Exit.REFUSED)
    _show(link.call(link.stub.PlanFailure, pb.PlanFailureRequest(fail=hosts)), as_json, render.print_plan)


@app.command("capacity")
def capacity(ctx: typer.Context, as_json: Json = False) -> None:
    """Headroom per host, the reserve, and the HA VMs that would not fit after the worst admission.host.failures."""
    link = _link(ctx)
    _show(link.call(link.stub.PlanFailure, pb.PlanFailureRequest()), as_json, render.print_capacity)


@app.command("events")
def events(
    ctx: typer.Context,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new events until Ctrl-C.")] = False,
    after: Annotated[int, typer.Option("--after", min=0, metavar="ID", help="Only events after this id.")] = 0,
    limit: Annotated[int, typer.Option(min=0, help="At most this many (0: the manager's default).")] = 0,
    subject: Annotated[str, typer.Option(help="Only this subject, e.g. host:3, vm:7, work:12.")] = "",
    as_json: Json = False,
) -> None:
    """Show the event log (with --json --follow: one JSON object per line)."""
    request = pb.ListEventsRequest(after_id=after, limit=limit, subject=subject)
    link = _link(ctx)
    if follow:
        _follow(link, request, as_json)
        return
    reply = link.call(link.stub.ListEvents, request)
    _show_list(reply, reply.events, "events", as_json, render.print_events)


def _follow(link: Link, request: pb.ListEventsRequest, as_json: bool) -> None:
    try:
        for event in link.stream(link.stub.FollowEvents, request):
            if as_json:
                render.print_json(event, compact=True)
            else:
                render.console().print(render.event_line(event), soft_wrap=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how an operator stops following: a clean exit, not an error


@config_app.command("list")
def config_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List configuration items with their values and defaults."""
    link = _link(ctx)
    reply = link.call(link.stub.ListConfig, pb.ListConfigRequest())
    _show_list(reply, reply.items, "configuration items", as_json, render.print_config)


@config_app.command("set")
def config_set(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="As `config list` shows it, e.g. ping.timeout.")],
    value: Annotated[str, typer.Argument(metavar="VALUE")],
    as_json: Json = False,
) -> None:
    """Change a configuration item (the manager validates the value)."""
    link = _link(ctx)
    reply = link.call(link.stub.SetConfig, pb.SetConfigRequest(name=name, value=value))
    if as_json:
        render.print_json(reply)
    else:
        render.print_line(f"{reply.name} = ", Text(reply.value, style="bold"), f" (default {reply.default_value})")


@manager_app.command("list")
def manager_list(ctx: typer.Context, as_json: Json = False) -> None:
    """Managers, their heartbeats and hosts owned, and which one holds the lease over the hosts (any manager
    answers: it reads the database)."""
    link = _link(ctx)
    reply = link.call(link.stub.ListManagers, pb.ListManagersRequest())
    _show_list(reply, reply.managers, "managers", as_json, lambda rows: render.print_managers(reply))


def main() -> None:
    app(prog_name="kvmha")
