"""Secrets at rest: BMC passwords are stored encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with a key kept in its own
0600 file, never in the database, so a copy of the database (a backup, a replica, a dump) holds no password.

Stored form: "fernet:" + token. A value without the prefix is a password stored before encryption (read as is; it
is encrypted at the manager's next start, see SqlStore.encrypt_legacy_secrets). Losing the key file loses the
passwords (set them again with `kvmha host bmc`); it is made on first start when missing.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

PREFIX = "fernet:"


class SecretError(ValueError):
    """A stored secret that the key cannot open (another manager's key, a damaged value)."""


class SecretBox:
    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    @classmethod
    def from_file(cls, path: Path) -> SecretBox:
        """The key in `path`; a new one (written 0600, its folder 0700) when the file does not exist yet."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with contextlib.suppress(FileExistsError):  # two managers starting at once: the first one's key wins
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as out:
                    out.write(Fernet.generate_key())
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise SecretError(f"{path} is readable by others (mode {mode:o}): chmod 600 it")
        return cls(path.read_bytes().strip())

    def seal(self, plaintext: str) -> str:
        return PREFIX + self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, stored: str) -> str:
        if not stored.startswith(PREFIX):
            return stored  # stored before encryption
        try:
            return self._fernet.decrypt(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise SecretError("a stored BMC password does not open with this manager's key") from None


def is_sealed(stored: str | None) -> bool:
    return stored is None or stored.startswith(PREFIX)
