"""The floor under the manager's cost per ping: a bare grpc.aio server that only reads its agents' streams, and a
bare load process that only sends pings, on this machine. No validation, no core, no database: what Python gRPC
alone costs per message on each side, with mutual TLS (as in production) and in plaintext.

    .venv/bin/python bench/grpc_floor.py [--agents 1000,2500,5000] [--window-s 20] [--modes tls,plaintext]
                                         [--out grpc_floor.json]

For each mode and agent count: one server process (grpc.aio, the kvmha.v1.AgentLink service with a handler that
answers Hello with a Welcome and then counts messages) and one client process (N grpc.aio streams, each on its own
TCP connection as in bench/manager_load.py, a Ping every 2 s with a random phase, the same Ping a real agent
sends; a stream that fails is opened again, and counted). Once all N streams are open (or after 2 minutes: the
streams open then are reported), the CPU of both processes (utime+stime from /proc over the window) and the
messages the server read give the cost per message on each side. bench/manager_load.py measures the manager with
the same load: the difference between the two is the manager's own work; this floor is what no change to the
manager's own code can remove. Prints a table, writes bench/results/grpc_floor.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from kvmha.proto.v1 import agent_pb2 as pb
from kvmha.proto.v1 import agent_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PING_INTERVAL_S = 2.0
CONNECT_RATE = 200.0  # streams opened per second at most
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_S  # utime + stime


# ----------------------------------------------------------------------------------------------------- server


class Counting(pb_grpc.AgentLinkServicer):
    def __init__(self) -> None:
        self.messages = 0

    async def Connect(
        self, request_iterator: AsyncIterator[pb.AgentMessage], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ManagerMessage]:
        first = await anext(aiter(request_iterator))
        self.messages += 1
        yield pb.ManagerMessage(welcome=pb.Welcome(host_id=1, ping_interval_s=PING_INTERVAL_S,
                                                   manager_id=first.hello.hostname[:1]))
        async for _message in request_iterator:
            self.messages += 1


async def serve(port_file: Path, mode: str, pki_dir: Path) -> None:
    server = grpc.aio.server(options=[("grpc.max_concurrent_streams", 1_000_000)])
    servicer = Counting()
    pb_grpc.add_AgentLinkServicer_to_server(servicer, server)
    if mode == "tls":
        from kvmha.lab.pki import LabPki
        from kvmha.manager.security.auth import server_credentials

        files = LabPki(pki_dir).manager()
        port = server.add_secure_port("127.0.0.1:0", server_credentials(files.cert, files.key, files.ca))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():  # the count, once a second, where the bench reads it
        (port_file.parent / "messages").write_text(str(servicer.messages))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    await server.stop(0)


# ----------------------------------------------------------------------------------------------------- clients


async def agent(target: str, credentials: grpc.ChannelCredentials | None, name: str, opened: list[int],
                failures: list[str]) -> None:
    """One simulated agent; a stream that fails is opened again after 1-2 s (and counted)."""
    counted = False
    while True:
        try:
            await _stream(target, credentials, name, opened, counted)
        except Exception as error:
            failures.append(f"{type(error).__name__}: {str(error)[:200]}")
        counted = True
        await asyncio.sleep(1.0 + random.random())


async def _stream(target: str, credentials: grpc.ChannelCredentials | None, name: str, opened: list[int],
                  counted: bool) -> None:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channel = (grpc.aio.secure_channel(target, credentials, options=options) if credentials is not None
               else grpc.aio.insecure_channel(target, options=options))
    async with channel:
        call = pb_grpc.AgentLinkStub(channel).Connect(None)
        await call.write(pb.AgentMessage(hello=pb.Hello(host_uuid=name, hostname=name)))
        await call.read()
        if not counted:
            opened[0] += 1
        loop = asyncio.get_running_loop()
        next_ping, sequence = loop.time() + random.uniform(0, PING_INTERVAL_S), 0
        while True:
            await asyncio.sleep(max(0.0, next_ping - loop.time()))
            sequence += 1
            await call.write(pb.AgentMessage(ping=pb.Ping(sequence=sequence, hypervisor_connected=True,
                                                          domains_running=3, sent_mono_s=time.monotonic())))
            next_ping += PING_INTERVAL_S * random.uniform(0.95, 1.05)


async def clients(count: int, target: str, mode: str, pki_dir: Path) -> None:
    credentials: list[grpc.ChannelCredentials | None] = [None] * count
    if mode == "tls":
        from kvmha.lab.pki import LabPki

        pki = LabPki(pki_dir)
        credentials = [pki.host(f"floor-{i}", f"00000000-0000-4000-8000-{i:012d}").channel_credentials()
                       for i in range(count)]
    opened, failures = [0], list[str]()
    tasks = []
    for index in range(count):
        tasks.append(asyncio.create_task(agent(target, credentials[index], f"floor-{index}", opened, failures)))
        await asyncio.sleep(1.0 / CONNECT_RATE)
    deadline = time.monotonic() + 120
    while opened[0] < count and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    print(json.dumps({"opened": opened[0], "failures": len(failures), "example": failures[:1]}), flush=True)
    await asyncio.gather(*tasks)


# ----------------------------------------------------------------------------------------------------- bench


def step(mode: str, count: int, window_s: float, tmp: Path) -> dict[str, Any]:
    port_file = tmp / f"{mode}-{count}" / "port"
    port_file.parent.mkdir()
    me = [sys.executable, __file__]
    server = subprocess.Popen([*me, "--serve", str(port_file), "--mode", mode, "--pki", str(tmp / "pki")])
    load: subprocess.Popen[str] | None = None
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        load = subprocess.Popen([*me, "--clients", str(count), "--target", f"127.0.0.1:{port_file.read_text()}",
                                 "--mode", mode, "--pki", str(tmp / "pki")], stdout=subprocess.PIPE, text=True)
        assert load.stdout is not None
        line = load.stdout.readline()
        if not line:
            raise RuntimeError(f"{mode} {count}: the load process ended before its streams were open")
        ready = json.loads(line)  # streams open within 2 min of the ramp, and failed streams so far (retried)
        time.sleep(PING_INTERVAL_S * 2)  # every stream past its first ping
        counted = port_file.parent / "messages"
        messages0, server0, load0, at0 = int(counted.read_text()), cpu_s(server.pid), cpu_s(load.pid), time.monotonic()
        time.sleep(window_s)
        messages1, server1, load1, at1 = int(counted.read_text()), cpu_s(server.pid), cpu_s(load.pid), time.monotonic()
    finally:
        for process in (load, server):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
    elapsed_s, messages = at1 - at0, max(1, messages1 - messages0)
    return {"mode": mode, "agents": count, "streams_opened": ready["opened"], "stream_failures": ready["failures"],
            "stream_failure_example": ready["example"], "window_s": round(elapsed_s, 1),
            "messages_per_s": round(messages / elapsed_s, 1),
            "server_cpu_pct": round(100 * (server1 - server0) / elapsed_s, 1),
            "client_cpu_pct": round(100 * (load1 - load0) / elapsed_s, 1),
            "server_us_per_message": round(1e6 * (server1 - server0) / messages, 1),
            "client_us_per_message": round(1e6 * (load1 - load0) / messages, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", default="1000,2500,5000")
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--modes", default="tls,plaintext")
    parser.add_argument("--out", default="grpc_floor.json", help="results file name in bench/results (PNG alongside)")
    parser.add_argument("--serve", default="", help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--target", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="tls", help=argparse.SUPPRESS)
    parser.add_argument("--pki", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(Path(args.serve), args.mode, Path(args.pki)))
        return 0
    if args.clients:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # nothing to clean up: the streams end with it
        asyncio.run(clients(args.clients, args.target, args.mode, Path(args.pki)))
        return 0

    def terminated(signum: int, _frame: object) -> None:
        raise SystemExit(f"terminated by signal {signum}")  # unwinds: both processes are ended in step()

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, terminated)
    import resource

    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit[1], limit[1]))  # one fd per stream on each side
    results: list[dict[str, Any]] = []
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}")
    print(f"{'mode':>10} {'agents':>7} {'open':>6} {'msg/s':>8} {'server %':>9} {'client %':>9} {'server µs/msg':>14} "
          f"{'client µs/msg':>14}")
    with tempfile.TemporaryDirectory(prefix="kvmha-grpc-floor-") as tmp_name:
        for mode in [m for m in args.modes.split(",") if m]:
            for count in [int(n) for n in args.agents.split(",") if n]:
                result = step(mode, count, args.window_s, Path(tmp_name))
                results.append(result)
                print(f"{mode:>10} {count:>7} {result['streams_opened']:>6} {result['messages_per_s']:>8} "
                      f"{result['server_cpu_pct']:>9} "
                      f"{result['client_cpu_pct']:>9} {result['server_us_per_message']:>14} "
                      f"{result['client_us_per_message']:>14}", flush=True)
    out = RESULTS / Path(args.out).name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ping_interval_s": PING_INTERVAL_S, "cpus": os.cpu_count(), "steps": results},
                              indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"written: {out.relative_to(ROOT)}")
    return 0


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for mode in sorted({r["mode"] for r in results}):
        rows = [r for r in results if r["mode"] == mode]
        agents = [r["agents"] for r in rows]
        axis.plot(agents, [r["server_cpu_pct"] for r in rows], marker="o", label=f"bare server, {mode}")
        axis.plot(agents, [r["client_cpu_pct"] for r in rows], marker="s", linestyle="--", label=f"bare load, {mode}")
    axis.axhline(200, color="grey", linewidth=0.8)
    axis.text(axis.get_xlim()[0], 203, "the machine (2 cores)", fontsize=8, color="grey")
    axis.set_xlabel("agents (a ping every 2 s each)")
    axis.set_ylabel("CPU, % of one core")
    axis.set_title("Python gRPC alone: reading and sending the pings")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
