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
               isolation: Mapping[str, object] | None = None, watchdog: Mapping[str, object] | None = None,
               migration: Mapping[str, object] | None = None, comment: str = "") -> str:
    """[agent] from `agent`, then [isolation] and [watchdog] if given. An override key "isolation.X" (or
    "watchdog.X", "tls.X") sets that section's X (adding the section if needed); any other override replaces or adds an
    [agent] key."""
    agent_keys = dict(agent)
    sections: dict[str, dict[str, object] | None] = {
        "isolation": dict(isolation) if isolation is not None else None,
        "watchdog": dict(watchdog) if watchdog is not None else None,
        "tls": None,
        "migration": dict(migration) if migration is not None else None,
    }
    for key, value in (overrides or {}).items():
        section, dot, name = key.partition(".")
        if dot and section in sections:
            keys = sections[section]
            if keys is None:
                keys = sections[section] = {}
            keys[name] = value
        else:
            agent_keys[key] = value
    lines = [f"# {comment}"] if comment else []
    lines += ["[agent]", *(f"{key} = {toml_value(value)}" for key, value in agent_keys.items())]
    for section, keys in sections.items():
        if keys is not None:
            lines += ["", f"[{section}]", *(f"{key} = {toml_value(value)}" for key, value in keys.items())]
    return "\n".join(lines) + "\n"
