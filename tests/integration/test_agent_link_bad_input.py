"""Bad input on the manager's AgentLink port, against a real `kvmha-manager` process.

Garbage bytes, messages out of order, malformed Hellos, an unknown host, a second Hello, an oversize message, a
flood of reports, a duplicate host: each is answered with a Reject and/or a gRPC status that says why. Meanwhile a
real `kvmha-agent` (h1, running one registered VM) stays connected: after every case its host is still Up, has
pinged since, has no new event, and the database still holds exactly the hosts and VMs it should, with their
values (the admin API is the witness). The misbehaving agents are grpc.aio clients written here.

One manager and one good agent serve the whole module (PostgreSQL, the database of the benchmark); the unknown-host
case needs `auto_register_hosts = false` and gets its own manager on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmha.lab.domain import domain_xml
from kvmha.lab.pki import LabPki
from kvmha.lab.testing.databases import DatabaseUnavailable, fresh_database
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.manager.adapters.db import make_engine, migrate
from kvmha.manager.adapters.repository import SqlStore
from kvmha.proto.v1 import admin_pb2 as apb
from kvmha.proto.v1 import agent_pb2 as pb
from kvmha.proto.v1 import agent_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FAST = {"ping.interval": "1", "ping.timeout": "3.5", "startup.grace": "4", "heartbeat.stale.after": "2"}
GOOD = "h1"
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


# ---------------------------------------------------------------------------------------------- fake agents


def hello(host_uuid: str, name: str, version: int = pb.PROTOCOL_VERSION_CURRENT) -> pb.AgentMessage:
    return pb.AgentMessage(hello=pb.Hello(
        host_uuid=host_uuid, hostname=name, management_address="127.0.0.1",
        capacity=pb.Capacity(cpus=4, memory_mib=4096, free_memory_mib=4000), libvirt_version="fake",
        qemu_version="fake", agent_version="bad-input-test", protocol_version=version,
        boot_id=str(uuid_module.uuid4())))


def ping(sequence: int) -> pb.AgentMessage:
    return pb.AgentMessage(ping=pb.Ping(sequence=sequence, hypervisor_connected=True))


def report(sequence: int, full: bool = True, domains: list[pb.DomainPower] | None = None) -> pb.AgentMessage:
    return pb.AgentMessage(power=pb.PowerStateReport(full=full, domains=domains or [], hypervisor_connected=True,
                                                     sequence=sequence))


@dataclass
class Outcome:
    """What a fake agent got back: the manager's messages and the stream's final status."""

    replies: list[pb.ManagerMessage] = field(default_factory=list)
    code: grpc.StatusCode | None = None
    details: str = ""
    write_error: str = ""

    def kinds(self) -> list[str]:
        """What the manager sent, but its questions about other hosts: the fake hosts of earlier tests that went
        silent without a watchdog are investigated (every investigate.retry.interval) for as long as the module runs,
        and any Up fake agent may be asked about them as a neighbour."""
        return [str(m.WhichOneof("msg")) for m in self.replies if not m.command.HasField("check_neighbor")]

    def reject(self) -> pb.Reject:
        assert self.kinds() == ["reject"], self
        return self.replies[0].reject


# The manager runs mutual TLS (the default): each fake agent presents a host certificate of its manager's CA for
# the uuid its Hello names, so that what is tested here is the message, not the handshake.
_PKIS: dict[str, LabPki] = {}
ANY_UUID = "00000000-0000-4000-8000-000000000000"


def credentials(address: str, host_uuid: str = ANY_UUID) -> grpc.ChannelCredentials:
    try:
        host_uuid = str(uuid_module.UUID(host_uuid))
    except ValueError:
        host_uuid = ANY_UUID  # a Hello with a bad uuid: refused for its uuid, after a good handshake
    return _PKIS[address].host(f"h-{host_uuid}", host_uuid).channel_credentials()


def secure_channel(address: str, host_uuid: str = ANY_UUID) -> grpc.Channel:
    return grpc.secure_channel(address, credentials(address, host_uuid), options=CHANNEL_OPTIONS)


def local_cluster(tmp: Path, url: str) -> LocalCluster:
    cluster = LocalCluster(tmp, url, core_config=dict(FAST))
    _PKIS[f"127.0.0.1:{cluster.agent_port}"] = cluster.pki
    return cluster


class FakeAgent:
    """One AgentLink stream, driven message by message."""

    def __init__(self, address: str, host_uuid: str = ANY_UUID) -> None:
        self.channel = grpc.aio.secure_channel(address, credentials(address, host_uuid), options=CHANNEL_OPTIONS)
        self.call = agent_pb2_grpc.AgentLinkStub(self.channel).Connect(None)  # None: messages come from write()
        self.outcome = Outcome()

    async def send(self, *messages: pb.AgentMessage) -> bool:
        """Write the messages; False once the stream is closed (the manager cut it)."""
        for message in messages:
            try:
                await self.call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as error:
                self.outcome.write_error = repr(error)
                return False
        return True

    async def read(self, timeout_s: float = 10.0) -> pb.ManagerMessage | None:
        try:
            message = await asyncio.wait_for(self.call.read(), timeout_s)
        except grpc.aio.AioRpcError:
            return None
        if not isinstance(message, pb.ManagerMessage):  # grpc.aio.EOF: the stream ended
            return None
        self.outcome.replies.append(message)
        return message

    async def finish(self, timeout_s: float = 15.0) -> Outcome:
        """Read what is left and the final status (without half-closing: the manager must end the stream)."""
        async def drain() -> None:
            while await self.read(timeout_s) is not None:
                pass
            self.outcome.code = await self.call.code()
            self.outcome.details = await self.call.details()

        try:
            await asyncio.wait_for(drain(), timeout_s)
        finally:
            self.call.cancel()
            await self.channel.close(None)
        return self.outcome

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close(None)


async def exchange(address: str, *messages: pb.AgentMessage, half_close: bool = True) -> Outcome:
    """Send `messages` and return what came back. Nothing is written after the message meant to end the stream:
    a grpc.aio write that races the server's close fails locally and records INTERNAL ("Internal error from
    Core") as the call's status, hiding the status the manager sent."""
    first = messages[0] if messages else pb.AgentMessage()
    agent = FakeAgent(address, first.hello.host_uuid if first.WhichOneof("msg") == "hello" else ANY_UUID)
    await agent.send(*messages)
    if half_close:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await agent.call.done_writing()
    return await agent.finish()


async def accepted(address: str, host_uuid: str, name: str) -> tuple[FakeAgent, pb.Welcome]:
    agent = FakeAgent(address, host_uuid)
    await agent.send(hello(host_uuid, name))
    first = await agent.read()
    assert first is not None and first.WhichOneof("msg") == "welcome", (first, await agent.finish())
    return agent, first.welcome


# ---------------------------------------------------------------------------------------------- the cluster


@dataclass
class Baseline:
    """The good agent's host and VM as they were before the bad inputs, and the hosts allowed to exist."""

    host: apb.HostInfo
    vm: apb.VmInfo
    expected_hosts: set[str]
    event_id: int


@dataclass
class World:
    cluster: LocalCluster
    baseline: Baseline

    @property
    def link(self) -> str:
        return f"127.0.0.1:{self.cluster.agent_port}"

    def fake_host(self, name: str) -> str:
        """A uuid for a fake agent that is allowed to register (its Hello is good)."""
        self.baseline.expected_hosts.add(name)
        return str(uuid_module.uuid4())

    def check_unaffected(self, since: float) -> None:
        """The good agent is still Up, has pinged after `since`, no event concerns it; the database is intact."""
        cluster, base = self.cluster, self.baseline
        try:
            host = wait_for(lambda: (h := cluster.hosts()[GOOD]).last_ping_at > since and h, 5,
                            f"{GOOD} pinging after the bad input")
        except TimeoutError:
            pytest.fail(f"{GOOD} stopped pinging\n{cluster.story()}\n{cluster.logs()}")
        assert host.status == "Up" and host.connected, host
        for attribute in ("id", "uuid", "name", "address", "cpus", "memory_mib", "resource_state", "agent_version"):
            assert getattr(host, attribute) == getattr(base.host, attribute), (attribute, host, base.host)
        hosts = cluster.hosts()
        assert set(hosts) <= base.expected_hosts, f"hosts created by bad streams: {set(hosts) - base.expected_hosts}"
        assert len({h.uuid for h in hosts.values()}) == len(hosts), hosts
        vms = cluster.vms()
        vm = vms[base.vm.name]
        assert (vm.uuid, vm.state, vm.power_state, vm.host, vm.ha_enabled, vm.memory_mib) == (
            base.vm.uuid, "Running", "PowerOn", GOOD, True, base.vm.memory_mib), vm
        assert not [v for v in vms.values() if v.name != base.vm.name and v.host == GOOD], vms
        news = cluster.admin().ListEvents(
            apb.ListEventsRequest(after_id=base.event_id, subject=f"host:{base.host.id}", limit=1000), timeout=5)
        assert not news.events, f"events about the good host: {list(news.events)}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("bad-input")
    try:
        with fresh_database("postgresql", tmp) as url:
            cluster = local_cluster(tmp, url)
            try:
                cluster.start_manager()
                cluster.start_agent(GOOD)
                wait_for(lambda: (h := cluster.hosts().get(GOOD)) and h.status == "Up", 30, f"{GOOD} Up")
                created = cluster.admin().CreateVm(
                    apb.CreateVmRequest(domain_xml=domain_xml("web", domain_type="test"), ha_enabled=True, start=True),
                    timeout=10)
                vm = wait_for(lambda: (v := cluster.vms()["web"]).state == "Running" and v.power_state == "PowerOn"
                              and v, 30, "web Running")
                assert vm.uuid == created.uuid and vm.host == GOOD
                events = cluster.events()
                world = World(cluster, Baseline(cluster.hosts()[GOOD], vm, {GOOD}, events[-1].id if events else 0))
                world.check_unaffected(time.time() - 2)
                yield world
            finally:
                cluster.close()
    except DatabaseUnavailable as reason:
        pytest.skip(str(reason))


# ---------------------------------------------------------------------------------------------- the cases


def _read_until_closed(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    seen = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return seen
        if not chunk:
            return seen
        seen += chunk
    raise AssertionError(f"the manager kept a garbage connection open for {timeout_s} s (got {seen[:80]!r})")


GARBAGE = {
    "random bytes": bytes(range(256)) * 256,
    "HTTP/1.1": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    # A valid connection preface, then junk frames (maximum length, unknown type).
    "HTTP/2 preface then junk frames": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                                        + b"\xff\xff\xff\x07\x01\x00\x00\x00\x01" * 500),
    "gRPC-looking length prefix": b"\x00\x7f\xff\xff\xff" + b"\x00" * 1000,
}


def test_garbage_bytes_are_dropped_and_the_port_still_serves(world: World) -> None:
    started = time.time()
    for what, junk in GARBAGE.items():
        with socket.create_connection(("127.0.0.1", world.cluster.agent_port), timeout=5) as sock:
            try:
                sock.sendall(junk)
            except (ConnectionResetError, BrokenPipeError):
                continue  # closed while we were still writing: dropped, which is the point
            _read_until_closed(sock, 10)
        assert world.cluster.manager is not None and world.cluster.manager.alive, what
    # The same port still serves: the health service, and a good agent is welcomed.
    with secure_channel(world.link) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="kvmha.v1.AgentLink"), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    async def good_agent() -> pb.Welcome:
        agent, welcome = await accepted(world.link, world.fake_host("fresh"), "fresh")
        assert await agent.send(report(1), ping(1), pb.AgentMessage(goodbye=pb.Goodbye(reason="test done")))
        await agent.finish()
        return welcome

    welcome = asyncio.run(good_agent())
    assert welcome.host_id > 0 and welcome.ping_interval_s == 1.0
    world.check_unaffected(started)


def test_first_message_not_hello_is_rejected(world: World) -> None:
    started = time.time()
    for first in (ping(1), report(1, domains=[pb.DomainPower(uuid=str(uuid_module.uuid4()), name="x",
                                                             state=pb.POWER_ON)]), pb.AgentMessage()):
        outcome = asyncio.run(exchange(world.link, first, half_close=False))
        reject = outcome.reject()
        assert reject.code == pb.REJECT_BAD_HELLO and "must be Hello" in reject.reason, outcome
        assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION and "must be Hello" in outcome.details, outcome
    # A stream that ends before saying anything.
    outcome = asyncio.run(exchange(world.link))
    assert outcome.reject().code == pb.REJECT_BAD_HELLO and outcome.code is not grpc.StatusCode.OK, outcome
    world.check_unaffected(started)
    assert not [v for v in world.cluster.vms().values() if v.name == "x"], "a rejected stream's report was used"


def poisoned(memory_mib: int = 4096, cpus: int = 4, boot_id: str = "b", management_address: str = "127.0.0.1",
             watchdog_timeout_s: float = 0.0) -> pb.AgentMessage:
    message = hello(str(uuid_module.uuid4()), "poison")
    message.hello.capacity.memory_mib, message.hello.capacity.cpus = memory_mib, cpus
    message.hello.boot_id, message.hello.management_address = boot_id, management_address
    message.hello.watchdog.timeout_s = watchdog_timeout_s
    return message


@pytest.mark.parametrize(("message", "code", "words"), [
    (hello("not-a-uuid", "evil1"), pb.REJECT_BAD_HELLO, "is not a UUID"),
    (hello("", "evil2"), pb.REJECT_BAD_HELLO, "is not a UUID"),
    (hello(str(uuid_module.uuid4()), "evil3", version=2), pb.REJECT_PROTOCOL_VERSION, "protocol version 2"),
    (hello(str(uuid_module.uuid4()), "evil4", version=0), pb.REJECT_PROTOCOL_VERSION, "protocol version 0"),
    (hello(str(uuid_module.uuid4()), ""), pb.REJECT_BAD_HELLO, "host name"),
    (hello(str(uuid_module.uuid4()), "bad name; drop table hosts"), pb.REJECT_BAD_HELLO, "host name"),
    # Issue 13's poison Hellos: values no database column takes (on the old code the batch's write failed and was
    # retried forever, and every agent and admin write behind it waited).
    (poisoned(memory_mib=2**64 - 1), pb.REJECT_BAD_HELLO, "Hello.capacity.memory_mib: 18446744073709551615 is more"),
    (poisoned(cpus=2**31), pb.REJECT_BAD_HELLO, "Hello.capacity.cpus: 2147483648 is more than 2147483647"),
    (poisoned(boot_id="a\x00b"), pb.REJECT_BAD_HELLO, "Hello.boot_id: control character '\\x00'"),
    (poisoned(management_address="x" * 300), pb.REJECT_BAD_HELLO, "management_address"),
    (poisoned(watchdog_timeout_s=math.nan), pb.REJECT_BAD_HELLO, "Hello.watchdog.timeout_s: nan is not a finite"),
], ids=["not-uuid", "empty-uuid", "protocol-2", "protocol-0", "no-hostname", "bad-hostname", "memory-2^64",
        "cpus-2^31", "nul-boot-id", "long-address", "nan-watchdog"])
def test_bad_hello_is_rejected_as_invalid_argument(
    world: World, message: pb.AgentMessage, code: pb.RejectCode.ValueType, words: str
) -> None:
    started = time.time()
    outcome = asyncio.run(exchange(world.link, message, half_close=False))
    reject = outcome.reject()
    assert reject.code == code and words in reject.reason and reject.retry_after_s > 0, outcome
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT and words in outcome.details, outcome
    assert_one_event(world, started, words)
    world.check_unaffected(started)


def assert_one_event(world: World, since: float, words: str) -> None:
    """Each refused stream leaves exactly one `wire.invalid` event saying why (no traceback in the log)."""
    events = wait_for(lambda: [e for e in world.cluster.events() if e.kind == "wire.invalid" and e.at >= since],
                      5, "a wire.invalid event")
    assert len(events) == 1 and words in events[0].message, events
    assert "Traceback" not in world.cluster.manager_log_tail(200)


def test_a_second_hello_on_an_accepted_stream_ends_it(world: World) -> None:
    started = time.time()
    host_uuid = world.fake_host("twice")

    async def scenario() -> Outcome:
        agent, _ = await accepted(world.link, host_uuid, "twice")
        await agent.send(report(1), ping(1), hello(host_uuid, "twice"))
        return await agent.finish()

    outcome = asyncio.run(scenario())
    assert outcome.kinds() == ["welcome"], outcome
    assert outcome.code == grpc.StatusCode.FAILED_PRECONDITION, outcome
    assert "unexpected hello message after Hello" in outcome.details, outcome
    hosts = world.cluster.hosts()
    assert hosts["twice"].uuid == host_uuid and not hosts["twice"].connected, hosts["twice"]
    world.check_unaffected(started)


UNKNOWN_STATE = pb.PowerState.ValueType(7)  # in no version of the enum: the manager must refuse it


def _domain(name: str, state: pb.PowerState.ValueType = pb.POWER_ON, uuid: str = "") -> pb.DomainPower:
    return pb.DomainPower(uuid=uuid or str(uuid_module.uuid4()), name=name, state=state)


@pytest.mark.parametrize(("message", "code", "words"), [
    (report(2, domains=[_domain("bad1", uuid="nope")]), grpc.StatusCode.INVALID_ARGUMENT,
     "domain uuid 'nope' is not a UUID"),
    (report(2, domains=[_domain("ok2"), _domain("bad2", state=UNKNOWN_STATE)]), grpc.StatusCode.INVALID_ARGUMENT,
     "7 is not a known PowerState"),
    (report(2, domains=[_domain(f"many{i}") for i in range(10_001)]), grpc.StatusCode.INVALID_ARGUMENT,
     "more than 10000"),
    (pb.AgentMessage(), grpc.StatusCode.FAILED_PRECONDITION, "unexpected empty message after Hello"),
    # Issue 13: a NUL in a domain name (PostgreSQL refuses it: the batch would never be written) and NaN evidence
    # (a NaN heartbeat age turns an honest "fresh" into "stale"); on the old code neither ended the stream.
    (report(2, domains=[_domain("nul\x00name")]), grpc.StatusCode.INVALID_ARGUMENT,
     "AgentMessage.power.domains[0].name: control character '\\x00'"),
    (pb.AgentMessage(result=pb.CommandResult(request_id="m1.1", ok=True, neighbor=pb.NeighborReport(
        heartbeat_found=True, heartbeat_age_s=math.nan))), grpc.StatusCode.INVALID_ARGUMENT,
     "AgentMessage.result.neighbor.heartbeat_age_s: nan is not a finite number"),
    (pb.AgentMessage(ping=pb.Ping(sequence=3, domains_running=2**32 - 1)), grpc.StatusCode.INVALID_ARGUMENT,
     "AgentMessage.ping.domains_running: 4294967295 is more than 2147483647"),
    # A build time that is no time would make every comparison with it false (the hearing's transit lag).
    (pb.AgentMessage(ping=pb.Ping(sequence=3, sent_mono_s=math.inf)), grpc.StatusCode.INVALID_ARGUMENT,
     "AgentMessage.ping.sent_mono_s: inf is not a finite number"),
], ids=["domain-uuid", "power-state", "too-many-domains", "empty", "nul-domain-name", "nan-evidence",
        "uint32-ping", "infinite-ping-time"])
def test_a_malformed_message_after_welcome_ends_the_stream(
    world: World, message: pb.AgentMessage, code: grpc.StatusCode, words: str
) -> None:
    started = time.time()
    name = f"malformed-{len(world.baseline.expected_hosts)}"
    host_uuid = world.fake_host(name)

    async def scenario() -> Outcome:
        agent, _ = await accepted(world.link, host_uuid, name)
        await agent.send(report(1), ping(1), message)
        return await agent.finish()

    outcome = asyncio.run(scenario())
    assert outcome.kinds() == ["welcome"] and outcome.code == code and words in outcome.details, outcome
    assert_one_event(world, started, words)
    reported = {d.name for d in message.power.domains}
    assert not reported & set(world.cluster.vms()), "a domain of the refused report was recorded"
    assert not world.cluster.hosts()[name].connected
    world.check_unaffected(started)


def test_a_result_for_a_command_never_sent_is_ignored(world: World) -> None:
    started = time.time()
    host_uuid = world.fake_host("forger")
    vm_uuid = world.baseline.vm.uuid

    async def scenario() -> Outcome:
        agent, welcome = await accepted(world.link, host_uuid, "forger")
        forged = pb.CommandResult(request_id=f"{welcome.manager_id}.forged.1", ok=True,
                                  vm_started=pb.VmStarted(uuid=vm_uuid))
        assert await agent.send(report(1), pb.AgentMessage(result=forged), ping(1),
                                pb.AgentMessage(result=pb.CommandResult(request_id="", ok=False)), ping(2))
        await asyncio.sleep(0.5)
        assert await agent.send(pb.AgentMessage(goodbye=pb.Goodbye(reason="test done")))
        return await agent.finish()

    outcome = asyncio.run(scenario())
    # The forger may be asked to check a neighbour (the fake hosts of earlier cases went silent): commands to it are
    # fine; what matters is that its forged results settle nothing.
    kinds = outcome.kinds()
    assert kinds[0] == "welcome" and set(kinds[1:]) <= {"command"} and outcome.code == grpc.StatusCode.OK, outcome
    world.check_unaffected(started)  # among others: web still Running on h1, not moved to "forger"


def _oversize() -> pb.AgentMessage:
    domain = pb.DomainPower(uuid=str(uuid_module.uuid4()), name="huge", state=pb.POWER_ON,
                            detail_text="x" * (9 << 20))
    message = report(2, domains=[domain])
    assert message.ByteSize() > 8 << 20
    return message


def test_an_oversize_message_is_refused(world: World) -> None:
    started = time.time()
    host_uuid = world.fake_host("big")

    async def after_welcome() -> Outcome:
        agent, _ = await accepted(world.link, host_uuid, "big")
        await agent.send(report(1), ping(1), _oversize())
        return await agent.finish()

    outcome = asyncio.run(after_welcome())
    assert outcome.kinds() == ["welcome"], outcome
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    # As the very first message, too: no Reject can be sent for a message that was never read, only the status.
    outcome = asyncio.run(exchange(world.link, _oversize(), half_close=False))
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "welcome" not in outcome.kinds(), outcome
    vms = world.cluster.vms()
    assert "huge" not in vms, vms["huge"]
    assert not world.cluster.hosts()["big"].connected
    world.check_unaffected(started)


def _flood(link: str, host_uuid: str, count: int) -> tuple[list[str], grpc.StatusCode, str, int]:
    """Hello, then `count` power reports as fast as the client can write them. Through the synchronous client:
    its request thread stops quietly when the manager cuts the stream, so the status read is the manager's (a
    grpc.aio write racing the cut would record a local INTERNAL instead, see `exchange`). Each report flips one
    domain between on and off, so every report the manager accepts is real work for the core and the database."""
    written = 0
    domain_uuid = str(uuid_module.uuid4())

    def messages() -> Iterator[pb.AgentMessage]:
        nonlocal written
        yield hello(host_uuid, "flood")
        for sequence in range(1, count + 1):
            state = pb.POWER_ON if sequence % 2 else pb.POWER_OFF
            yield report(sequence, full=False, domains=[pb.DomainPower(uuid=domain_uuid, name="flooded", state=state)])
            written = sequence

    kinds: list[str] = []
    with secure_channel(link, host_uuid) as channel:
        call = agent_pb2_grpc.AgentLinkStub(channel).Connect(messages(), timeout=60)
        try:
            for message in call:
                kinds.append(str(message.WhichOneof("msg")))
        except grpc.RpcError as error:
            assert isinstance(error, grpc.Call)
            return kinds, error.code(), str(error.details()), written
    return kinds, grpc.StatusCode.OK, "", written


def test_a_flood_of_reports_is_cut_off(world: World) -> None:
    """20,000 power reports at once: the manager ends the stream (its token bucket allows bursts of 5,000, then
    500 a second) with RESOURCE_EXHAUSTED, and the good agent never misses a beat."""
    started = time.time()
    kinds, code, details, written = _flood(world.link, world.fake_host("flood"), 20_000)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many messages" in details, (kinds, code, details)
    assert kinds[:1] == ["welcome"] and set(kinds[1:]) <= {"command"}, kinds
    assert written > 5000, written
    assert not world.cluster.hosts()["flood"].connected
    world.check_unaffected(started)
    # The backlog the flood left in the core is worked off, and the good agent is still Up after it.
    world.check_unaffected(time.time())


def test_a_duplicate_host_is_rejected_while_the_first_pings(world: World) -> None:
    """A second stream claiming a host whose agent is alive and pinging: Reject DUPLICATE_HOST, ALREADY_EXISTS;
    the first stream is not disturbed, and the impostor's Hello changes nothing in the database (its host name
    and address are not taken)."""
    started = time.time()
    host_uuid = world.fake_host("first")

    async def scenario() -> tuple[list[Outcome], Outcome, bool]:
        first, _ = await accepted(world.link, host_uuid, "first")
        await first.send(report(1))
        stop = asyncio.Event()

        async def keep_pinging() -> None:
            sequence = 1
            while not stop.is_set():
                assert await first.send(ping(sequence)), first.outcome
                sequence += 1
                await asyncio.sleep(0.3)

        pinger = asyncio.create_task(keep_pinging())
        await asyncio.sleep(1.0)
        impostor = await exchange(world.link, hello(host_uuid, "impostor"), half_close=False)
        # And one claiming the real agent's host, from "another machine".
        good_uuid = world.baseline.host.uuid
        second = await exchange(world.link, hello(good_uuid, "evil-twin"), half_close=False)
        # The same uuid spelled in capitals is the same host, not a new one.
        shouted = await exchange(world.link, hello(good_uuid.upper(), "evil-caps"), half_close=False)
        await asyncio.sleep(1.5)
        stop.set()
        await pinger
        still_open = await first.send(ping(1000))
        await first.send(pb.AgentMessage(goodbye=pb.Goodbye(reason="test done")))
        return [impostor, second, shouted], await first.finish(), still_open

    duplicates, first, still_open = asyncio.run(scenario())
    for outcome in duplicates:
        reject = outcome.reject()
        assert reject.code == pb.REJECT_DUPLICATE_HOST and "already connected" in reject.reason, outcome
        assert outcome.code == grpc.StatusCode.ALREADY_EXISTS, outcome
    # (It may be asked to check its neighbours meanwhile: commands are fine, anything else is not.)
    assert still_open and first.kinds()[0] == "welcome" and set(first.kinds()[1:]) <= {"command"}, first
    assert first.code == grpc.StatusCode.OK, first
    hosts = world.cluster.hosts()
    assert not {"impostor", "evil-twin", "evil-caps"} & set(hosts), sorted(hosts)
    assert hosts["first"].uuid == host_uuid
    world.check_unaffected(started)


def test_unknown_host_is_rejected_when_auto_registration_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `auto_register_hosts = false` only hosts already in the database may connect."""
    url = f"sqlite:///{tmp_path / 'kvmha.sqlite'}"
    known = str(uuid_module.uuid4())
    engine = make_engine(url)
    migrate(engine)
    with SqlStore(engine).unit_of_work() as uow:
        uow.hosts.add(known, "known", "127.0.0.1", time.time())
        uow.commit()
    engine.dispose()
    monkeypatch.setenv("KVMHA_MANAGER_AUTO_REGISTER_HOSTS", "false")
    cluster = local_cluster(tmp_path, url)
    try:
        cluster.start_manager()
        link = f"127.0.0.1:{cluster.agent_port}"

        async def scenario() -> tuple[Outcome, pb.Welcome]:
            stranger = await exchange(link, hello(str(uuid_module.uuid4()), "stranger"), half_close=False)
            agent, welcome = await accepted(link, known, "known")
            await agent.send(report(1), ping(1), pb.AgentMessage(goodbye=pb.Goodbye(reason="test done")))
            await agent.finish()
            return stranger, welcome

        stranger, welcome = asyncio.run(scenario())
        reject = stranger.reject()
        assert reject.code == pb.REJECT_UNKNOWN_HOST and "not registered" in reject.reason, stranger
        assert reject.retry_after_s >= 10, reject
        assert stranger.code == grpc.StatusCode.PERMISSION_DENIED and "not registered" in stranger.details, stranger
        hosts = cluster.hosts()
        assert sorted(hosts) == ["known"] and hosts["known"].id == welcome.host_id, hosts
    finally:
        cluster.close()
