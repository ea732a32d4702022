"""Fixtures: a fake AdminService on 127.0.0.1, a closed port and a port that accepts but never answers."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.cli.fake_admin import FakeAdmin, serve


@pytest.fixture
def fake() -> FakeAdmin:
    return FakeAdmin()


@pytest.fixture
def manager(fake: FakeAdmin) -> Iterator[str]:
    """The fake's address; the server is stopped (streams cancelled) after the test."""
    server, address = serve(fake)
    yield address
    fake.close_streams()
    server.stop(grace=None)


@pytest.fixture
def closed_port() -> str:
    # Bound then closed: nothing listens there for the test's short life (the kernel does not reuse it at once).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def silent_port() -> Iterator[str]:
    """A listener that never speaks HTTP/2: connecting never completes, like a manager behind a black hole."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"127.0.0.1:{sock.getsockname()[1]}"
