"""kvmha-agent configuration files (schema: kvmha.agent.config) written by the lab and the test harnesses.

One renderer for every agent the project starts itself: the lab's hosts (kvmha.lab.host), the agents of a
LocalCluster and the AgentProcess of the agent tests (kvmha.lab.testing.local). Each caller states its own
settings; this module only writes them as TOML, values quoted and escaped.
"""

from __future__ import annotations

from collections.abc import Mapping


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def agent_toml(agent: Mapping[str, object], overrides: Mapping[str, object] | None = None, *,
               isolation: Mapping[str, object] | None = None, comment: str = "") -> str:
    """[agent] from `agent`, then [isolation] if given. An override key "isolation.X" sets [isolation] X (adding the
    section if needed); any other override replaces or adds an [agent] key."""
    agent_keys = dict(agent)
    isolation_keys = dict(isolation) if isolation is not None else None
    for key, value in (overrides or {}).items():
        if key.startswith("isolation."):
            isolation_keys = isolation_keys if isolation_keys is not None else {}
            isolation_keys[key.removeprefix("isolation.")] = value
        else:
            agent_keys[key] = value
    lines = [f"# {comment}"] if comment else []
    lines += ["[agent]", *(f"{key} = {toml_value(value)}" for key, value in agent_keys.items())]
    if isolation_keys is not None:
        lines += ["", "[isolation]", *(f"{key} = {toml_value(value)}" for key, value in isolation_keys.items())]
    return "\n".join(lines) + "\n"
