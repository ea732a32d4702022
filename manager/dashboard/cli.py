"""`kvmha dashboard ...`: issue, list and revoke dashboard tokens. Run by an admin on the manager host: the token
book is a file there (mode 0600), so whoever can write it is an admin by construction. The manager re-reads the
book when it changes; no restart, no call to the manager."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from kvmha.manager.dashboard.auth import Role, TokenBook, TokenError
from kvmha.manager.settings import DEFAULT_DASHBOARD_TOKENS

dashboard_app = typer.Typer(help="The web dashboard's tokens (run on the manager host).", no_args_is_help=True)

Tokens = Annotated[Path, typer.Option("--tokens", envvar="KVMHA_DASHBOARD_TOKENS", metavar="FILE",
                                      help="The token book ([dashboard] tokens in manager.toml).")]


@dashboard_app.command("token")
def token(
    role: Annotated[Role, typer.Option("--role", help="What the token may see and do.")] = Role.READER,
    name: Annotated[str, typer.Option("--name", help="Who or what the token is for (shown in the dashboard).")] = "",
    tokens: Tokens = Path(DEFAULT_DASHBOARD_TOKENS),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Issue a token; its secret is printed once and stored only hashed."""
    try:
        entry, secret = TokenBook(tokens).issue(role, name)
    except (OSError, TokenError) as error:
        typer.echo(f"kvmha: cannot write {tokens}: {error}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"id": entry.id, "name": entry.name, "role": entry.role.value, "token": secret}))
    else:
        typer.echo(f"token {entry.id} ({entry.role.value}, {entry.name}): {secret}")
        typer.echo("Shown once. Browsers: open https://MANAGER:PORT/?token=<token> once (it becomes a cookie); "
                   "scripts: 'Authorization: Bearer <token>'.")


@dashboard_app.command("tokens")
def list_tokens(tokens: Tokens = Path(DEFAULT_DASHBOARD_TOKENS)) -> None:
    """List the issued tokens (ids, names, roles; never secrets)."""
    try:
        entries = TokenBook(tokens).entries()
    except TokenError as error:
        typer.echo(f"kvmha: {error}", err=True)
        raise typer.Exit(1) from None
    for entry in entries:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry.created_at))
        typer.echo(f"{entry.id}  {entry.role.value:8}  {created}  {entry.name}")


@dashboard_app.command("revoke")
def revoke(token_id: Annotated[str, typer.Argument(metavar="ID")], tokens: Tokens = Path(DEFAULT_DASHBOARD_TOKENS)
           ) -> None:
    """Revoke a token by its id (the manager refuses it from its next request on)."""
    try:
        found = TokenBook(tokens).revoke(token_id)
    except (OSError, TokenError) as error:
        typer.echo(f"kvmha: {error}", err=True)
        raise typer.Exit(1) from None
    if not found:
        typer.echo(f"kvmha: no token {token_id}", err=True)
        raise typer.Exit(4)
    typer.echo(f"token {token_id} revoked")
