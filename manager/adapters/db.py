"""Database engines and migrations: SQLite (embedded default), PostgreSQL (psycopg 3) and MariaDB (PyMySQL).

The manager never creates tables itself: `migrate(engine)` runs the Alembic migrations shipped in
kvmha.manager.migrations up to head, so a database made by an older version is upgraded in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

DEFAULT_SQLITE_PATH = Path("/var/lib/kvmha/manager.sqlite")
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def normalize_url(url: str) -> str:
    """Pick the drivers kvmha ships with when the URL names only the database kind."""
    parsed = make_url(url)
    driver = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql", "mariadb": "mariadb+pymysql"}
    if parsed.drivername in driver:
        parsed = parsed.set(drivername=driver[parsed.drivername])
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` with kvmha's settings for its database kind."""
    url = normalize_url(url)
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(url, **kwargs)
    options: dict[str, Any] = {"pool_pre_ping": True, **kwargs}
    if backend in ("mysql", "mariadb"):
        # Read committed like PostgreSQL: HA work claiming (SKIP LOCKED) must not see REPEATABLE READ snapshots.
        options.setdefault("isolation_level", "READ COMMITTED")
    return create_engine(url, **options)


def _sqlite_engine(url: str, **kwargs: Any) -> Engine:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # WAL lets the CLI/metrics read while the manager writes; foreign keys are off by default in SQLite.
        cursor = dbapi_connection.cursor()
        if database and database != ":memory:":
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return engine


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


MIGRATION_LOCK_KEY = 0x6B766D6861  # "kvmha": PostgreSQL advisory lock key (MariaDB: the lock's name below)
MIGRATION_LOCK_TIMEOUT_S = 120


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (default: the newest). Managers started at the same instant on one server
    database take turns (a session lock held around the upgrade): the second finds the schema current, instead of
    both creating the same tables."""
    dialect = engine.dialect.name
    if dialect not in ("postgresql", "mysql", "mariadb"):
        command.upgrade(alembic_config(engine), revision)  # SQLite: one manager, one file
        return
    if dialect == "postgresql":
        take = f"SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"
        give = f"SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"
    else:
        take = f"SELECT GET_LOCK('kvmha.migrate', {MIGRATION_LOCK_TIMEOUT_S})"
        give = "SELECT RELEASE_LOCK('kvmha.migrate')"
    with engine.connect() as lock:
        lock.execute(text(take))
        try:
            command.upgrade(alembic_config(engine), revision)
        finally:
            lock.execute(text(give))
            lock.rollback()


def downgrade(engine: Engine, revision: str = "base") -> None:
    command.downgrade(alembic_config(engine), revision)
