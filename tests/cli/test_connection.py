"""Reaching the manager: address, unreachable and slow managers, TLS."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from typer.testing import CliRunner

from kvmha.manager.cli import app
from kvmha.manager.cli_client import with_port
from kvmha.proto.v1 import admin_pb2 as pb
from tests.cli.fake_admin import FakeAdmin, serve
from tests.cli.support import as_json, kvmha, ok, refused
from tests.cli.tls import make_pki


def test_unreachable_manager_exits_2_and_says_where_it_looked(fake: FakeAdmin, closed_port: str) -> None:
    for args in (["host", "list"], ["events", "--follow"]):
        result = kvmha(closed_port, *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"kvmha: cannot reach the manager at {closed_port}: ")
        assert "--manager or KVMHA_MANAGER" in result.stderr and result.stderr.count("\n") == 1
        assert result.stdout == ""


def test_manager_address_from_the_environment(fake: FakeAdmin, manager: str, closed_port: str) -> None:
    result = CliRunner().invoke(app, ["host", "list", "--json"], env={"KVMHA_MANAGER": manager, "KVMHA_TLS_CA": None})
    assert json.loads(ok(result))["hosts"][0]["name"] == "h1"
    result = CliRunner().invoke(app, ["host", "list"], env={"KVMHA_MANAGER": closed_port, "KVMHA_TLS_CA": None})
    assert result.exit_code == 2 and closed_port in result.stderr


def test_an_address_without_port_gets_the_admin_port(fake: FakeAdmin, manager: str) -> None:
    assert with_port("mgr1") == "mgr1:50052"
    assert with_port("10.0.0.5:6000") == "10.0.0.5:6000"
    assert with_port("dns:///mgr1:50052") == "dns:///mgr1:50052"
    assert with_port("unix:/run/kvmha/admin.sock") == "unix:/run/kvmha/admin.sock"


def test_no_connection_before_the_deadline_is_unreachable(silent_port: str) -> None:
    for args in (["vm", "list"], ["events", "--follow"]):
        result = kvmha(silent_port, "--timeout", "0.3", *args)
        assert result.exit_code == 2, result.output
        assert result.stderr == (
            f"kvmha: cannot reach the manager at {silent_port}: no connection within 0.3 s "
            "(set the address with --manager or KVMHA_MANAGER)\n"
        )


def test_connected_but_no_answer_exits_5(fake: FakeAdmin, manager: str) -> None:
    # The timeout is long enough for a loopback connection on a loaded machine (else it reads "cannot reach", 2),
    # and the answer comes well after it.
    fake.delay_s = 6.0
    result = kvmha(manager, "--timeout", "2", "vm", "start", "db1")
    assert result.exit_code == 5, result.output
    assert "did not answer within 2 s" in result.stderr and "may or may not have been applied" in result.stderr


# --- several managers ---


def test_a_change_refused_by_a_standby_goes_to_the_next_manager(fake: FakeAdmin, manager: str) -> None:
    standby = FakeAdmin()
    standby.standby_of = "m1"
    server, standby_address = serve(standby)
    try:
        both = f"{standby_address},{manager}"
        assert "Host h1" in ok(kvmha(both, "host", "show", "h1"))  # a read: the standby answers it
        assert standby.sent("GetHost") and not fake.sent("GetHost")
        ok(kvmha(both, "vm", "start", "db1"))
        assert standby.sent("StartVm") == [pb.Ref(ref="db1")]  # refused there, applied here
        assert fake.sent("StartVm") == [pb.Ref(ref="db1")]

        alone = kvmha(standby_address, "vm", "start", "db1")
        assert alone.exit_code == 4, alone.output
        assert "the lease is held by m1" in alone.stderr and "--manager ADDR,ADDR" in alone.stderr
    finally:
        server.stop(grace=None)


def test_an_unreachable_manager_is_passed_but_a_slow_one_is_not(fake: FakeAdmin, manager: str,
                                                                 closed_port: str) -> None:
    assert "Host h1" in ok(kvmha(f"{closed_port},{manager}", "host", "show", "h1"))
    # Connected but no answer: the change may have been applied there, so it is not sent again elsewhere.
    other = FakeAdmin()
    server, other_address = serve(other)
    try:
        fake.delay_s = 6.0
        slow = kvmha(f"{manager},{other_address}", "--timeout", "2", "vm", "start", "db1")
        assert slow.exit_code == 5, slow.output
        assert not other.requests
    finally:
        server.stop(grace=None)
    refused_both = kvmha(f"{closed_port},{closed_port}", "host", "list")
    assert refused_both.exit_code == 2 and f"before it: {closed_port}: unreachable" in refused_both.stderr


# --- TLS ---


def test_tls_with_the_managers_ca(fake: FakeAdmin, tmp_path: Path) -> None:
    pki = make_pki()
    server, address = serve(fake, grpc.ssl_server_credentials([(pki.key_pem, pki.cert_pem)]))
    try:
        ca = tmp_path / "ca.pem"
        ca.write_bytes(pki.ca_pem)
        assert as_json(kvmha(address, "--tls-ca", str(ca), "host", "show", "h1", "--json"))["name"] == "h1"
        via_env = kvmha(address, "host", "show", "h1", env={"KVMHA_TLS_CA": str(ca)})
        assert "Host h1" in ok(via_env)
        plaintext = kvmha(address, "--timeout", "1", "host", "show", "h1")
        assert plaintext.exit_code == 2 and "cannot reach the manager" in plaintext.stderr
        other_ca = tmp_path / "other.pem"
        other_ca.write_bytes(make_pki().ca_pem)
        untrusted = kvmha(address, "--tls-ca", str(other_ca), "host", "show", "h1")
        assert untrusted.exit_code == 2 and "cannot reach the manager" in untrusted.stderr
    finally:
        server.stop(grace=None)
    assert len(fake.sent("GetHost")) == 2  # only over TLS with the right CA


def test_unreadable_ca_file(manager: str, tmp_path: Path) -> None:
    refused(
        kvmha(manager, "--tls-ca", str(tmp_path / "none.pem"), "host", "list"),
        4,
        f"cannot read the CA certificate {tmp_path / 'none.pem'}: No such file or directory",
    )
