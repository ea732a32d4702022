"""The agent's channel options end a stream to a manager that stopped answering (SIGSTOP: its kernel still accepts
and acknowledges every byte, only HTTP/2 pings go unanswered), so the agent moves on to its next manager.

Found in the lab (issue 15): with keepalive_time_ms/keepalive_timeout_ms alone, grpcio 1.85 sent the keepalive ping
and never timed it out; the agents stayed on a paused lease holder for minutes and the new holder saw every host
silent. The server here is a bare gRPC process with one bidirectional method; the client sends a message every
second, as an agent's pings do.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from kvmha.agent.link import _GRPC_OPTIONS
from kvmha.lab.bmc import find_free_port

SERVER = """
import asyncio, sys
import grpc

def same(data):
    return data

async def chat(requests, context):
    async for _ in requests:
        pass
    yield b""

async def main():
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.T", {"Chat": grpc.stream_stream_rpc_method_handler(chat, same, same)}),))
    server.add_insecure_port(f"127.0.0.1:{sys.argv[1]}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""
GIVE_UP_S = 60.0  # not a timing assertion: how long to wait before calling the stream stuck


def _same(data: bytes) -> bytes:
    return data


async def _stream_until_it_ends(port: int, server: subprocess.Popen[str]) -> tuple[BaseException, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_GRPC_OPTIONS) as channel:
        chat = channel.stream_stream("/t.T/Chat", request_serializer=_same, response_deserializer=_same)

        async def pings() -> AsyncIterator[bytes]:
            while True:
                yield b"ping" * 10
                await asyncio.sleep(1.0)

        call = chat(pings())
        await asyncio.sleep(1.5)  # the stream is up and the server reads it
        os.kill(server.pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            await asyncio.wait_for(call.read(), GIVE_UP_S)
        except BaseException as error:  # what ended the wait: the transport, or our give-up
            return error, time.monotonic() - stopped_at
        raise AssertionError("the stopped server answered")


@pytest.mark.timeout(120)
def test_a_stream_to_a_stopped_manager_ends() -> None:
    port = find_free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        error, after_s = asyncio.run(_stream_until_it_ends(port, server))
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait(10)
    assert isinstance(error, grpc.aio.AioRpcError), f"the stream was still open after {after_s:.0f} s ({error!r})"
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    print(f"the stream to the stopped server ended after {after_s:.1f} s")
