"""Agent configuration: TOML file, then environment (KVMHA_AGENT_*), then command-line flags, later wins.

The file schema is a contract with the lab and the deploy docs (deploy/config/agent.toml is the example):

    [agent]      host_uuid (required), hostname, management_address, managers, libvirt_uri, storage_paths,
                 heartbeat_interval_s, resync_interval_s, neighbor_port, log_format, libvirt_config_dir
    [isolation]  policy (none | destroy-vms | reboot-host), after_s
    [tls]        ca, cert, key (mutual TLS, the default), allow_insecure_plaintext (false)
    [migration]  uri (qemu+tls://{address}/system: the peer's libvirtd), tls (true: QEMU encrypts the stream),
                 unsafe (false; true only where libvirt cannot see that the storage is shared, as in the lab)
    [watchdog]   enabled (true), socket (kvmha-watchdog's, /run/kvmha/watchdog.sock), timeout_s (20: the host
                 resets at most this long after the agent's last sign of life; see docs/watchdog.md)

Environment variables are the agent keys upper-cased (KVMHA_AGENT_HOST_UUID, KVMHA_AGENT_MANAGERS as a
comma-separated list, ...) plus KVMHA_AGENT_ISOLATION_POLICY, KVMHA_AGENT_ISOLATION_AFTER_S and
KVMHA_AGENT_WATCHDOG_ENABLED / _SOCKET / _TIMEOUT_S.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/kvmha/agent.toml"
ISOLATION_POLICIES = ("none", "destroy-vms", "reboot-host")
LOG_FORMATS = ("kv", "json")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class AgentConfig:
    host_uuid: str
    hostname: str = field(default_factory=socket.gethostname)
    management_address: str = ""
    managers: tuple[str, ...] = ("127.0.0.1:50051",)
    libvirt_uri: str = "qemu:///system"
    storage_paths: tuple[str, ...] = ()
    heartbeat_interval_s: float = 2.0
    resync_interval_s: float = 30.0
    neighbor_port: int = 22
    log_format: str = "kv"
    # destroy-vms by default: the manager's isolation.self.fence (default true) takes a silent, unreachable host
    # without a working BMC for dead once isolation.after + margin have passed, which is safe only if the agent
    # really destroyed its VMs by then (docs/decisions.md).
    isolation_policy: str = "destroy-vms"
    isolation_after_s: float = 30.0
    # kvmha-watchdog (issue 11): armed at start unless disabled; without it a self-fence is not guaranteed, and the
    # manager never takes this host for dead by silence alone.
    watchdog_enabled: bool = True
    watchdog_socket: str = "/run/kvmha/watchdog.sock"
    watchdog_timeout_s: float = 20.0
    # Where libvirt's qemu.conf / qemu-lockd.conf are read from (the disk lease configuration reported in Hello).
    libvirt_config_dir: str = "/etc/libvirt"
    # Memory kept for the hypervisor and never placed (issue 16); -1: the manager's host.memory.reserve decides.
    memory_reserve_mib: int = -1
    # Not in the documented schema (optional, defaults are fine): the first ping interval before Welcome says
    # otherwise, and the longest pause between two connection attempts.
    ping_interval_s: float = 2.0
    reconnect_max_s: float = 8.0  # below the manager's startup.grace (20 s): a restarted manager sees us in time
    # [tls]: mutual TLS with the manager (kvmha pki host NAME --uuid <host_uuid>); the files are read again on
    # every connection, so renewed certificates are picked up without a restart.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    allow_insecure_plaintext: bool = False
    # [migration]: how this agent reaches a peer's libvirtd for a live migration ({address}: the peer's management
    # address) and whether QEMU encrypts the migration stream (VIR_MIGRATE_TLS); see docs/operations.md.
    migration_uri: str = "qemu+tls://{address}/system"
    migration_tls: bool = True
    migration_unsafe: bool = False  # VIR_MIGRATE_UNSAFE: only where libvirt cannot see that storage is shared (lab)


_AGENT_KEYS = {
    "host_uuid", "hostname", "management_address", "managers", "libvirt_uri", "storage_paths",
    "heartbeat_interval_s", "resync_interval_s", "neighbor_port", "log_format", "ping_interval_s", "reconnect_max_s",
    "libvirt_config_dir", "memory_reserve_mib",
}
_ISOLATION_KEYS = {"policy": "isolation_policy", "after_s": "isolation_after_s"}
_WATCHDOG_KEYS = {"enabled": "watchdog_enabled", "socket": "watchdog_socket", "timeout_s": "watchdog_timeout_s"}
_TLS_KEYS = {"ca": "tls_ca", "cert": "tls_cert", "key": "tls_key",
             "allow_insecure_plaintext": "allow_insecure_plaintext"}
_MIGRATION_KEYS = {"uri": "migration_uri", "tls": "migration_tls", "unsafe": "migration_unsafe"}
_SECTIONS = {"isolation": _ISOLATION_KEYS, "watchdog": _WATCHDOG_KEYS, "tls": _TLS_KEYS,
             "migration": _MIGRATION_KEYS}  # [section] key -> field
_TYPES = {f.name: f.type for f in fields(AgentConfig)}


def _coerce(key: str, value: Any) -> Any:
    """Turn a TOML, environment or flag value into the field's type, with a message naming the key on failure."""
    kind = _TYPES[key]
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("must be true or false")
            return text in ("true", "1", "yes")
        if kind == "tuple[str, ...]":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(v).strip() for v in items if str(v).strip())
        if kind == "float":
            number = float(value)
            if not math.isfinite(number) or number <= 0:
                raise ValueError("must be a positive number")
            return number
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("must be an integer")
            return int(value)
        if not isinstance(value, str):
            raise ValueError("must be a string")
        return value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc} (got {value!r})") from exc


def _from_toml(data: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    unknown_sections = set(data) - {"agent", *_SECTIONS}
    if unknown_sections:
        raise ConfigError(f"unknown sections: {sorted(unknown_sections)}")
    for key, value in dict(data.get("agent", {})).items():
        if key not in _AGENT_KEYS:
            raise ConfigError(f"[agent] unknown key {key!r}")
        out[key] = _coerce(key, value)
    for section, keys in _SECTIONS.items():
        for key, value in dict(data.get(section, {})).items():
            if key not in keys:
                raise ConfigError(f"[{section}] unknown key {key!r}")
            out[keys[key]] = _coerce(keys[key], value)
    return out


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _AGENT_KEYS:
        value = environ.get(f"KVMHA_AGENT_{key.upper()}")
        if value is not None:
            out[key] = _coerce(key, value)
    for section, keys in _SECTIONS.items():
        for short, key in keys.items():
            value = environ.get(f"KVMHA_AGENT_{section.upper()}_{short.upper()}")
            if value is not None:
                out[key] = _coerce(key, value)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmha-agent",
        description="kvmha host agent: reports libvirt power states to the kvmha manager and runs its commands.",
        epilog="Precedence: flags > KVMHA_AGENT_* environment > config file > defaults.",
    )
    p.add_argument("--config", default=None, help=f"TOML config file (default {DEFAULT_CONFIG_PATH} if it exists)")
    p.add_argument("--host-uuid", dest="host_uuid", help="stable identity of this host")
    p.add_argument("--hostname", help="name reported to the manager")
    p.add_argument("--management-address", dest="management_address", help="address neighbours reach this host at")
    p.add_argument("--manager", dest="managers", action="append", metavar="HOST:PORT",
                   help="manager address; repeat for several (tried in order, rotating on failure)")
    p.add_argument("--libvirt-uri", dest="libvirt_uri", help="libvirt connection URI (default qemu:///system)")
    p.add_argument("--storage-path", dest="storage_paths", action="append", metavar="PATH",
                   help="shared storage path for the heartbeat; repeat for several")
    p.add_argument("--heartbeat-interval-s", dest="heartbeat_interval_s", type=float)
    p.add_argument("--resync-interval-s", dest="resync_interval_s", type=float)
    p.add_argument("--neighbor-port", dest="neighbor_port", type=int)
    p.add_argument("--log-format", dest="log_format", choices=LOG_FORMATS)
    p.add_argument("--isolation-policy", dest="isolation_policy", choices=ISOLATION_POLICIES)
    p.add_argument("--isolation-after-s", dest="isolation_after_s", type=float)
    p.add_argument("--watchdog-socket", dest="watchdog_socket", help="kvmha-watchdog's socket")
    p.add_argument("--watchdog-timeout-s", dest="watchdog_timeout_s", type=float,
                   help="the host resets at most this long after the agent's last sign of life")
    p.add_argument("--no-watchdog", dest="watchdog_enabled", action="store_const", const=False, default=None,
                   help="do not arm kvmha-watchdog (the manager then never takes this host for dead by silence)")
    return p


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Merge file, environment and flags into a validated AgentConfig; raises ConfigError with a clear message."""
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    path = args.config or env.get("KVMHA_AGENT_CONFIG")
    values: dict[str, Any] = {}
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        try:
            with open(path, "rb") as fh:
                values.update(_from_toml(tomllib.load(fh)))
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    values.update(_from_env(env))
    for key, value in vars(args).items():
        if key != "config" and value is not None:
            values[key] = _coerce(key, value)
    if not values.get("host_uuid"):
        raise ConfigError("host_uuid is required ([agent] host_uuid, KVMHA_AGENT_HOST_UUID or --host-uuid)")
    return validate(AgentConfig(**values))


def validate(cfg: AgentConfig) -> AgentConfig:
    try:
        host_uuid = str(uuid.UUID(cfg.host_uuid))
    except ValueError as exc:
        raise ConfigError(f"host_uuid is not a UUID: {cfg.host_uuid!r}") from exc
    if not cfg.managers:
        raise ConfigError("at least one manager address is required")
    for address in cfg.managers:
        if ":" not in address:
            raise ConfigError(f"manager address {address!r} needs a port (host:port)")
    if cfg.isolation_policy not in ISOLATION_POLICIES:
        raise ConfigError(f"isolation policy {cfg.isolation_policy!r} is not one of {ISOLATION_POLICIES}")
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format {cfg.log_format!r} is not one of {LOG_FORMATS}")
    if "{address}" not in cfg.migration_uri:
        raise ConfigError(f"[migration] uri {cfg.migration_uri!r} must contain {{address}} (the peer's address)")
    if not 0 < cfg.neighbor_port < 65536:
        raise ConfigError(f"neighbor_port {cfg.neighbor_port} is not a TCP port")
    for path in cfg.storage_paths:
        if not os.path.isabs(path):
            raise ConfigError(f"storage path {path!r} must be absolute")
    tls = (cfg.tls_ca, cfg.tls_cert, cfg.tls_key)
    if any(tls) and not all(tls):
        raise ConfigError("[tls] needs ca, cert and key (kvmha pki host NAME --uuid <host_uuid>)")
    if not any(tls) and not cfg.allow_insecure_plaintext:
        raise ConfigError("mutual TLS is the default: set [tls] ca, cert and key (kvmha pki host NAME --uuid "
                          "<host_uuid>), or [tls] allow_insecure_plaintext = true")
    for key in ("watchdog_socket", "libvirt_config_dir"):
        if not os.path.isabs(getattr(cfg, key)):
            raise ConfigError(f"{key} {getattr(cfg, key)!r} must be an absolute path")
    return replace(cfg, host_uuid=host_uuid)
