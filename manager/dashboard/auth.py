"""Dashboard credentials: bearer tokens issued by an admin, stored hashed, each with a role.

Invariants:
- A token's secret is shown once, when it is issued; the book keeps only its SHA-256. Tokens are 256 random bits, so
  a fast hash is enough (no password stretching needed) and a stolen book does not reveal a usable credential.
- Every route names the least role it needs (`ROUTE_ROLES` in server.py); an unknown or revoked token has no role.
- The book is a JSON file on the manager host (mode 0600), written atomically; the manager re-reads it when its
  modification time changes, so issuing or revoking takes effect without a restart.

Roles are the admin API's (kvmha.manager.security.roles): reader (views), operator (VM and host operations), admin
(configuration, credentials, safety overrides). The dashboard is read-only, so every route needs reader; the names
are shared so a later operator view needs no new vocabulary.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvmha.manager.security.roles import Role

__all__ = ["Principal", "Role", "TokenBook", "TokenEntry", "TokenError", "digest"]

TOKEN_PREFIX = "kvd_"


class TokenError(ValueError):
    """A token book that cannot be read or a request that cannot be honoured; the message says which."""


@dataclass(frozen=True, slots=True)
class TokenEntry:
    id: str  # public: shown in listings and logs, used to revoke
    name: str
    role: Role
    sha256: str
    created_at: float  # wall-clock seconds


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's id and name, and its role."""

    token_id: str
    name: str
    role: Role


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenBook:
    """The tokens file; safe to use from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: list[TokenEntry] = []
        self._mtime_ns: int | None = None

    # ------------------------------------------------------------------ checking (the server)

    def authenticate(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        wanted = digest(token)
        found = None
        for entry in self.entries():
            # Compare every entry in constant time; stop nowhere early, so timing says nothing about the book.
            if hmac.compare_digest(entry.sha256, wanted):
                found = entry
        return None if found is None else Principal(found.id, found.name, found.role)

    def entries(self) -> list[TokenEntry]:
        with self._lock:
            try:
                mtime_ns = self.path.stat().st_mtime_ns
            except FileNotFoundError:
                self._entries, self._mtime_ns = [], None
                return []
            if mtime_ns != self._mtime_ns:
                self._entries, self._mtime_ns = _read(self.path), mtime_ns
            return list(self._entries)

    # ------------------------------------------------------------------ issuing (the admin's CLI, on the manager host)

    def issue(self, role: Role, name: str, now: float | None = None) -> tuple[TokenEntry, str]:
        """A new token: its entry (stored) and its secret (shown once, never stored)."""
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = TokenEntry(id=secrets.token_hex(4), name=name or role.value, role=role, sha256=digest(secret),
                           created_at=time.time() if now is None else now)
        self._write([*self.entries(), entry])
        return entry, secret

    def revoke(self, token_id: str) -> bool:
        entries = self.entries()
        kept = [e for e in entries if e.id != token_id]
        if len(kept) == len(entries):
            return False
        self._write(kept)
        return True

    def _write(self, entries: list[TokenEntry]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        text = json.dumps({"tokens": [asdict(e) for e in entries]}, indent=2) + "\n"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temporary, self.path)


def _read(path: Path) -> list[TokenEntry]:
    try:
        data = json.loads(path.read_text())
        return [TokenEntry(id=str(t["id"]), name=str(t["name"]), role=Role(t["role"]), sha256=str(t["sha256"]),
                           created_at=float(t["created_at"])) for t in data["tokens"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TokenError(f"{path}: not a dashboard token file ({error})") from None
