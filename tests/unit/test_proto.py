"""The wire contract: committed stubs are fresh, and every message survives a round trip through bytes."""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from kvmha.proto.v1 import admin_pb2, agent_pb2

if TYPE_CHECKING:  # what DESCRIPTOR.fields holds with protobuf's C (upb) backend
    from google._upb._message import FieldDescriptor as UpbFieldDescriptor

REPO = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_not_stale(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("kvmha_proto_generate", REPO / "proto" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    written = generate.generate(tmp_path)
    assert written, "the generator wrote nothing"
    committed = REPO / "proto" / "v1"
    stale = [p.name for p in written if not (committed / p.name).exists() or not filecmp.cmp(p, committed / p.name,
                                                                                              shallow=False)]
    extra = {p.name for p in committed.glob("*_pb2*")} - {p.name for p in written}
    assert not stale and not extra, f"stubs in proto/v1 are stale (run `make proto`): {stale} {sorted(extra)}"


def _fill(message: Message, depth: int = 0) -> Message:
    """Set every field (each oneof member gets its own message in _variants) to a distinctive non-default value."""
    descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        if field.containing_oneof is not None and message.WhichOneof(field.containing_oneof.name) is not None:
            continue
        _set(message, field, depth)
    return message


def _scalar(field: FieldDescriptor | UpbFieldDescriptor) -> object:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-värde"
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 1.5
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None, field.full_name
        return field.enum_type.values[-1].number
    if kind == FieldDescriptor.TYPE_BYTES:
        return b"\x00\xff"
    return 7 if field.number % 2 else -3 if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64) else 9


def _set(message: Message, field: FieldDescriptor | UpbFieldDescriptor, depth: int) -> None:
    repeated = field.is_repeated
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if depth > 4:
            return
        if repeated:
            _fill(getattr(message, field.name).add(), depth + 1)
        else:
            _fill(getattr(message, field.name), depth + 1)
            getattr(message, field.name).SetInParent()
    elif repeated:
        getattr(message, field.name).append(_scalar(field))
    else:
        setattr(message, field.name, _scalar(field))


def _variants(descriptor: Descriptor) -> list[Message]:
    """One filled message per member of each oneof, so every member is exercised."""
    cls = message_factory.GetMessageClass(descriptor)
    variants = [_fill(cls())]
    for oneof in descriptor.oneofs:
        for field in oneof.fields:
            message = cls()
            _set(message, field, 0)
            variants.append(_fill(message))
    return variants


ALL_MESSAGES = [d for module in (agent_pb2, admin_pb2) for d in module.DESCRIPTOR.message_types_by_name.values()]


@pytest.mark.parametrize("descriptor", ALL_MESSAGES, ids=lambda d: d.full_name)
def test_every_message_round_trips(descriptor: Descriptor) -> None:
    for original in _variants(descriptor):
        data = original.SerializeToString()
        decoded = type(original).FromString(data)
        assert decoded == original
        if descriptor.fields:
            assert decoded.ListFields(), "the filler left the message empty"


def test_services_have_the_contracted_methods() -> None:
    link = agent_pb2.DESCRIPTOR.services_by_name["AgentLink"].methods_by_name["Connect"]
    assert link.client_streaming and link.server_streaming
    admin = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    assert {"ListHosts", "SetMaintenance", "CreateVm", "ListHaWork", "FollowEvents", "SetConfig"} <= set(
        admin.methods_by_name
    )
    hello = {f.name for f in agent_pb2.Hello.DESCRIPTOR.fields}
    assert {"host_uuid", "hostname", "management_address", "capacity", "libvirt_version", "qemu_version",
            "agent_version", "protocol_version"} <= hello
    command_kinds = {f.name for f in agent_pb2.Command.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert command_kinds == {
        "start_vm", "stop_vm", "destroy_vm", "check_neighbor", "get_capacity", "check_lease", "migrate_vm",
        "cancel_migration",
    }
