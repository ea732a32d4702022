"""Moved to kvmha.lab.testing.databases (bench/ uses it too and must not import tests/).

Kept only for tests/db/conftest.py, which is being rewritten on another branch: import kvmha.lab.testing.databases
directly, and delete this file once nothing imports it."""

from kvmha.lab.testing.databases import KINDS, DatabaseUnavailable, fresh_database

__all__ = ["KINDS", "DatabaseUnavailable", "fresh_database"]
