"""Running the CLI in process and checking its results, shared by the CLI tests."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner, Result

from kvmha.manager.cli import app
from kvmha.proto.v1 import admin_pb2 as pb


def kvmha(address: str, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    # Wide, so table cells are not folded and a test can look for whole values; the developer's own
    # KVMHA_TLS_CA must not leak in.
    environment: dict[str, str | None] = {"COLUMNS": "250", "KVMHA_TLS_CA": None, **(env or {})}
    return CliRunner().invoke(app, ["--manager", address, *args], input=input, env=environment)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert result.stderr == ""
    return result.stdout


def as_json(result: Result) -> Any:
    return json.loads(ok(result))  # the whole of stdout must be the JSON: no colour, no extra lines


def fields(message: type[pb.HostInfo] | type[pb.VmInfo] | type[pb.HaWorkInfo] | type[pb.EventInfo]) -> set[str]:
    return {f.name for f in message.DESCRIPTOR.fields}


def refused(result: Result, code: int, message: str) -> None:
    """One line on stderr with the manager's message, the contracted exit code, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stderr == f"kvmha: {message}\n"
    assert result.stdout == ""
