"""Private database servers for outage tests: PostgreSQL and MariaDB started from Debian's binaries in a temporary
directory on a free 127.0.0.1 port, stopped and started again at will — never the machine's own services.

- `PrivatePostgres`: `initdb` + `pg_ctl` of /usr/lib/postgresql/<newest>/bin, run as the `postgres` user (PostgreSQL
  refuses root), trust authentication, its socket in its own directory. The lab's own server (`kvmha-lab up
  --managers N`, kvmha.lab.labdb) is one of these too, in a directory and on an address the lab chooses.
- `PrivateMariaDb`: `mariadb-install-db` + `mariadbd --skip-grant-tables` (no accounts to set up: the server listens
  on 127.0.0.1 only, for the test that started it), as the `mysql` user.
- `SqliteLock`: another process holding an exclusive lock on a SQLite database file (the third kind's "outage").

Each is a context manager; leaving it ends the server (by the PID it wrote) and removes its directory, also when the
test failed. `stop()` / `start()` in between are the outage.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import sqlalchemy
import sqlalchemy.exc
import sqlalchemy.pool

from kvmha.lab.bmc import find_free_port


class ServerUnavailable(Exception):
    """The binaries or the service user are missing on this machine."""


def _chown(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _as(user: str, argv: list[str], log: Path, timeout_s: float = 60.0) -> None:
    with log.open("ab") as out:
        subprocess.run(["runuser", "-u", user, "--", *argv], stdout=out, stderr=subprocess.STDOUT, check=True,
                       timeout=timeout_s)


def _wait_pid_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


class _Server:
    user = ""

    def __init__(self, directory: Path | None = None, listen: str = "127.0.0.1", port: int | None = None) -> None:
        """directory: where the server's files go (made here; the service user must be able to reach it); by
        default a new folder in /tmp. listen: the one address it listens on; port: by default a free one."""
        try:
            pwd.getpwnam(self.user)
        except KeyError:
            raise ServerUnavailable(f"no {self.user} user") from None
        self.listen = listen
        self.port = port or find_free_port()
        if directory is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"kvmha-{type(self).__name__.lower()}-", dir="/tmp"))
        else:
            self.dir = directory
            self.dir.mkdir(parents=True)
        os.chmod(self.dir, 0o755)
        self.log = self.dir / "server.log"

    def __enter__(self) -> Self:
        try:
            self.init()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def init(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def pid(self) -> int | None:
        raise NotImplementedError

    def stop(self) -> None:
        """End the server abruptly (SIGKILL): open connections break as in a crash."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            _wait_pid_gone(pid, 10.0)

    def close(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            if not _wait_pid_gone(pid, 10.0):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres(_Server):
    user = "postgres"

    def __init__(self, directory: Path | None = None, listen: str = "127.0.0.1", port: int | None = None) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            raise ServerUnavailable("no /usr/lib/postgresql/*/bin/pg_ctl")
        self.bin = Path(found[-1]).parent
        super().__init__(directory, listen, port)
        self.data = self.dir / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@{self.listen}:{self.port}/postgres"

    def init(self) -> None:
        _chown(self.dir, self.user)
        _as(self.user, [str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres"], self.log)

    def allow(self, network: str) -> None:
        """Let clients from `network` (CIDR) in with trust authentication; initdb's file admits only loopback. Takes
        effect at the next start."""
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write(f"host all all {network} trust\n")

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses={self.listen} -c unix_socket_directories={self.dir} "
                   "-c fsync=off")
        _as(self.user, [str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                        str(self.dir / "postgres.log"), "-w", "-t", "60", "start"], self.log, timeout_s=70)

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        super().stop()
        (self.data / "postmaster.pid").unlink(missing_ok=True)  # what a crash leaves behind; pg_ctl would refuse


class PrivateMariaDb(_Server):
    user = "mysql"

    def __init__(self) -> None:
        self.install = shutil.which("mariadb-install-db")
        self.server = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
        if self.install is None or not os.path.exists(self.server):
            raise ServerUnavailable("no mariadb-install-db / mariadbd")
        super().__init__()
        self.data = self.dir / "data"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mariadb://root@127.0.0.1:{self.port}/kvmha"

    def init(self) -> None:
        assert self.install is not None
        _chown(self.dir, self.user)
        _as(self.user, [self.install, "--no-defaults", f"--datadir={self.data}", "--skip-test-db",
                        "--auth-root-authentication-method=normal"], self.log, timeout_s=120)

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [self.server, "--no-defaults", f"--datadir={self.data}", f"--port={self.port}",
                 "--bind-address=127.0.0.1", f"--socket={self.dir / 'mysqld.sock'}", f"--user={self.user}",
                 f"--pid-file={self.dir / 'mysqld.pid'}", "--skip-grant-tables", "--skip-name-resolve",
                 "--innodb-flush-log-at-trx-commit=2"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._answers():
                return
            if self.process.poll() is not None:
                raise ServerUnavailable(f"mariadbd ended: {self.log.read_text()[-2000:]}")
            time.sleep(0.3)
        raise ServerUnavailable("mariadbd did not answer within 60 s")

    def _answers(self) -> bool:
        engine = sqlalchemy.create_engine(f"mysql+pymysql://root@127.0.0.1:{self.port}/",
                                          connect_args={"connect_timeout": 2}, poolclass=sqlalchemy.pool.NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text("CREATE DATABASE IF NOT EXISTS kvmha"))
            return True
        except sqlalchemy.exc.OperationalError:
            return False
        finally:
            engine.dispose()

    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def stop(self) -> None:
        super().stop()
        if self.process is not None:
            self.process.wait(10)


class SqliteLock:
    """A second process that holds an exclusive write lock on `path` while `held` (as an operator's sqlite3 shell or
    a backup tool might): every writer waits, then fails."""

    SCRIPT = ("import sqlite3, sys\n"
              "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "c.execute('BEGIN EXCLUSIVE')\n"
              "print('locked', flush=True)\n"
              "sys.stdin.read()\n")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process: subprocess.Popen[str] | None = None

    def hold(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(self.path)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "locked":
            raise sqlite3.OperationalError("the lock holder could not lock the database")

    def release(self) -> None:
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()  # its read ends, it exits, the lock goes with it
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
