"""Attacks on a real `kvmha-manager` on its defaults (mutual TLS), each of which the old plaintext manager let
through (issue 13): a stream with no certificate, with a certificate of another CA, with another host's
certificate, with an operator's certificate; admin calls with no certificate and with a role too low.

Meanwhile the honest agents (h1 and h2, one of them running the HA VM "web") stay Up and untouched, and every
refused Hello leaves a `security` event naming the peer's address.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid as uuid_module
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvmha.lab.domain import domain_xml
from kvmha.lab.pki import LabPki, TlsFiles
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.manager.security.roles import Role
from kvmha.proto.v1 import admin_pb2 as apb
from kvmha.proto.v1 import agent_pb2 as pb
from kvmha.proto.v1 import agent_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
FAST = {"ping.interval": "1", "ping.timeout": "3.5", "startup.grace": "4"}
KVMHA = str(Path(sys.executable).with_name("kvmha"))
PLACED: dict[str, str] = {}  # where web runs (placement chose)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("identity")
    running = LocalCluster(tmp, f"sqlite:///{tmp / 'kvmha.sqlite'}", core_config=FAST)
    try:
        running.start_manager()
        for name in ("h1", "h2"):
            running.start_agent(name)
        running.wait_hosts_up(["h1", "h2"], 30)
        running.admin().CreateVm(apb.CreateVmRequest(domain_xml=domain_xml("web", domain_type="test"),
                                                     ha_enabled=True, start=True), timeout=10)
        web = wait_for(lambda: (v := running.vms()["web"]).state == "Running" and v, 30, "web Running")
        PLACED["web"] = web.host
        yield running
    finally:
        running.close()


def hello(host_uuid: str, name: str) -> pb.AgentMessage:
    return pb.AgentMessage(hello=pb.Hello(
        host_uuid=host_uuid, hostname=name, management_address="10.66.6.6",
        protocol_version=pb.PROTOCOL_VERSION_CURRENT, capacity=pb.Capacity(cpus=64, memory_mib=1 << 20),
        agent_version="impostor", boot_id=str(uuid_module.uuid4())))


def crashed(vm_uuid: str) -> pb.AgentMessage:
    return pb.AgentMessage(power=pb.PowerStateReport(full=True, hypervisor_connected=True, sequence=1, domains=[
        pb.DomainPower(uuid=vm_uuid, name="web", state=pb.POWER_CRASHED, cause=pb.CAUSE_CRASHED)]))


def impostor(cluster: LocalCluster, credentials: grpc.ChannelCredentials, *messages: pb.AgentMessage,
             ) -> tuple[list[str], grpc.StatusCode | None, str]:
    """Say `messages` on an AgentLink stream; what came back and the stream's status."""

    async def run() -> tuple[list[str], grpc.StatusCode | None, str]:
        kinds: list[str] = []
        async with grpc.aio.secure_channel(f"127.0.0.1:{cluster.agent_port}", credentials) as channel:
            call = agent_pb2_grpc.AgentLinkStub(channel).Connect(iter(messages), timeout=10)
            try:
                async for reply in call:
                    kinds.append(str(reply.WhichOneof("msg")))
            except grpc.aio.AioRpcError as error:
                return kinds, error.code(), str(error.details())
        return kinds, grpc.StatusCode.OK, ""

    return asyncio.run(run())


def assert_honest_hosts_untouched(cluster: LocalCluster, since: float) -> None:
    wait_for(lambda: all(h.last_ping_at > since for h in cluster.hosts().values()), 10, "h1 and h2 pinging")
    hosts = cluster.hosts()
    assert sorted(hosts) == ["h1", "h2"], hosts
    assert all(h.status == "Up" and h.connected and h.address == "127.0.0.1" for h in hosts.values()), hosts
    web = cluster.vms()["web"]
    assert (web.state, web.power_state, web.host) == ("Running", "PowerOn", PLACED["web"]), web


def security_events(cluster: LocalCluster, after_id: int) -> list[apb.EventInfo]:
    return [e for e in cluster.events(after_id) if e.kind == "security"]


def test_another_hosts_certificate_cannot_speak_for_the_host_of_web(cluster: LocalCluster) -> None:
    since, last = time.time(), cluster.events()[-1].id
    web = cluster.vms()["web"]
    victim, thief = web.host, "h2" if web.host == "h1" else "h1"
    stolen = cluster.pki.host(thief, cluster.host_uuids[thief], "127.0.0.1")
    kinds, code, details = impostor(cluster, stolen.channel_credentials(), hello(cluster.host_uuids[victim], victim),
                                    crashed(web.uuid))
    assert kinds == ["reject"] and code is grpc.StatusCode.PERMISSION_DENIED, (kinds, code, details)
    assert cluster.host_uuids[victim] in details and "does not prove it" in details, details
    events = wait_for(lambda: security_events(cluster, last), 10, "a security event")
    assert "127.0.0.1" in events[0].message, events  # the peer address
    assert f"'{thief}' (host {cluster.host_uuids[thief]}" in events[0].message, events
    assert_honest_hosts_untouched(cluster, since)


def test_an_operator_certificate_is_no_host(cluster: LocalCluster) -> None:
    since, last = time.time(), cluster.events()[-1].id
    admin = cluster.pki.operator(Role.ADMIN)
    kinds, code, _ = impostor(cluster, admin.channel_credentials(), hello(str(uuid_module.uuid4()), "evil"))
    assert kinds == ["reject"] and code is grpc.StatusCode.PERMISSION_DENIED
    assert wait_for(lambda: security_events(cluster, last), 10, "a security event")
    assert_honest_hosts_untouched(cluster, since)


def test_no_certificate_and_other_cas_are_refused_by_the_handshake(cluster: LocalCluster, tmp_path: Path) -> None:
    since = time.time()
    ca_only = grpc.ssl_channel_credentials(cluster.pki.files("manager", "manager").ca.read_bytes())
    other = LabPki(tmp_path / "other-ca")  # a self-made CA issuing itself h1's identity
    forged = other.host("h1", cluster.host_uuids["h1"])
    mixed = TlsFiles(cluster.pki.files("manager", "manager").ca, forged.cert, forged.key)
    for credentials in (ca_only, mixed.channel_credentials()):
        kinds, code, _ = impostor(cluster, credentials, hello(cluster.host_uuids["h1"], "h1"))
        assert kinds == [] and code is grpc.StatusCode.UNAVAILABLE, (kinds, code)
    # Plaintext to a TLS port: nothing is ever read as a Hello.
    async def plaintext() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{cluster.agent_port}") as channel:
            call = agent_pb2_grpc.AgentLinkStub(channel).Connect(iter([hello(cluster.host_uuids["h1"], "h1")]),
                                                                 timeout=5)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as error:
                return error.code()
        return grpc.StatusCode.OK

    assert asyncio.run(plaintext()) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert_honest_hosts_untouched(cluster, since)


def cli(cluster: LocalCluster, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVMHA_")}
    return subprocess.run([KVMHA, *args], capture_output=True, text=True, env={**base, **env}, timeout=30)


def test_admin_calls_need_a_certificate_and_the_role(cluster: LocalCluster) -> None:
    no_cert = cli(cluster, {"KVMHA_MANAGER": cluster.admin_address}, "config", "set", "ping.timeout", "60")
    assert no_cert.returncode == 2, no_cert  # plaintext to a TLS port: unreachable
    ca_only = cli(cluster, {"KVMHA_MANAGER": cluster.admin_address,
                            "KVMHA_TLS_CA": str(cluster.pki.files("manager", "manager").ca)},
                  "config", "set", "ping.timeout", "60")
    assert ca_only.returncode == 2, ca_only  # the handshake needs a client certificate
    reader = cli(cluster, cluster.cli_env(Role.READER), "config", "set", "ping.timeout", "60")
    assert reader.returncode == 4 and "needs the admin role" in reader.stderr, reader
    operator = cli(cluster, cluster.cli_env(Role.OPERATOR), "vm", "delete", "web")
    assert operator.returncode == 4 and "needs the admin role" in operator.stderr, operator
    assert cli(cluster, cluster.cli_env(Role.READER), "host", "list").returncode == 0
    items = {c.name: c.value for c in cluster.admin().ListConfig(apb.ListConfigRequest(), timeout=5).items}
    assert items["ping.timeout"] == "3.5" and "web" in cluster.vms()
    # The lab's env file carries the same settings for people: KVMHA_ENV_FILE.
    env_file = cluster.pki.write_cli_env(cluster.workdir / "cli.env", cluster.admin_address, Role.OPERATOR)
    assert cli(cluster, {"KVMHA_ENV_FILE": str(env_file)}, "host", "list").returncode == 0
    denied = cli(cluster, {"KVMHA_ENV_FILE": str(env_file)}, "config", "set", "ping.timeout", "60")
    assert denied.returncode == 4, denied
