"""Alembic migrations of the manager database."""
