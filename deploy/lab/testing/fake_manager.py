"""A fake manager: a real gRPC AgentLink server on 127.0.0.1 that records what agents send and sends commands.

Runs its own asyncio loop in a thread, so synchronous tests (and bench/agent_latency.py) can drive it. Every
received AgentMessage is kept with the monotonic time of its arrival.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from kvmha.proto.v1 import agent_pb2 as pb
from kvmha.proto.v1 import agent_pb2_grpc as pb_grpc

T = TypeVar("T")

@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() on arrival
    stream: int  # which connection (1, 2, ... in order of Hello)
    msg: pb.AgentMessage

    @property
    def kind(self) -> str:
        return self.msg.WhichOneof("msg") or ""


class FakeManager(pb_grpc.AgentLinkServicer):
    def __init__(self, ping_interval_s: float = 0.2, resync_interval_s: float = 0.0) -> None:
        self.welcome = pb.Welcome(host_id=1, ping_interval_s=ping_interval_s, ping_timeout_s=ping_interval_s * 5,
                                  protocol_version=1, manager_id="fake", resync_interval_s=resync_interval_s)
        self.reject: pb.Reject | None = None  # when set, every Hello gets this Reject
        self.port = 0
        self.received: list[Received] = []
        self._cond = threading.Condition()
        self._streams: dict[int, asyncio.Queue[pb.ManagerMessage]] = {}
        self._stream_count = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-manager", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None

    # -- lifecycle (callable from any thread) -------------------------------------------------------------
    def _run(self, coro: Coroutine[object, object, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=30)

    def start(self) -> FakeManager:
        self._run(self._start())
        return self

    async def _start(self) -> None:
        server = grpc.aio.server()
        pb_grpc.add_AgentLinkServicer_to_server(self, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    def stop(self, grace_s: float | None = None) -> None:
        if self._server is not None:
            self._run(self._server.stop(grace_s))
            self._server = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- the servicer ---------------------------------------------------------------------------------------
    # The stubs' servicer returns an iterator of replies; this one writes them through the context (grpc.aio's
    # other streaming style, which the generated stubs cannot express), so that tests can send at any time.
    async def Connect(  # type: ignore[override]
        self, request_iterator: object, context: grpc.aio.ServicerContext[pb.AgentMessage, pb.ManagerMessage]
    ) -> None:
        first = await context.read()
        if not isinstance(first, pb.AgentMessage):  # grpc.aio.EOF: the agent closed the stream at once
            return
        with self._cond:
            self._stream_count += 1
            stream = self._stream_count
        self._record(stream, first)
        if self.reject is not None:
            await context.write(pb.ManagerMessage(reject=self.reject))
            return
        await context.write(pb.ManagerMessage(welcome=self.welcome))
        queue: asyncio.Queue[pb.ManagerMessage] = asyncio.Queue()
        self._streams[stream] = queue

        async def pump() -> None:
            while True:
                await context.write(await queue.get())

        pumping = asyncio.ensure_future(pump())
        try:
            while isinstance(msg := await context.read(), pb.AgentMessage):  # until grpc.aio.EOF
                self._record(stream, msg)
        finally:
            pumping.cancel()
            self._streams.pop(stream, None)

    def _record(self, stream: int, msg: pb.AgentMessage) -> None:
        with self._cond:
            self.received.append(Received(time.monotonic(), stream, msg))
            self._cond.notify_all()

    # -- test helpers -----------------------------------------------------------------------------------------
    def send(self, command: pb.Command, stream: int | None = None) -> None:
        """Send a command on the given stream (default: the newest live one)."""
        def put() -> None:
            target = stream if stream is not None else max(self._streams)
            self._streams[target].put_nowait(pb.ManagerMessage(command=command))
        self._loop.call_soon_threadsafe(put)

    def live_streams(self) -> list[int]:
        return sorted(self._streams)

    def wait_for(self, match: Callable[[Received], bool], timeout_s: float = 10.0, since: int = 0) -> Received:
        """The first received message (from index `since`) that matches; AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for item in self.received[since:]:
                    if match(item):
                        return item
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    kinds = [r.kind for r in self.received[since:]][-20:]
                    raise AssertionError(f"no matching message within {timeout_s}s; last kinds: {kinds}")
                self._cond.wait(left_s)

    def mark(self) -> int:
        with self._cond:
            return len(self.received)

    def result(self, request_id: str, timeout_s: float = 10.0, since: int = 0) -> pb.CommandResult:
        item = self.wait_for(lambda r: r.kind == "result" and r.msg.result.request_id == request_id, timeout_s, since)
        return item.msg.result

    def command(self, request_id: str, timeout_s: float = 10.0, **kind: Any) -> pb.CommandResult:
        """Send a command and wait for its result."""
        since = self.mark()
        self.send(pb.Command(request_id=request_id, timeout_s=timeout_s, **kind))
        return self.result(request_id, timeout_s + 2.0, since)

    def messages(self, kind: str, since: int = 0) -> list[Received]:
        with self._cond:
            return [r for r in self.received[since:] if r.kind == kind]
