"""The local protocol between kvmha-watchdog and its clients: one JSON object per line over a Unix stream socket.

    client -> daemon                                            daemon -> client
    {"op": "arm", "client": "kvmha-agent", "timeout_s": 20}     {"ok": true, "takeover": false, "note": null,
                                                                  "device": "/dev/watchdog", "device_timeout_s": 10,
                                                                  "timeout_s": 20}  or {"ok": false, "error": "..."}
    {"op": "pet", "note": {...}}                                (no answer: a pet must never wait for the daemon)
    {"op": "disarm"}                                            {"ok": true}, then the daemon closes
    {"op": "status"}                                            {"ok": true, "status": {...}}

A connection arms at most once. Any pet counts as a sign of life; `note` (a small JSON object, optional) is kept by
the daemon and handed to the next connection that arms the same identity after this one ended without a disarm.
Lines longer than MAX_LINE_BYTES end the connection (a client that sends garbage is not a client to trust).
"""

from __future__ import annotations

import json
from typing import Any

MAX_LINE_BYTES = 4096
MAX_NOTE_BYTES = 1024
DEFAULT_SOCKET = "/run/kvmha/watchdog.sock"


class ProtocolError(ValueError):
    pass


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One line (without its newline) -> a message with a string `op`; ProtocolError on anything else."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("a message is a JSON object with a string 'op'")
    return message


def note_of(message: dict[str, Any]) -> dict[str, Any] | None:
    note = message.get("note")
    if note is None:
        return None
    if not isinstance(note, dict) or len(json.dumps(note)) > MAX_NOTE_BYTES:
        raise ProtocolError(f"note must be a JSON object of at most {MAX_NOTE_BYTES} bytes")
    return note


def split_lines(buffer: bytearray) -> list[bytes]:
    """Remove and return the complete lines at the start of `buffer`; ProtocolError when a line is too long."""
    lines = []
    while (end := buffer.find(b"\n")) >= 0:
        if end > MAX_LINE_BYTES:
            raise ProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
        lines.append(bytes(buffer[:end]))
        del buffer[: end + 1]
    if len(buffer) > MAX_LINE_BYTES:
        raise ProtocolError(f"line longer than {MAX_LINE_BYTES} bytes")
    return lines
