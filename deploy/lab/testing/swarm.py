"""A swarm of simulated agents for tests: `count` healthy hosts on real gRPC streams to a manager, run by an asyncio
loop in a background thread of the test process.

Each says Hello (a fresh host uuid, hostname `<prefix>-NNNN`), sends a full power report of no domains, then a Ping
every `ping_interval_s` (random phase, ±5 % jitter), and declines every command (it sees no other host). A stream
that breaks is opened again after 0.5-1.5 s, as the real agent reconnects (it backs off further; sooner is harder
on the manager). Plaintext only (the manager must allow it, e.g. on loopback). `stop()` ends every stream and the
thread; use it as a context manager.
"""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from types import TracebackType
from typing import Self

import grpc

from kvmha.lab.pki import LabPki
from kvmha.proto.v1 import agent_pb2 as pb
from kvmha.proto.v1 import agent_pb2_grpc

CONNECTS_IN_FLIGHT = 32


class Swarm:
    def __init__(self, link: str, count: int, ping_interval_s: float, prefix: str = "swarm",
                 pki: LabPki | None = None) -> None:
        """`pki`: the manager's lab CA (mutual TLS, each agent with its own host certificate); None: plaintext."""
        self.link, self.count, self.ping_interval_s = link, count, ping_interval_s
        self._pki = pki
        self.names = [f"{prefix}-{index:04d}" for index in range(count)]
        self.connected: set[str] = set()
        self.reconnects = 0  # streams opened again after one broke
        self.last_error = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm", daemon=True)
        self._tasks: list[asyncio.Task[None]] = []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_all(), self._loop).result(timeout=120)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._cancel_all(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start_all(self) -> None:
        gate = asyncio.Semaphore(CONNECTS_IN_FLIGHT)
        ready = [asyncio.Event() for _ in self.names]
        for name, event in zip(self.names, ready, strict=True):
            host_uuid = str(uuid.uuid4())
            credentials = self._pki.host(name, host_uuid).channel_credentials() if self._pki else None
            self._tasks.append(asyncio.create_task(self._agent(name, host_uuid, gate, event, credentials)))
        await asyncio.gather(*(event.wait() for event in ready))

    async def _cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _agent(self, name: str, host_uuid: str, gate: asyncio.Semaphore, ready: asyncio.Event,
                     credentials: grpc.ChannelCredentials | None) -> None:
        first = True
        options = [("grpc.use_local_subchannel_pool", 1)]
        while True:
            try:
                channel = (grpc.aio.secure_channel(self.link, credentials, options=options) if credentials
                           else grpc.aio.insecure_channel(self.link, options=options))
                async with channel:
                    async with gate if first else _Nothing():
                        call = await self._hello(channel, name, host_uuid)
                    ready.set()
                    self.connected.add(name)
                    await self._serve(call)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the stream broke: reconnect as an agent would
                self.last_error = f"{name}: {type(error).__name__}: {str(error)[:200]}"
            finally:
                self.connected.discard(name)
            ready.set()
            if not first:
                self.reconnects += 1
            first = False
            await asyncio.sleep(0.5 + random.random())

    @staticmethod
    async def _hello(channel: grpc.aio.Channel, name: str,
                     host_uuid: str) -> grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ManagerMessage]:
        call = agent_pb2_grpc.AgentLinkStub(channel).Connect(None)
        await call.write(pb.AgentMessage(hello=pb.Hello(
            host_uuid=host_uuid, hostname=name, management_address="127.0.0.1",
            capacity=pb.Capacity(cpus=16, memory_mib=65536, free_memory_mib=60000), agent_version="swarm",
            protocol_version=pb.PROTOCOL_VERSION_CURRENT, boot_id=str(uuid.uuid4()))))
        welcome = await call.read()
        if not isinstance(welcome, pb.ManagerMessage) or welcome.WhichOneof("msg") != "welcome":
            call.cancel()
            raise RuntimeError(f"no Welcome: {welcome}")
        await call.write(pb.AgentMessage(power=pb.PowerStateReport(full=True, hypervisor_connected=True, sequence=1)))
        return call

    async def _serve(self, call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ManagerMessage]) -> None:
        lock = asyncio.Lock()
        reader = asyncio.create_task(self._answer(call, lock))
        loop = asyncio.get_running_loop()
        next_ping, sequence = loop.time() + random.uniform(0, self.ping_interval_s), 1
        try:
            while not reader.done():
                await asyncio.sleep(max(0.0, next_ping - loop.time()))
                sequence += 1
                async with lock:
                    await call.write(pb.AgentMessage(ping=pb.Ping(sequence=sequence, hypervisor_connected=True)))
                next_ping += self.ping_interval_s * random.uniform(0.95, 1.05)
            await reader
            raise RuntimeError("the manager ended the stream")
        finally:
            reader.cancel()
            call.cancel()

    @staticmethod
    async def _answer(call: grpc.aio.StreamStreamCall[pb.AgentMessage, pb.ManagerMessage], lock: asyncio.Lock) -> None:
        while True:
            message = await call.read()
            if not isinstance(message, pb.ManagerMessage):  # EOF
                return
            if message.WhichOneof("msg") != "command":
                continue
            # A swarm agent sees no other host and runs no VM: it declines every command (a neighbour check it
            # cannot make is no evidence either way; the BMC decides).
            result = pb.CommandResult(request_id=message.command.request_id, ok=False,
                                      code=pb.ERROR_UNKNOWN_COMMAND, message="a swarm agent cannot do that")
            async with lock:
                await call.write(pb.AgentMessage(result=result))


class _Nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *args: object) -> None:
        return None
