"""Field-by-field wire validation (manager/adapters/wirecheck.py): each rule, on every kind of agent message."""

from __future__ import annotations

import math

import pytest

from kvmha.manager.adapters import wirecheck
from kvmha.manager.adapters.translate import WireError
from kvmha.proto.v1 import agent_pb2 as pb

UUID = "7f0e2c52-6f7c-4d2b-9f55-1c1b6fe1a0a1"


def honest() -> list[pb.AgentMessage]:
    """What a real agent sends, including its 'none' values (-1 ages, empty strings)."""
    return [
        pb.AgentMessage(hello=pb.Hello(host_uuid=UUID, hostname="h1", management_address="10.0.0.1",
                                       capacity=pb.Capacity(cpus=64, memory_mib=2**31 - 1, free_memory_mib=10),
                                       protocol_version=1, boot_id=UUID, storage_paths=["/srv/shared"],
                                       watchdog=pb.WatchdogStatus(armed=True, timeout_s=20, device="/dev/watchdog"),
                                       isolation_policy="destroy-vms")),
        pb.AgentMessage(ping=pb.Ping(sequence=2**63 - 1, hypervisor_connected=True, storage=[
            pb.StorageHeartbeatStatus(path="/srv/shared", ok=False, last_ok_age_s=-1.0, error="EIO")])),
        pb.AgentMessage(power=pb.PowerStateReport(full=True, sequence=7, domains=[
            pb.DomainPower(uuid=UUID, name="vm-1", state=pb.POWER_CRASHED, cause=pb.CAUSE_CRASHED, libvirt_event=-1,
                           libvirt_detail=-1, detail_text="CRASHED_PANICKED")])),
        pb.AgentMessage(result=pb.CommandResult(request_id="m1.7", ok=True, neighbor=pb.NeighborReport(
            host_uuid=UUID, heartbeat_found=False, heartbeat_age_s=-1.0))),
        pb.AgentMessage(result=pb.CommandResult(request_id="m1.8", ok=True, lease=pb.LeaseReport(
            vm_uuid=UUID, state=pb.LEASE_FREE, disks=[pb.DiskLease(disk_path="/srv/d.qcow2", holder_pid=-1)]))),
        pb.AgentMessage(goodbye=pb.Goodbye(reason="SIGTERM")),
    ]


def test_honest_messages_pass() -> None:
    for message in honest():
        wirecheck.check(message)


def bad(change: str) -> pb.AgentMessage:
    hello, ping, power, neighbor, lease, _ = honest()
    mutations = {
        "uint-over-int-column": lambda: setattr(hello.hello.capacity, "memory_mib", 2**31),
        "uint64-max": lambda: setattr(hello.hello.capacity, "free_memory_mib", 2**64 - 1),
        "nul": lambda: setattr(power.power.domains[0], "name", "a\x00b"),
        "escape": lambda: setattr(hello.hello, "agent_version", "1.0\x1b[31m"),
        "too-long": lambda: setattr(hello.hello, "hostname", "h" * 256),
        "nan": lambda: setattr(neighbor.result.neighbor, "heartbeat_age_s", math.nan),
        "inf": lambda: setattr(hello.hello.watchdog, "timeout_s", math.inf),
        "negative": lambda: setattr(hello.hello.watchdog, "device_timeout_s", -5.0),
        "unknown-enum": lambda: setattr(lease.result.lease.disks[0], "state", 9),
        "too-many": lambda: ping.ping.storage.extend([pb.StorageHeartbeatStatus(path="/x")] * 64),
    }
    mutations[change]()
    return {"uint-over-int-column": hello, "uint64-max": hello, "nul": power, "escape": hello, "too-long": hello,
            "nan": neighbor, "inf": hello, "negative": hello, "unknown-enum": lease, "too-many": ping}[change]


@pytest.mark.parametrize(("change", "words"), [
    ("uint-over-int-column", "AgentMessage.hello.capacity.memory_mib: 2147483648 is more than 2147483647"),
    ("uint64-max", "free_memory_mib: 18446744073709551615 is more than"),
    ("nul", "AgentMessage.power.domains[0].name: control character '\\x00'"),
    ("escape", "AgentMessage.hello.agent_version: control character '\\x1b'"),
    ("too-long", "AgentMessage.hello.hostname: 256 characters, more than 255"),
    ("nan", "heartbeat_age_s: nan is not a finite number"),
    ("inf", "AgentMessage.hello.watchdog.timeout_s: inf is not a finite number"),
    ("negative", "device_timeout_s: -5.0 is outside [0, 1e+09]"),
    ("unknown-enum", "AgentMessage.result.lease.disks[0].state: 9 is not a known LeaseState"),
    ("too-many", "AgentMessage.ping.storage: 65 entries, more than 64"),
])
def test_each_rule_names_the_field(change: str, words: str) -> None:
    with pytest.raises(WireError) as refused:
        wirecheck.check(bad(change))
    assert words in str(refused.value)


def test_every_string_field_of_the_agent_protocol_has_a_reasonable_limit() -> None:
    """A walk of the descriptors: no string field is unbounded, every long one is named in MAX_CHARS."""
    seen: set[str] = set()

    def walk(descriptor: object) -> None:
        for field in descriptor.fields:  # type: ignore[attr-defined]
            if field.full_name in seen:
                continue
            seen.add(field.full_name)
            if field.message_type is not None:
                walk(field.message_type)
            elif field.type == field.TYPE_STRING:
                assert wirecheck.MAX_CHARS.get(field.name, wirecheck.DEFAULT_MAX_CHARS) <= 4096

    walk(pb.AgentMessage.DESCRIPTOR)
    assert "kvmha.v1.Hello.host_uuid" in seen and "kvmha.v1.DiskLease.detail" in seen
