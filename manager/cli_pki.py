"""`kvmha pki ...`: the product's small PKI (kvmha.manager.security.pki), local files only, no manager needed.

    kvmha pki init                                   a CA in --dir (default /etc/kvmha/pki)
    kvmha pki manager NAME --address A [...]         a manager's certificate (its addresses as SANs)
    kvmha pki host NAME --uuid UUID [--address A]    a host's certificate (its uuid bound as a URI SAN)
    kvmha pki operator NAME --role reader|operator|admin
    kvmha pki show FILE                              what a certificate proves
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvmha.manager.cli_client import Exit, fail
from kvmha.manager.security import pki
from kvmha.manager.security.roles import Role

DEFAULT_PKI_DIR = Path("/etc/kvmha/pki")

pki_app = typer.Typer(help="Certificates for mutual TLS: a CA, managers, hosts, operators.", no_args_is_help=True)
Dir = Annotated[Path, typer.Option("--dir", envvar="KVMHA_PKI_DIR", help="The PKI directory (0700).")]
Days = Annotated[int, typer.Option("--days", min=1, help="Validity in days.")]
Addresses = Annotated[list[str] | None, typer.Option("--address", help="IP or DNS name (repeat for several).")]


def _done(path: Path) -> None:
    key = path.with_suffix(".key")
    typer.echo(f"wrote {path} and {key} (0600)")


@pki_app.command("init")
def init(directory: Dir = DEFAULT_PKI_DIR, days: Days = pki.CA_DAYS,
         force: Annotated[bool, typer.Option("--force", help="Replace an existing CA.")] = False) -> None:
    """Create the CA (ca.crt, ca.key). Keep ca.key offline once the certificates are issued."""
    try:
        _done(pki.init_ca(directory, days=days, force=force))
    except (pki.PkiError, OSError) as error:
        fail(f"pki init: {error}", Exit.REFUSED)


@pki_app.command("manager")
def manager(name: str, address: Addresses = None, directory: Dir = DEFAULT_PKI_DIR,
            days: Days = pki.LEAF_DAYS) -> None:
    """A manager's certificate: every address agents and operators dial it at (one per manager)."""
    _issue(directory, "manager", name, addresses=address or [], days=days)


@pki_app.command("host")
def host(name: str, uuid: Annotated[str, typer.Option("--uuid", help="The host's uuid (its agent's host_uuid).")],
         address: Addresses = None, directory: Dir = DEFAULT_PKI_DIR, days: Days = pki.LEAF_DAYS) -> None:
    """A host's certificate: its agent may speak only for this uuid."""
    _issue(directory, "host", name, addresses=address or [], host_uuid=uuid, days=days)


@pki_app.command("operator")
def operator(name: str, role: Annotated[Role, typer.Option("--role", help="reader, operator or admin.")],
             directory: Dir = DEFAULT_PKI_DIR, days: Days = pki.LEAF_DAYS) -> None:
    """An operator's certificate for the CLI (--cert/--key or KVMHA_TLS_CERT/KVMHA_TLS_KEY)."""
    _issue(directory, "operator", name, addresses=[], role=role, days=days)


@pki_app.command("show")
def show(cert: Annotated[Path, typer.Argument(metavar="FILE", help="A PEM certificate.")]) -> None:
    """Print a certificate's subject, validity, SANs and the identity it proves."""
    try:
        rows = pki.describe(cert)
    except (OSError, ValueError) as error:
        fail(f"pki show: cannot read {cert}: {error}", Exit.REFUSED)
    for key, value in rows:
        typer.echo(f"{key:11} {value}")


def _issue(directory: Path, kind: str, name: str, *, addresses: list[str], host_uuid: str = "",
           role: Role | None = None, days: int) -> None:
    try:
        _done(pki.issue(directory, kind, name, addresses=addresses, host_uuid=host_uuid, role=role, days=days))
    except (pki.PkiError, OSError) as error:
        fail(f"pki {kind}: {error}", Exit.REFUSED)
