from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from kvmha.manager.adapters.db import make_engine
from tests.support.databases import KINDS, DatabaseUnavailable, fresh_database


@pytest.fixture(params=KINDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A new empty database on each of SQLite, PostgreSQL and MariaDB."""
    try:
        with fresh_database(request.param, tmp_path) as url:
            yield url
    except DatabaseUnavailable as reason:
        pytest.skip(str(reason))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()
