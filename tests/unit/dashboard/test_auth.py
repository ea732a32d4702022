"""Dashboard tokens: stored hashed, checked in constant time, roles ranked, revocation seen without a restart."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kvmha.manager.dashboard.auth import Role, TokenBook, TokenError, digest

RANKS = [(Role.READER, Role.READER, True), (Role.READER, Role.OPERATOR, False), (Role.READER, Role.ADMIN, False),
         (Role.OPERATOR, Role.READER, True), (Role.OPERATOR, Role.OPERATOR, True), (Role.OPERATOR, Role.ADMIN, False),
         (Role.ADMIN, Role.READER, True), (Role.ADMIN, Role.OPERATOR, True), (Role.ADMIN, Role.ADMIN, True)]


@pytest.mark.parametrize(("held", "needed", "allowed"), RANKS)
def test_role_table(held: Role, needed: Role, allowed: bool) -> None:
    assert held.allows(needed) is allowed


def test_every_pair_of_roles_is_in_the_table() -> None:
    assert {(a, b) for a, b, _ in RANKS} == {(a, b) for a in Role for b in Role}


def test_issue_stores_only_a_hash(tmp_path: Path) -> None:
    book = TokenBook(tmp_path / "tokens.json")
    entry, secret = book.issue(Role.READER, "ops")
    text = (tmp_path / "tokens.json").read_text()
    assert secret not in text and digest(secret) in text
    assert stat.S_IMODE(os.stat(tmp_path / "tokens.json").st_mode) == 0o600
    principal = book.authenticate(secret)
    assert principal is not None and (principal.token_id, principal.role, principal.name) == (entry.id, Role.READER,
                                                                                                "ops")
    assert book.authenticate(secret + "x") is None and book.authenticate("") is None
    assert book.authenticate(digest(secret)) is None  # the stored hash is not a credential


def test_revocation_and_a_second_writer_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    server, admin = TokenBook(path), TokenBook(path)  # the manager's copy and the CLI's
    entry, secret = admin.issue(Role.ADMIN, "")
    assert server.authenticate(secret) is not None
    assert admin.revoke(entry.id) and not admin.revoke(entry.id)
    os.utime(path, ns=(1, 1))  # a same-second rewrite must not hide behind an unchanged mtime: force a change
    assert server.authenticate(secret) is None


def test_no_book_means_no_access_and_a_broken_book_is_an_error(tmp_path: Path) -> None:
    assert TokenBook(tmp_path / "missing.json").authenticate("kvd_x") is None
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"tokens": [{"id": "1"}]}))
    with pytest.raises(TokenError, match="not a dashboard token file"):
        TokenBook(broken).entries()
