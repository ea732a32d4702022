"""Fuzzing the manager's AgentLink port over mutual TLS, with an honest agent and an operator working beside it.

A real `kvmha-manager` (kvmha.lab.testing.local.LocalCluster: SQLite, mutual TLS, the lab's CA) with one real agent
("honest", libvirt's test driver, running the HA VM "web"). Then, from a seeded generator:

- welcomed streams: a pool of fuzz hosts, each with a valid host certificate, says a valid Hello, is welcomed, and
  sends messages generated from the proto descriptors (most within the rules so the stream lives on, some with a
  field broken: NaN, 2^64-1, NUL, unknown enums, oversize strings, too many entries); at least half of all
  messages go on such streams, past the handshake;
- handshake streams: a generated (often broken) Hello as the first message;
- raw frames: the HTTP/2 preface and random or truncated frames inside a TLS session with a valid certificate, and
  random bytes on plain TCP.

Meanwhile an operator (operator role) toggles HA on "web" and lists hosts, timing every call. Reported: manager
crashes, tracebacks in its log, leaked sessions (hosts still shown connected after every fuzz stream ended), the
honest host's status throughout, the manager's RSS growth, the slowest operator call. JSON + PNG in bench/results.

    .venv/bin/python bench/fuzz_agentlink.py                  # 100,000 messages (a few minutes)
    .venv/bin/python bench/fuzz_agentlink.py --messages 3000  # the short version `make test` runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import uuid as uuid_module
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from kvmha.lab.domain import domain_xml
from kvmha.lab.pki import LabPki
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.manager.security.roles import Role
from kvmha.proto.v1 import admin_pb2 as apb
from kvmha.proto.v1 import admin_pb2_grpc, agent_pb2_grpc
from kvmha.proto.v1 import agent_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
FAST = {"ping.interval": "1", "ping.timeout": "4", "startup.grace": "4"}
POOL = 8  # fuzz hosts streaming at once (each its own certificate)
MAX_PER_STREAM = 60


@dataclass
class Tally:
    messages: int = 0
    welcomed_messages: int = 0
    handshake_messages: int = 0
    raw_messages: int = 0
    welcomed_streams: int = 0
    refused_streams: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    operator_calls: int = 0
    operator_failures: int = 0
    slowest_operator_call_s: float = 0.0
    honest_not_up_samples: int = 0
    rss_kib: list[tuple[float, int]] = field(default_factory=list)

    def status(self, code: grpc.StatusCode | None) -> None:
        name = code.name if code is not None else "NONE"
        self.statuses[name] = self.statuses.get(name, 0) + 1


# ---------------------------------------------------------------------------------------------- generation

_INT_EDGES = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1]
_SINT_EDGES = [0, -1, 1, -(2**31), 2**31 - 1]
_FLOATS = [0.0, 0.5, 3.0, -1.0, math.nan, math.inf, -math.inf, 1e308, 1e9 + 1]
_STRINGS = ["", "x", "h1", "a\x00b", "\x1b[31mred", "é" * 10, "y" * 300, "z" * 5000, "../../etc/passwd"]


class Generator:
    """Messages from the proto descriptors. `valid` keeps every field within wirecheck's rules."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def message(self, descriptor: Any, valid: bool, depth: int = 0) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for fd in descriptor.fields:
            if self.rng.random() < 0.5 or (fd.message_type is not None and depth >= 3):
                continue
            if fd.containing_oneof is not None and any(
                    other.name in values for other in fd.containing_oneof.fields):
                continue
            if fd.is_repeated:
                count = self.rng.choice([0, 1, 2, 3]) if valid or self.rng.random() < 0.9 else 1100
                values[fd.name] = [self.value(fd, valid, depth) for _ in range(count)]
            else:
                values[fd.name] = self.value(fd, valid, depth)
        return values

    def value(self, fd: Any, valid: bool, depth: int) -> Any:
        rng, kind = self.rng, fd.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            return self.message(fd.message_type, valid, depth + 1)
        if kind == FieldDescriptor.TYPE_STRING:
            if valid:  # a few domain uuids only: valid reports must not register thousands of unmanaged VMs
                return str(uuid_module.UUID(int=rng.randrange(4))) if "uuid" in fd.name else f"s{rng.randrange(99)}"
            return rng.choice(_STRINGS)
        if kind == FieldDescriptor.TYPE_BOOL:
            return rng.random() < 0.5
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return rng.uniform(0, 100) if valid else rng.choice(_FLOATS)
        if kind == FieldDescriptor.TYPE_ENUM:
            numbers = list(fd.enum_type.values_by_number)
            return rng.choice(numbers) if valid else rng.choice([*numbers, 99, -5])
        if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_INT64):
            return rng.randrange(100) if valid else rng.choice(_SINT_EDGES)
        return rng.randrange(1000) if valid else rng.choice(_INT_EDGES)

    def agent_message(self, kinds: tuple[str, ...], valid: bool) -> pb.AgentMessage:
        kind = self.rng.choice(kinds)
        body = self.message(pb.AgentMessage.DESCRIPTOR.fields_by_name[kind].message_type, valid)
        message = pb.AgentMessage()
        try:
            getattr(message, kind).CopyFrom(_build(getattr(pb, _type_name(kind)), body))
        except (ValueError, TypeError):  # a value the protobuf runtime itself refuses to encode
            getattr(message, kind).SetInParent()
        return message


def _type_name(kind: str) -> str:
    return {"hello": "Hello", "ping": "Ping", "power": "PowerStateReport", "result": "CommandResult",
            "goodbye": "Goodbye"}[kind]


def _build(cls: Any, values: dict[str, Any]) -> Message:
    message: Message = cls()
    for name, value in values.items():
        fd = message.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if fd.is_repeated:
            for item in value:
                if fd.message_type is not None:
                    target.add().CopyFrom(_build(_class_of(fd), item))
                else:
                    target.append(item)
        elif fd.message_type is not None:
            target.CopyFrom(_build(_class_of(fd), value))
        else:
            setattr(message, name, value)
    return message


def _class_of(fd: Any) -> Any:
    return getattr(pb, fd.message_type.name)


# ---------------------------------------------------------------------------------------------- the fuzzers


def hello(host_uuid: str, name: str) -> pb.AgentMessage:
    return pb.AgentMessage(hello=pb.Hello(host_uuid=host_uuid, hostname=name, management_address="127.0.0.1",
                                          capacity=pb.Capacity(cpus=4, memory_mib=4096), agent_version="fuzz",
                                          protocol_version=pb.PROTOCOL_VERSION_CURRENT, boot_id=name))


class Fuzzer:
    def __init__(self, cluster: LocalCluster, seed: int, tally: Tally) -> None:
        self.cluster, self.tally = cluster, tally
        self.link = f"127.0.0.1:{cluster.agent_port}"
        self.gen = Generator(seed)
        self.pki: LabPki = cluster.pki
        self.pool = [(f"fuzz{i}", str(uuid_module.UUID(int=random.Random(seed + i).getrandbits(128))))
                     for i in range(POOL)]
        self.credentials = {uuid: self.pki.host(name, uuid).channel_credentials() for name, uuid in self.pool}

    async def welcomed_stream(self, name: str, host_uuid: str, budget: int) -> int:
        """A valid Hello, then generated messages until the manager ends the stream or `budget` is spent."""
        sent = 0
        async with grpc.aio.secure_channel(self.link, self.credentials[host_uuid]) as channel:
            call = agent_pb2_grpc.AgentLinkStub(channel).Connect(None, timeout=30)
            try:
                await call.write(hello(host_uuid, name))
                first = await call.read()
                if not isinstance(first, pb.ManagerMessage) or first.WhichOneof("msg") != "welcome":
                    self.tally.status(await call.code())
                    return 0
                self.tally.welcomed_streams += 1
                for _ in range(min(budget, MAX_PER_STREAM)):
                    valid = self.gen.rng.random() < 0.95
                    await call.write(self.gen.agent_message(("ping", "power", "result"), valid))
                    sent += 1
                    if not valid:
                        break
                else:
                    await call.write(pb.AgentMessage(goodbye=pb.Goodbye(reason="fuzz round done")))
                await call.done_writing()
                while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    pass  # commands the manager sends (neighbour checks): not answered
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                pass
            self.tally.status(await call.code())
        return sent

    async def handshake_stream(self) -> int:
        message = self.gen.agent_message(("hello", "ping", "power"), valid=self.gen.rng.random() < 0.2)
        claimed = message.hello.host_uuid if message.WhichOneof("msg") == "hello" else ""
        try:
            claimed = str(uuid_module.UUID(claimed))
        except ValueError:
            claimed = self.pool[0][1]
        credentials = self.pki.host(f"h-{claimed}", claimed).channel_credentials()
        async with grpc.aio.secure_channel(self.link, credentials) as channel:
            call = agent_pb2_grpc.AgentLinkStub(channel).Connect(iter([message]), timeout=15)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError:
                pass
            self.tally.refused_streams += 1
            self.tally.status(await call.code())
        return 1

    def raw(self, count: int) -> int:
        """HTTP/2 preface plus random or truncated frames inside TLS (valid certificate), random bytes on TCP."""
        files = self.pki.host(self.pool[0][0], self.pool[0][1])
        context = ssl.create_default_context(cafile=str(files.ca))
        context.load_cert_chain(str(files.cert), str(files.key))
        context.set_alpn_protocols(["h2"])
        rng = self.gen.rng
        for index in range(count):
            junk = rng.randbytes(rng.randrange(1, 2000))
            with socket.create_connection(("127.0.0.1", self.cluster.agent_port), timeout=5) as sock:
                try:
                    if index % 3 == 0:
                        sock.sendall(junk)  # not even TLS
                    else:
                        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
                            frame = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + junk
                            tls.sendall(frame[: rng.randrange(1, len(frame) + 1)] if index % 3 == 1 else frame)
                            tls.settimeout(2)
                            while tls.recv(65536):
                                pass
                except (OSError, ssl.SSLError):
                    pass
        return count

    async def run(self, total: int) -> None:
        welcomed_target = total * 6 // 10
        raw_count = max(1, total // 50)
        handshakes = total - welcomed_target - raw_count
        per_host = welcomed_target // POOL + 1

        async def host_loop(name: str, host_uuid: str) -> None:
            left, refusals = per_host, 0
            while left > 0 and refusals < 50:
                sent = await self.welcomed_stream(name, host_uuid, left)
                refusals += sent == 0
                left -= sent
                self.tally.welcomed_messages += sent

        async def handshake_loop(count: int) -> None:
            for _ in range(count):
                sent = await self.handshake_stream()  # not `+= await`: the += would read before the await
                self.tally.handshake_messages += sent

        raw_task = asyncio.to_thread(self.raw, raw_count)
        results = await asyncio.gather(*(host_loop(n, u) for n, u in self.pool),
                                       *(handshake_loop(handshakes // 4 + 1) for _ in range(4)), raw_task)
        self.tally.raw_messages = int(results[-1] or 0)
        self.tally.messages = self.tally.welcomed_messages + self.tally.handshake_messages + self.tally.raw_messages


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def operator_loop(cluster: LocalCluster, tally: Tally, stop: threading.Event, pid: int, t0: float) -> None:
    """An operator at work: HA off/on for "web" and a host listing, each timed; the honest host watched."""
    channel = grpc.secure_channel(cluster.admin_address, cluster.pki.operator(Role.OPERATOR).channel_credentials())
    stub = admin_pb2_grpc.AdminServiceStub(channel)
    enabled = True
    while not stop.is_set():
        began = time.monotonic()
        try:
            enabled = not enabled
            stub.SetVmHa(apb.SetVmHaRequest(vm="web", enabled=enabled), timeout=30)
            hosts = {h.name: h for h in stub.ListHosts(apb.ListHostsRequest(), timeout=30).hosts}
            if hosts["honest"].status != "Up":
                tally.honest_not_up_samples += 1
        except grpc.RpcError:
            tally.operator_failures += 1
        tally.operator_calls += 2
        tally.slowest_operator_call_s = max(tally.slowest_operator_call_s, time.monotonic() - began)
        tally.rss_kib.append((time.monotonic() - t0, rss_kib(pid)))
        stop.wait(0.5)
    channel.close()


@dataclass
class Report:
    seed: int
    messages: int
    welcomed_messages: int
    welcomed_share: float
    handshake_messages: int
    raw_messages: int
    welcomed_streams: int
    statuses: dict[str, int]
    duration_s: float
    manager_crashed: bool
    tracebacks_in_log: int
    stream_failures_in_log: int  # event=stream_failed: a message the manager could not translate (a bug)
    stream_errors: dict[str, int]  # why the manager ended streams (its log), by the first words of the error
    leaked_sessions: list[str]
    honest_up_at_end: bool
    honest_not_up_samples: int
    operator_calls: int
    operator_failures: int
    slowest_operator_call_s: float
    rss_start_kib: int
    rss_end_kib: int
    rss_growth_kib: int


def fuzz(total: int, seed: int, workdir: Path) -> tuple[Report, Tally]:
    cluster = LocalCluster(workdir, f"sqlite:///{workdir / 'kvmha.sqlite'}", core_config=FAST)
    try:
        manager = cluster.start_manager()
        assert manager.process is not None
        pid = manager.process.pid
        cluster.start_agent("honest")
        cluster.wait_hosts_up(["honest"], 60)
        cluster.admin().CreateVm(apb.CreateVmRequest(domain_xml=domain_xml("web", domain_type="test"),
                                                     ha_enabled=True, start=True), timeout=30)
        wait_for(lambda: cluster.vms()["web"].state == "Running", 60, "web Running")
        tally, stop, t0 = Tally(), threading.Event(), time.monotonic()
        rss_start = rss_kib(pid)
        operator = threading.Thread(target=operator_loop, args=(cluster, tally, stop, pid, t0), daemon=True)
        operator.start()
        asyncio.run(Fuzzer(cluster, seed, tally).run(total))
        duration_s = time.monotonic() - t0
        stop.set()
        operator.join(60)
        crashed = not manager.alive
        leaked: list[str] = []
        honest_up = False
        if not crashed:
            # Every fuzz stream has ended: only the honest host may still show a connected agent.
            def settled() -> list[str] | None:
                hosts = cluster.hosts()
                open_ = sorted(n for n, h in hosts.items() if h.connected and n != "honest")
                return None if open_ else open_
            try:
                wait_for(lambda: settled() is not None and [True], 15, "fuzz streams released")
            except TimeoutError:
                leaked = sorted(n for n, h in cluster.hosts().items() if h.connected and n != "honest")
            honest_up = cluster.hosts()["honest"].status == "Up"
        log = manager.log()
        rss_end = rss_kib(pid) if not crashed else 0
        return Report(
            seed=seed, messages=tally.messages, welcomed_messages=tally.welcomed_messages,
            welcomed_share=tally.welcomed_messages / max(tally.messages, 1),
            handshake_messages=tally.handshake_messages, raw_messages=tally.raw_messages,
            welcomed_streams=tally.welcomed_streams, statuses=tally.statuses, duration_s=round(duration_s, 1),
            manager_crashed=crashed, tracebacks_in_log=log.count("Traceback"),
            stream_failures_in_log=log.count("event=stream_failed"), stream_errors=_reasons(log),
            leaked_sessions=leaked,
            honest_up_at_end=honest_up, honest_not_up_samples=tally.honest_not_up_samples,
            operator_calls=tally.operator_calls, operator_failures=tally.operator_failures,
            slowest_operator_call_s=round(tally.slowest_operator_call_s, 3), rss_start_kib=rss_start,
            rss_end_kib=rss_end, rss_growth_kib=rss_end - rss_start), tally
    finally:
        cluster.close()


def _reasons(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in log.splitlines():
        for marker in ("event=stream_error", "event=agent_rejected"):
            if marker in line and ("error=" in line or "reason=" in line):
                text = line.split("error=" if "error=" in line else "reason=", 1)[1]
                key = re.sub(r"[0-9a-f-]{36}|\d+|'.*?'|\[.*?\]", "#", text)[:60]
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:12])


def plot(tally: Tally, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([t for t, _ in tally.rss_kib], [kib / 1024 for _, kib in tally.rss_kib])
    ax.set_xlabel("seconds into the fuzz run")
    ax.set_ylabel("manager RSS (MiB)")
    ax.set_title("kvmha-manager under AgentLink fuzzing (mutual TLS)")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--no-results", action="store_true", help="do not write bench/results (the short test)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvmha-fuzz-") as tmp:
        report, tally = fuzz(args.messages, args.seed, Path(tmp))
    print(json.dumps(asdict(report), indent=2))
    if not args.no_results:
        out = ROOT / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "fuzz_agentlink.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
        plot(tally, out / "fuzz_agentlink.png")
    ok = (not report.manager_crashed and not report.leaked_sessions and report.honest_up_at_end
          and report.tracebacks_in_log == 0 and report.operator_failures == 0 and report.stream_failures_in_log == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
