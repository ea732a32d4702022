"""The lab's own PostgreSQL server, for labs with several managers (`kvmha-lab up --managers N`, issue 15).

Debian's postgresql binaries, started through kvmha.lab.testing.dbserver.PrivatePostgres (the same code that gives
the outage tests their private servers): `initdb` in the lab's state dir, run as the `postgres` user, listening on
the lab bridge's address only (port 5432; the machine's own server listens on 127.0.0.1), trust authentication for
the lab subnet (where the managers' namespaces are) and nobody else, database `kvmha`.

Invariants: the server's PID and start time are in the lab's state before anything else can need it, so `down`
from any process ends exactly that postmaster (fast shutdown, SIGINT; SIGKILL if it does not go) and removes its
folder. When the state dir is not reachable by the `postgres` user (a pytest tmp dir is 0700), the server's folder
is made in /tmp instead and recorded the same way.
"""

from __future__ import annotations

import shutil
import signal
import stat
import tempfile
from pathlib import Path

import sqlalchemy
import sqlalchemy.pool

from kvmha.lab import proc
from kvmha.lab.state import LabError, LabSpec, PidRef

LAB_DB_PORT = 5432
DATABASE = "kvmha"
SHUTDOWN_TIMEOUT_S = 20.0


def _reachable_by_others(path: Path) -> bool:
    """Every folder from / down to `path` lets others through (o+x): the postgres user can reach it."""
    return all(folder.stat().st_mode & stat.S_IXOTH for folder in [path, *path.parents] if folder.exists())


def _server_dir(spec: LabSpec) -> Path:
    state_dir = Path(spec.state_dir)
    if _reachable_by_others(state_dir):
        return state_dir / "postgres"
    parent = Path(tempfile.mkdtemp(prefix=f"kvmha-lab-{spec.prefix}-pg-", dir="/tmp"))
    parent.chmod(0o755)  # mkdtemp makes it 0700
    return parent / "postgres"


def start(spec: LabSpec) -> str:
    """initdb, start, create the database; record it all in `spec` (saved) and return the managers' URL."""
    from kvmha.lab.testing.dbserver import PrivatePostgres, ServerUnavailable

    directory = _server_dir(spec)
    spec.database_dir = str(directory)
    spec.save()  # from here on, `down` removes the folder whatever happens next
    try:
        server = PrivatePostgres(directory, listen=spec.bridge_address, port=LAB_DB_PORT)
        server.init()
        server.allow(spec.subnet)
        server.start()
    except ServerUnavailable as error:
        raise LabError(f"the lab's PostgreSQL: {error}") from error
    pid = server.pid()
    found = proc.info(pid) if pid is not None else None
    if found is None:
        raise LabError(f"the lab's PostgreSQL did not stay up; see {server.log}")
    spec.database = PidRef(found.pid, found.start_ticks)
    spec.save()
    admin = sqlalchemy.create_engine(f"postgresql+psycopg://postgres@{spec.bridge_address}:{LAB_DB_PORT}/postgres",
                                     isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool)
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {DATABASE}"))
    finally:
        admin.dispose()
    spec.database_url = f"postgresql://postgres@{spec.bridge_address}:{LAB_DB_PORT}/{DATABASE}"
    spec.save()
    return spec.database_url


def stop(spec: LabSpec) -> None:
    """End the postmaster by its recorded PID (its backends end with it) and remove the server's folder."""
    ref = spec.database
    if ref is not None and proc.alive(ref.pid, ref.start_ticks):
        target = [proc.ProcInfo(ref.pid, 0, "", ref.start_ticks, 0)]
        proc.kill(ref.pid, ref.start_ticks, signal.SIGINT)  # fast shutdown: clients are cut, nothing waits
        if proc.wait_gone(target, SHUTDOWN_TIMEOUT_S):
            proc.kill(ref.pid, ref.start_ticks, signal.SIGKILL)
            proc.wait_gone(target, 5.0)
    if spec.database_dir:
        directory = Path(spec.database_dir)
        shutil.rmtree(directory, ignore_errors=True)
        parent = directory.parent  # the /tmp folder made for it when the state dir was out of reach
        if parent.name.startswith(f"kvmha-lab-{spec.prefix}-pg-") and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    spec.database = None
    spec.database_url = ""
    spec.database_dir = ""
