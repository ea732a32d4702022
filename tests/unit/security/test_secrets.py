"""BMC passwords at rest: sealed in the database with a key kept in its own 0600 file."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from kvmha.manager.adapters.db import make_engine, migrate
from kvmha.manager.adapters.repository import SqlStore
from kvmha.manager.security.secrets import PREFIX, SecretBox, SecretError
from kvmha.manager.store import BmcCredentials

PASSWORD = "s3cr3t-" + "p" * 240  # near the longest the CLI sends


def store(tmp_path: Path, box: SecretBox | None) -> SqlStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'kvmha.sqlite'}")
    migrate(engine)
    return SqlStore(engine, secrets=box)


def test_the_key_file_is_made_0600_and_a_readable_one_refused(tmp_path: Path) -> None:
    key = tmp_path / "state" / "secrets.key"
    SecretBox.from_file(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert SecretBox.from_file(key).open(SecretBox.from_file(key).seal("x")) == "x"  # the same key is read again
    key.chmod(0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        SecretBox.from_file(key)


def test_passwords_are_sealed_in_the_database_and_legacy_ones_sealed_at_start(tmp_path: Path) -> None:
    box = SecretBox.from_file(tmp_path / "secrets.key")
    plain, sealed = store(tmp_path, None), store(tmp_path, box)
    with plain.unit_of_work() as uow:  # written before encryption existed
        legacy = uow.hosts.add("7f0e2c52-6f7c-4d2b-9f55-1c1b6fe1a0a1", "old", "10.0.0.1", time.time())
        uow.hosts.set_bmc(legacy, BmcCredentials("10.0.1.1", 623, "admin", "legacy-pw"), time.time())
        uow.commit()
    with sealed.unit_of_work() as uow:
        new = uow.hosts.add("8f0e2c52-6f7c-4d2b-9f55-1c1b6fe1a0a1", "new", "10.0.0.2", time.time())
        uow.hosts.set_bmc(new, BmcCredentials("10.0.1.2", 623, "admin", PASSWORD), time.time())
        assert uow.hosts.bmc(legacy) == BmcCredentials("10.0.1.1", 623, "admin", "legacy-pw")  # read as is
        assert uow.hosts.seal_stored_passwords() == 1
        uow.commit()
    with sealed.engine.connect() as connection:  # what a copy of the database holds
        stored = [row[0] for row in connection.execute(text("SELECT bmc_password FROM host ORDER BY id"))]
    assert all(value.startswith(PREFIX) for value in stored), stored
    assert not any("legacy-pw" in value or "s3cr3t" in value for value in stored)
    with sealed.unit_of_work() as uow:
        assert uow.hosts.bmc(new) == BmcCredentials("10.0.1.2", 623, "admin", PASSWORD)
        assert uow.hosts.bmc(legacy) == BmcCredentials("10.0.1.1", 623, "admin", "legacy-pw")
        assert uow.hosts.seal_stored_passwords() == 0
    # Another manager's key opens nothing: fencing gets an empty password (and fails saying so), nothing crashes.
    with store(tmp_path, SecretBox.from_file(tmp_path / "other.key")).unit_of_work() as uow:
        other = uow.hosts.bmc(new)
        assert other is not None and other.password == ""
