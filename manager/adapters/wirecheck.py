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
from collections.abc import Callable, Iterable, Sized

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
    _check(message, (path or message.DESCRIPTOR.name,))


# Where a value sits: field names and list indices, joined into "AgentMessage.power.domains[0].name" only for an
# error. Every agent message passes here (thousands per second at thousands of agents): the rules are decided once
# per field descriptor, not per value, and no path text is built for a value that is fine.
Where = tuple[str | int, ...]
Rule = Callable[[object, Where], None]
_RULES: dict[FieldDescriptor, Rule] = {}


def _check(message: Message, where: Where) -> None:
    for field, value in message.ListFields():
        rule = _RULES.get(field)
        if rule is None:
            rule = _RULES[field] = _rule(field)
        rule(value, (*where, field.name))


def _text(where: Where) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in where)[1:]


def _rule(field: FieldDescriptor) -> Rule:
    one = _value_rule(field)
    if not field.is_repeated:
        return one
    limit = MAX_ITEMS.get(field.name, DEFAULT_MAX_ITEMS)

    def repeated(value: object, where: Where) -> None:
        assert isinstance(value, Sized) and isinstance(value, Iterable)
        if len(value) > limit:
            raise WireError(f"{_text(where)}: {len(value)} entries, more than {limit}")
        for index, item in enumerate(value):
            one(item, (*where, index))

    return repeated


def _value_rule(field: FieldDescriptor) -> Rule:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        def message(value: object, where: Where) -> None:
            assert isinstance(value, Message)
            _check(value, where)
        return message
    if kind == FieldDescriptor.TYPE_STRING:
        max_chars = MAX_CHARS.get(field.name, DEFAULT_MAX_CHARS)

        def string(value: object, where: Where) -> None:
            assert isinstance(value, str)
            if len(value) > max_chars:
                raise WireError(f"{_text(where)}: {len(value)} characters, more than {max_chars}")
            control = _CONTROL.search(value)
            if control is not None:
                raise WireError(f"{_text(where)}: control character {control[0]!r} in {value[:40]!r}")
        return string
    if kind in _FLOATS:
        low = -MAX_SECONDS if field.full_name in SIGNED else 0.0

        def number(value: object, where: Where) -> None:
            assert isinstance(value, float)
            if not low <= value <= MAX_SECONDS:  # NaN compares False: caught here too
                if not math.isfinite(value):
                    raise WireError(f"{_text(where)}: {value} is not a finite number")
                raise WireError(f"{_text(where)}: {value} is outside [{low:g}, {MAX_SECONDS:g}]")
        return number
    if kind in _UNSIGNED:
        max_int = MAX_WIDE if field.full_name in WIDE else MAX_INT_COLUMN

        def unsigned(value: object, where: Where) -> None:
            assert isinstance(value, int)
            if value > max_int:
                raise WireError(f"{_text(where)}: {value} is more than {max_int}")
        return unsigned
    if kind == FieldDescriptor.TYPE_ENUM:
        enum = field.enum_type
        assert enum is not None
        known = frozenset(enum.values_by_number)

        def declared(value: object, where: Where) -> None:
            assert isinstance(value, int)
            if value not in known:
                raise WireError(f"{_text(where)}: {value} is not a known {enum.name}")
        return declared
    return _anything


def _anything(value: object, where: Where) -> None:
    """Booleans and signed integers: every value the type holds is fine."""
