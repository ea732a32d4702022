"""Field-by-field validation of every message an agent sends, before it is translated (translate.py).

Walks the message through its protobuf descriptor, so every field of every message is checked, including fields
added to the proto later (they get the defaults below until someone gives them a rule):

- strings: no control characters (NUL, ESC, ...) and at most MAX_CHARS[field] characters (default 255, the
  database's name columns);
- floating point: finite, and non-negative unless the field is in SIGNED (a NaN or infinity would stick in the
  core's comparisons: "fresh" would read as "stale");
- unsigned integers: at most 2^31 - 1 (the database's Integer columns on PostgreSQL and MariaDB), sequence
  numbers (WIDE) at most 2^63 - 1;
- enums: a value the proto declares (proto3 keeps unknown numbers);
- repeated fields: at most MAX_ITEMS[field] entries (default 1024).

A violation raises WireError naming the field path and the rule; the stream is then ended (agent_link.py), so a
bad message never reaches the core or the database.
"""

from __future__ import annotations

import math
import re

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from kvmha.manager.adapters.translate import MAX_DOMAINS_PER_REPORT, WireError

MAX_INT_COLUMN = 2**31 - 1
MAX_WIDE = 2**63 - 1
MAX_SECONDS = 1e9  # ~31 years: any duration an agent reports is far below
DEFAULT_MAX_CHARS = 255
DEFAULT_MAX_ITEMS = 1024
_LONG_TEXT, _PATH = 2000, 4096
MAX_CHARS = {
    "message": _LONG_TEXT, "error": _LONG_TEXT, "detail": _LONG_TEXT, "reason": _LONG_TEXT,
    "path": _PATH, "storage_paths": _PATH, "disk_path": _PATH, "lease_path": _PATH, "lockspace_dir": _PATH,
    "file_lockspace_dir": _PATH, "agent_version": 64, "libvirt_version": 64, "qemu_version": 64, "boot_id": 64,
    "identity": _LONG_TEXT, "mount": _PATH, "request_id": 128, "uuid": 64, "host_uuid": 64, "vm_uuid": 64,
}
MAX_ITEMS = {"domains": MAX_DOMAINS_PER_REPORT, "storage_paths": 64, "storage": 64, "mounts": 256, "networks": 256}
# Negative means "none": a heartbeat never written, or not found (the agents send -1 then).
SIGNED = {"kvmha.v1.StorageHeartbeatStatus.last_ok_age_s", "kvmha.v1.NeighborReport.heartbeat_age_s"}
WIDE = {"kvmha.v1.Ping.sequence", "kvmha.v1.PowerStateReport.sequence"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FLOATS = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
_UNSIGNED = (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32,
             FieldDescriptor.TYPE_FIXED64)


def check(message: Message, path: str = "") -> None:
    """Raise WireError at the first field of `message` (recursively) that breaks a rule."""
    descriptor = message.DESCRIPTOR
    for field, value in message.ListFields():
        where = f"{path or descriptor.name}.{field.name}"
        if field.is_repeated:
            limit = MAX_ITEMS.get(field.name, DEFAULT_MAX_ITEMS)
            if len(value) > limit:
                raise WireError(f"{where}: {len(value)} entries, more than {limit}")
            for index, item in enumerate(value):
                _check_value(field, item, f"{where}[{index}]")
        else:
            _check_value(field, value, where)


def _check_value(field: FieldDescriptor, value: object, where: str) -> None:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        check(value, where)
    elif kind == FieldDescriptor.TYPE_STRING:
        assert isinstance(value, str)
        limit = MAX_CHARS.get(field.name, DEFAULT_MAX_CHARS)
        if len(value) > limit:
            raise WireError(f"{where}: {len(value)} characters, more than {limit}")
        control = _CONTROL.search(value)
        if control is not None:
            raise WireError(f"{where}: control character {control[0]!r} in {value[:40]!r}")
    elif kind in _FLOATS:
        assert isinstance(value, float)
        if not math.isfinite(value):
            raise WireError(f"{where}: {value} is not a finite number")
        low = -MAX_SECONDS if field.full_name in SIGNED else 0.0
        if not low <= value <= MAX_SECONDS:
            raise WireError(f"{where}: {value} is outside [{low:g}, {MAX_SECONDS:g}]")
    elif kind in _UNSIGNED:
        assert isinstance(value, int)
        limit = MAX_WIDE if field.full_name in WIDE else MAX_INT_COLUMN
        if value > limit:
            raise WireError(f"{where}: {value} is more than {limit}")
    elif kind == FieldDescriptor.TYPE_ENUM:
        assert isinstance(value, int) and field.enum_type is not None
        if value not in field.enum_type.values_by_number:
            raise WireError(f"{where}: {value} is not a known {field.enum_type.name}")
