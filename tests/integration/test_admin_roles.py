"""The admin API over mutual TLS: the TLS layer refuses callers without a certificate of our CA, the roles
interceptor refuses roles too low; on the old code (no client certificates, no roles) every call here succeeded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvmha.manager.security import pki
from kvmha.manager.security.auth import RoleInterceptor, channel_credentials, server_credentials
from kvmha.manager.security.roles import Role
from kvmha.proto.v1 import admin_pb2 as pb
from kvmha.proto.v1 import admin_pb2_grpc

UUID = "7f0e2c52-6f7c-4d2b-9f55-1c1b6fe1a0a1"


class Servicer(admin_pb2_grpc.AdminServiceServicer):
    calls: list[str]

    def __init__(self) -> None:
        self.calls = []

    async def ListHosts(self, request: pb.ListHostsRequest, context: Any) -> pb.ListHostsResponse:
        self.calls.append("ListHosts")
        return pb.ListHostsResponse()

    async def SetConfig(self, request: pb.SetConfigRequest, context: Any) -> pb.ConfigItem:
        self.calls.append("SetConfig")
        return pb.ConfigItem(name=request.name, value=request.value)

    async def FollowEvents(self, request: pb.ListEventsRequest, context: Any) -> AsyncIterator[pb.EventInfo]:
        self.calls.append("FollowEvents")
        yield pb.EventInfo(id=1)


@pytest.fixture(scope="module")
def pkidir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    pki.init_ca(directory)
    pki.issue(directory, "manager", "mgr1", addresses=["127.0.0.1", "localhost"])
    for role in Role:
        pki.issue(directory, "operator", role.value, role=role)
    pki.issue(directory, "host", "kvm1", host_uuid=UUID)
    other = directory / "other"
    pki.init_ca(other)  # another CA (a self-signed operator, as far as our manager is concerned)
    pki.issue(other, "operator", "mallory", role=Role.ADMIN)
    return directory


Outcome = tuple[str, list[str]]


def call(pkidir: Path, who: tuple[Path, str] | None, rpc: str) -> Outcome:
    """Run a manager with the interceptor, make one call as `who` ((pki dir, "kind-name") or no certificate)."""

    async def run() -> Outcome:
        servicer = Servicer()  # type: ignore[abstract]  # the other RPCs answer UNIMPLEMENTED
        server = grpc.aio.server(interceptors=[RoleInterceptor()])
        admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server)
        creds = server_credentials(pkidir / "manager-mgr1.crt", pkidir / "manager-mgr1.key", pkidir / "ca.crt")
        port = server.add_secure_port("127.0.0.1:0", creds)
        await server.start()
        cert, key = ((who[0] / f"{who[1]}.crt", who[0] / f"{who[1]}.key") if who else (None, None))
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}",
                                               channel_credentials(pkidir / "ca.crt", cert, key)) as channel:
                stub = admin_pb2_grpc.AdminServiceStub(channel)
                try:
                    if rpc == "FollowEvents":
                        async for _ in stub.FollowEvents(pb.ListEventsRequest(), timeout=5):
                            break
                    elif rpc == "SetConfig":
                        await stub.SetConfig(pb.SetConfigRequest(name="ping.timeout", value="1"), timeout=5)
                    else:
                        await stub.ListHosts(pb.ListHostsRequest(), timeout=5)
                except grpc.aio.AioRpcError as error:
                    return error.code().name, servicer.calls
                return "OK", servicer.calls
        finally:
            await server.stop(None)

    return asyncio.run(run())


def test_admin_calls_without_a_certificate_are_refused_by_tls(pkidir: Path) -> None:
    assert call(pkidir, None, "ListHosts") == ("UNAVAILABLE", [])


def test_a_certificate_from_another_ca_is_refused_by_tls(pkidir: Path) -> None:
    assert call(pkidir, (pkidir / "other", "operator-mallory"), "SetConfig") == ("UNAVAILABLE", [])


def test_a_host_certificate_is_no_operator(pkidir: Path) -> None:
    assert call(pkidir, (pkidir, "host-kvm1"), "ListHosts") == ("UNAUTHENTICATED", [])


def test_a_role_too_low_is_refused_before_the_servicer(pkidir: Path) -> None:
    assert call(pkidir, (pkidir, "operator-reader"), "SetConfig") == ("PERMISSION_DENIED", [])
    assert call(pkidir, (pkidir, "operator-operator"), "SetConfig") == ("PERMISSION_DENIED", [])
    assert call(pkidir, (pkidir, "operator-reader"), "ListHosts") == ("OK", ["ListHosts"])
    assert call(pkidir, (pkidir, "operator-reader"), "FollowEvents") == ("OK", ["FollowEvents"])
    assert call(pkidir, (pkidir, "operator-admin"), "SetConfig") == ("OK", ["SetConfig"])


def test_pki_cli_writes_what_the_manager_reads(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kvmha.manager.cli import app

    def kvmha(*argv: str) -> Iterator[str]:
        result = CliRunner().invoke(app, ["pki", *argv, *([] if argv[0] == "show" else ["--dir", str(tmp_path)])])
        assert result.exit_code == 0, result.output
        yield from result.output.splitlines()

    assert list(kvmha("init"))
    list(kvmha("manager", "mgr1", "--address", "127.0.0.1"))
    list(kvmha("host", "kvm1", "--uuid", UUID, "--address", "10.0.0.11"))
    list(kvmha("operator", "ops", "--role", "operator"))
    shown = "\n".join(kvmha("show", str(tmp_path / "host-kvm1.crt")))
    assert f"urn:kvmha:host:{UUID}" in shown and "proves      host" in shown
    assert "role        operator" in "\n".join(kvmha("show", str(tmp_path / "operator-ops.crt")))
    refused = CliRunner().invoke(app, ["pki", "init", "--dir", str(tmp_path)])
    assert refused.exit_code == 4 and "orphan" in refused.output
