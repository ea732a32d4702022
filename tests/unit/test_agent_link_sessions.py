"""Sessions are released on every exit path of a stream (issue 13): a cancel while the Welcome is being sent, a
message that makes translation fail, a malformed message after Welcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from kvmha.manager.adapters.agent_link import AgentLinkServicer, LinkRegistry
from kvmha.manager.core import facts
from kvmha.manager.core.actions import Severity
from kvmha.manager.core.model import HostId
from kvmha.manager.hub import AgentHello, WelcomeTerms
from kvmha.proto.v1 import agent_pb2 as pb

UUID = "7f0e2c52-6f7c-4d2b-9f55-1c1b6fe1a0a1"


class Hub:
    def __init__(self) -> None:
        self.facts: list[facts.Fact] = []
        self.events: list[str] = []
        self.pings_read: list[tuple[int, float, float]] = []
        self.ended: list[int] = []

    async def register_agent(self, hello: AgentHello, peer: str) -> HostId:
        return HostId(1)

    def welcome(self, host_id: HostId) -> WelcomeTerms:
        return WelcomeTerms(host_id, 1.0, 3.0, "m1", 30.0)

    def submit(self, fact: facts.Fact, received_at: float | None = None) -> None:
        self.facts.append(fact)

    def record_event(self, severity: Severity, kind: str, message: str) -> None:
        self.events.append(f"{kind}: {message}")

    def ping_read(self, stream: int, sent_mono_s: float, arrival_s: float) -> None:
        self.pings_read.append((stream, sent_mono_s, arrival_s))

    def stream_ended(self, stream: int) -> None:
        self.ended.append(stream)


class Context:
    def __init__(self) -> None:
        self.aborted: tuple[Any, str] | None = None

    def peer(self) -> str:
        return "ipv4:10.0.0.9:4242"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    async def abort(self, code: Any, details: str) -> None:
        self.aborted = (code, details)
        raise asyncio.CancelledError  # grpc.aio ends the handler this way (an AbortError); enough for these tests


def hello() -> pb.AgentMessage:
    return pb.AgentMessage(hello=pb.Hello(host_uuid=UUID, hostname="h1", protocol_version=1,
                                          capacity=pb.Capacity(cpus=2, memory_mib=1024)))


async def messages(*items: pb.AgentMessage, then_wait: bool = False) -> AsyncIterator[pb.AgentMessage]:
    for item in items:
        yield item
    if then_wait:
        await asyncio.Event().wait()


def disconnected(hub: Hub) -> list[facts.Fact]:
    return [f for f in hub.facts if isinstance(f, facts.AgentDisconnected)]


def test_a_cancel_while_the_welcome_is_sent_releases_the_session() -> None:
    async def run() -> tuple[LinkRegistry, Hub]:
        hub, registry = Hub(), LinkRegistry(lambda: 4.0)
        stream = AgentLinkServicer(hub, registry).Connect(messages(hello(), then_wait=True), Context())  # type: ignore[arg-type]
        assert isinstance(stream, AsyncGenerator)
        first = await anext(stream)
        assert first.WhichOneof("msg") == "welcome" and len(registry) == 1
        await stream.aclose()  # the client went away while the Welcome was on its way
        return registry, hub

    registry, hub = asyncio.run(run())
    assert len(registry) == 0 and len(disconnected(hub)) == 1


def test_a_malformed_message_after_welcome_ends_the_stream_and_releases_it() -> None:
    async def run() -> tuple[LinkRegistry, Hub, Context]:
        hub, registry, context = Hub(), LinkRegistry(lambda: 4.0), Context()
        bad = pb.AgentMessage(result=pb.CommandResult(request_id="m1.1", code=pb.ErrorCode.ValueType(99)))  # undeclared
        stream = AgentLinkServicer(hub, registry).Connect(messages(hello(), bad, then_wait=True), context)  # type: ignore[arg-type]
        replies = []
        try:
            async for reply in stream:
                replies.append(reply.WhichOneof("msg"))
        except asyncio.CancelledError:
            pass
        return registry, hub, context

    registry, hub, context = asyncio.run(run())
    assert len(registry) == 0 and len(disconnected(hub)) == 1
    assert context.aborted is not None and "99 is not a known ErrorCode" in context.aborted[1]
    assert len(hub.events) == 1 and hub.events[0].startswith("wire.invalid: ") and "10.0.0.9" in hub.events[0]


def test_a_ping_that_says_when_it_was_built_tells_the_hearing_when_it_was_read() -> None:
    """The agent's build time and the arrival stamp of the fact go to the hearing (the transit lag), under the
    stream's own key, which is forgotten when the stream ends; a ping without a build time (an older agent) only
    becomes a fact."""

    async def run() -> Hub:
        hub, registry = Hub(), LinkRegistry(lambda: 4.0)
        pings = [pb.AgentMessage(ping=pb.Ping(sequence=2, sent_mono_s=1000.5)),
                 pb.AgentMessage(ping=pb.Ping(sequence=3))]
        stream = AgentLinkServicer(hub, registry).Connect(messages(hello(), *pings), Context())  # type: ignore[arg-type]
        async for _reply in stream:
            pass
        return hub

    before = time.monotonic()
    hub = asyncio.run(run())
    assert len([f for f in hub.facts if isinstance(f, facts.HeartbeatReceived)]) == 2
    assert len(hub.pings_read) == 1
    stream, sent_s, arrival_s = hub.pings_read[0]
    assert sent_s == 1000.5 and before <= arrival_s <= time.monotonic()
    assert hub.ended == [stream]
