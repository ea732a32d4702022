"""The JSON read API: the same records as the pages (view.py, timeline.py), as JSON, and its OpenAPI document.

Pure translation: records in, JSON-ready dicts out. Times are wall-clock seconds (floats), durations carry `_s`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kvmha.manager.dashboard.timeline import Failure
from kvmha.manager.store import EventRow

API_VERSION = "1.0.0"


def plain(record: Any) -> Any:
    """A dataclass (or a sequence of them) as JSON-ready data."""
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record)
    if isinstance(record, (list, tuple)):
        return [plain(r) for r in record]
    return record


def event(row: EventRow, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The stored event, and the name of its subject when the manager knows it ("" otherwise)."""
    return {**dataclasses.asdict(row), "subject_name": (names or {}).get(row.subject, "")}


def events(rows: Sequence[EventRow], names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    return [event(r, names) for r in rows]


def failure(item: Failure) -> dict[str, Any]:
    data = dataclasses.asdict(item)
    data["recovered_at"] = item.recovered_at
    data["durations_s"] = item.durations_s()
    data["svg"] = f"/failures/{item.id}.svg"
    return data


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _array(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


def _get(summary: str, schema: dict[str, Any], parameters: Sequence[dict[str, Any]] = (),
         media: str = "application/json") -> dict[str, Any]:
    return {"get": {"summary": summary, "parameters": list(parameters), "security": [{"bearer": []}],
                    "responses": {"200": {"description": "OK", "content": {media: {"schema": schema}}},
                                  "401": {"description": "no valid token"},
                                  "403": {"description": "the token's role is not enough"}}}}


def _param(name: str, where: str, kind: str, description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path",
            "schema": {"type": kind}, "description": description}


_NUM, _INT, _STR, _BOOL = {"type": "number"}, {"type": "integer"}, {"type": "string"}, {"type": "boolean"}
_OPT_NUM = {"type": ["number", "null"]}


def _object(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


SCHEMAS: dict[str, Any] = {
    "Health": _object(name=_STR, state={"enum": ["ok", "warn", "bad", "unknown"]}, detail=_STR),
    "Vm": _object(id=_INT, uuid=_STR, name=_STR, state=_STR, power_state=_STR, host=_STR, last_host=_STR,
                  ha_enabled=_BOOL, restart_priority=_INT, anti_affinity_group=_STR, vcpus=_INT, memory_mib=_INT,
                  power_state_updated_at=_OPT_NUM),
    "Host": _object(id=_INT, uuid=_STR, name=_STR, address=_STR,
                    status={"enum": ["Connecting", "Up", "Investigating", "Alert", "Fencing", "Fenced", "Down",
                                     "Disconnected", "Removed"]},
                    resource_state={"enum": ["Enabled", "Disabled", "PrepareForMaintenance", "Maintenance",
                                             "ErrorInMaintenance"]},
                    role=_STR, connected=_BOOL, last_ping_at=_OPT_NUM, last_ping_age_s=_OPT_NUM, cpus=_INT,
                    memory_mib=_INT, used_vcpus=_INT, used_memory_mib=_INT, agent_version=_STR, bmc=_STR,
                    health=_array("Health"), vms=_array("Vm")),
    "Step": _object(at=_NUM, kind=_STR, message=_STR, severity=_STR),
    "Work": _object(id=_INT, vm=_STR, vm_id=_INT, type=_STR, step=_STR, active=_BOOL, host=_STR, tried=_INT,
                    reason=_STR, created_at=_NUM, updated_at=_NUM, taken_by=_STR, steps=_array("Step")),
    "Event": _object(id=_INT, at=_NUM, severity={"enum": ["info", "warning", "alert"]}, subject=_STR, kind=_STR,
                     message=_STR, subject_name=_STR),
    "Cluster": _object(at=_NUM, hosts=_array("Host"), vms=_array("Vm"), work=_array("Work"), last_event_id=_INT,
                       counts={"type": "object", "additionalProperties": _INT},
                       names={"type": "object", "additionalProperties": _STR}),
    "VmPage": _object(vm=_ref("Vm"), work=_array("Work"), history=_array("Event")),
    "Mark": _object(at=_NUM, status=_STR, reason=_STR),
    "VmRecovery": _object(work_id=_INT, vm=_STR, scheduled_at=_NUM, started_at=_OPT_NUM, target=_STR,
                          confirmed_at=_OPT_NUM, ended_at=_OPT_NUM, outcome=_STR, attempts=_INT),
    "Failure": _object(id=_INT, host_id=_INT, host=_STR, detected_at=_NUM, last_ping_at=_OPT_NUM,
                       marks=_array("Mark"), verdict=_STR, verdict_at=_OPT_NUM, fencing_at=_OPT_NUM,
                       evidence={"type": "object", "additionalProperties": _STR}, vms=_array("VmRecovery"),
                       closed_at=_OPT_NUM, recovered_at=_OPT_NUM,
                       durations_s={"type": "object", "additionalProperties": _NUM}, svg=_STR),
    "WhoAmI": _object(token_id=_STR, name=_STR, role={"enum": ["reader", "operator", "admin"]}),
}


def openapi() -> dict[str, Any]:
    after = _param("after_id", "query", "integer", "only events with a larger id")
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvmha dashboard read API", "version": API_VERSION,
                 "description": "Read-only views of the kvmha manager: the same data as the dashboard's pages. "
                                "Every call needs a bearer token issued with `kvmha dashboard token` (role reader "
                                "or above)."},
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           "cookie": {"type": "apiKey", "in": "cookie", "name": "kvmha_dashboard"}}},
        "paths": {
            "/api/v1/whoami": _get("The caller", _ref("WhoAmI")),
            "/api/v1/cluster": _get("Hosts, VMs, HA work and counts in one consistent read", _ref("Cluster")),
            "/api/v1/hosts": _get("Hosts with status, resource state, health, capacity and VMs", _array("Host")),
            "/api/v1/hosts/{ref}": _get("One host", _ref("Host"), [_param("ref", "path", "string", "id or name")]),
            "/api/v1/vms": _get("VMs; every word of q must match", _array("Vm"),
                                [_param("q", "query", "string", "search words")]),
            "/api/v1/vms/{ref}": _get("One VM with its HA work and history", _ref("VmPage"),
                                      [_param("ref", "path", "string", "id, uuid or name")]),
            "/api/v1/work": _get("HA work: active items with their steps, then recently finished ones",
                                 _array("Work")),
            "/api/v1/events": _get("Events in id order", _array("Event"), [
                after, _param("limit", "query", "integer", "at most this many (default 200, max 10000)"),
                _param("subject", "query", "string", "host:3, vm:7, work:2, or a prefix ending in ':'"),
                _param("severity", "query", "string", "least severity: info, warning or alert")]),
            "/api/v1/events/stream": _get("Events as Server-Sent Events (id = event id; resumes from Last-Event-ID)",
                                          _STR, [after, _param("subject", "query", "string", "as /events"),
                                                 _param("severity", "query", "string", "as /events")],
                                          "text/event-stream"),
            "/api/v1/failures": _get("Host failures with their recovery timelines", _array("Failure")),
            "/api/v1/openapi.json": {"get": {"summary": "This document (no credential needed)", "security": [],
                                             "responses": {"200": {"description": "OpenAPI 3.1 JSON"}}}},
            "/failures/{id}.svg": _get("A failure's recovery timeline as SVG", _STR,
                                       [_param("id", "path", "integer", "the failure's id")], "image/svg+xml"),
        },
    }
