"""Alembic environment: run against the engine the caller put in config.attributes["engine"]."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from kvmha.manager.adapters.db_models import Base

target_metadata = Base.metadata


def run_migrations_online() -> None:
    engine = context.config.attributes.get("engine")
    if not isinstance(engine, Engine):
        raise RuntimeError("kvmha migrations run through kvmha.manager.adapters.db.migrate(engine)")
    with engine.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things; batch mode recreates the table instead.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
