"""The installed `kvmha` console script as a real process: what an operator and a script actually get.

Covers what CliRunner cannot: the entry point itself, a real Ctrl-C (SIGINT) while following events, and the
hidden password prompt on a real terminal (a pty), where echo is the terminal's business.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmha.proto.v1 import admin_pb2 as pb
from tests.cli.fake_admin import FakeAdmin

KVMHA = shutil.which("kvmha", path=str(Path(sys.executable).parent)) or "kvmha"
ENV = {k: v for k, v in os.environ.items() if k not in ("KVMHA_MANAGER", "KVMHA_TLS_CA", "COLUMNS", "FORCE_COLOR")}


def run(address: str, *args: str, input: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KVMHA, "--manager", address, *args], input=input, capture_output=True, text=True, env=ENV, timeout=30
    )


class Reader:
    """Reads a child's output with a deadline, so a CLI that hangs fails the test instead of stalling it."""

    def __init__(self, fd: int) -> None:
        self.fd, self.seen = fd, b""

    def until(self, marker: bytes, timeout_s: float = 30.0) -> bytes:  # a loaded CI machine starts Python slowly
        deadline = time.monotonic() + timeout_s
        while marker not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} in {self.seen!r}"
            if select.select([self.fd], [], [], left)[0]:
                chunk = os.read(self.fd, 4096)
                assert chunk, f"EOF before {marker!r} in {self.seen!r}"
                self.seen += chunk
        return self.seen


def test_the_console_script_is_installed() -> None:
    assert Path(KVMHA).is_file(), "pip install -e . declares kvmha = kvmha.manager.cli:main"


def test_json_listing_from_the_console_script(manager: str) -> None:
    done = run(manager, "host", "list", "--json")
    assert (done.returncode, done.stderr) == (0, "")
    assert [h["name"] for h in json.loads(done.stdout)["hosts"]] == ["h1", "h2", "h3", "h4"]


def test_human_show_from_the_console_script(manager: str) -> None:
    done = run(manager, "vm", "show", "web1")
    assert (done.returncode, done.stderr) == (0, "")
    assert "VM web1" in done.stdout and "\x1b[" not in done.stdout  # a pipe gets no colour


def test_errors_are_one_line_and_an_exit_code(manager: str, closed_port: str) -> None:
    done = run(closed_port, "vm", "list")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"kvmha: cannot reach the manager at {closed_port}: ")
    assert done.stderr.count("\n") == 1 and "KVMHA_MANAGER" in done.stderr
    done = run(manager, "vm", "show", "ghost")
    assert (done.returncode, done.stdout, done.stderr) == (3, "", "kvmha: no VM 'ghost'\n")


def test_bmc_password_from_a_pipe(fake: FakeAdmin, manager: str) -> None:
    args = ["host", "bmc", "h2", "--address", "10.0.1.2", "--user", "ipmi", "--password-stdin"]
    done = run(manager, *args, input="piped-s3cret\n")
    assert (done.returncode, done.stderr) == (0, "")
    assert "piped-s3cret" not in done.stdout
    assert fake.sent("SetHostBmc") == [
        pb.SetHostBmcRequest(host="h2", address="10.0.1.2", port=623, user="ipmi", password="piped-s3cret")
    ]


def test_bmc_without_a_terminal_or_stdin_flag_is_refused(fake: FakeAdmin, manager: str) -> None:
    done = run(manager, "host", "bmc", "h2", "--address", "10.0.1.2", "--user", "ipmi", input="s3cret\n")
    assert done.returncode == 4 and "--password-stdin" in done.stderr
    assert fake.sent("SetHostBmc") == []


def test_bmc_password_prompt_on_a_terminal_does_not_echo(fake: FakeAdmin, manager: str) -> None:
    master, slave = pty.openpty()
    args = [KVMHA, "--manager", manager, "host", "bmc", "h2", "--address", "10.0.1.2", "--user", "ipmi"]
    # A new session: the pty (not pytest's terminal) is where the prompt happens.
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=ENV, start_new_session=True)
    os.close(slave)
    try:
        terminal = Reader(master)
        terminal.until(b"BMC password: ")  # the last space comes from getpass, after it turned echo off
        os.write(master, b"tty-s3cret\n")
        assert proc.wait(timeout=30) == 0, terminal.seen
        terminal.until(b"BMC 10.0.1.2:623")
    finally:
        proc.kill()
        os.close(master)
    assert b"tty-s3cret" not in terminal.seen
    sent = fake.sent("SetHostBmc")
    assert len(sent) == 1 and isinstance(sent[0], pb.SetHostBmcRequest) and sent[0].password == "tty-s3cret"


def test_follow_streams_new_events_and_ctrl_c_exits_0(fake: FakeAdmin, manager: str) -> None:
    proc = subprocess.Popen(
        [KVMHA, "--manager", manager, "events", "--follow", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out = Reader(proc.stdout.fileno())
        out.until(b'"id":3')  # the backlog
        fake.add_event("HostDown", "h1 stopped pinging", subject="host:1", severity="alert")
        out.until(b"h1 stopped pinging")  # streamed, not polled: the CLI is still running
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
    finally:
        proc.kill()
    lines = [json.loads(line) for line in out.seen.decode().splitlines()]
    assert [e["id"] for e in lines] == [1, 2, 3, 4]
    assert lines[3]["severity"] == "alert"
    assert err == b""  # no KeyboardInterrupt traceback
    assert fake.sent("FollowEvents") == [pb.ListEventsRequest()]


@pytest.mark.parametrize("args", [["--help"], ["host", "--help"], ["events", "--help"]])
def test_help_needs_no_manager(closed_port: str, args: list[str]) -> None:
    done = run(closed_port, *args)
    assert done.returncode == 0 and "Usage" in done.stdout
