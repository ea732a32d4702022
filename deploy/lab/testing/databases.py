"""Databases for tests: SQLite files, and throw-away databases on the PostgreSQL and MariaDB servers.

Server URLs come from KVMHA_TEST_POSTGRES_URL and KVMHA_TEST_MARIADB_URL (`make test` points them at the servers
running on this machine). When one is unset and a Docker engine answers, a testcontainers server is started
instead; otherwise the tests for that database are skipped with the reason. Each test gets its own database
(CREATE DATABASE kvmha_t_<random>), dropped afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from kvmha.manager.adapters.db import normalize_url

ENV_BY_KIND = {"postgresql": "KVMHA_TEST_POSTGRES_URL", "mariadb": "KVMHA_TEST_MARIADB_URL"}
KINDS = ("sqlite", "postgresql", "mariadb")


class DatabaseUnavailable(Exception):
    """No server of this kind can be had here; the message says why (used as the skip reason)."""


_containers: dict[str, Any] = {}


def server_url(kind: str) -> str:
    """The admin URL of a server of `kind`, from the environment or a testcontainer."""
    if kind not in ENV_BY_KIND:
        raise ValueError(f"unknown database kind {kind!r}")
    url = os.environ.get(ENV_BY_KIND[kind], "").strip()
    if url:
        return normalize_url(url)
    return normalize_url(_container_url(kind))


def _container_url(kind: str) -> str:
    if kind in _containers:
        return str(_containers[kind].get_connection_url())
    if not _docker_answers():
        raise DatabaseUnavailable(f"{ENV_BY_KIND[kind]} is not set and no Docker engine answers for testcontainers")
    if kind == "postgresql":
        from testcontainers.postgres import PostgresContainer

        container: Any = PostgresContainer("postgres:16", driver="psycopg")
    else:
        from testcontainers.mysql import MySqlContainer

        container = MySqlContainer("mariadb:11", username="root", password="test", dbname="test")
    container.start()
    _containers[kind] = container
    return str(container.get_connection_url())


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def stop_containers() -> None:
    for container in _containers.values():
        with suppress(Exception):
            container.stop()
    _containers.clear()


@contextmanager
def fresh_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """Yield the URL of a new empty database of `kind`; drop it afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'kvmha.sqlite'}"
        return
    admin_url = server_url(kind)
    name = f"kvmha_t_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
    except Exception as error:
        admin.dispose()
        if os.environ.get("KVMHA_REQUIRE_DATABASES") == "1":
            raise  # make test promised these servers: a dead one is a failure, not a skip
        raise DatabaseUnavailable(f"{kind} at {make_url(admin_url).host}: {error}") from error
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            if kind == "postgresql":
                connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                connection.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()
