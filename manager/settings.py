"""Manager settings: /etc/kvmha/manager.toml, then KVMHA_MANAGER_* environment variables, then flags.

The HA tunables (ping.interval, ...) live in the database's `configuration` table, changeable with
`kvmha config set`; a `[config]` table in manager.toml overrides them for this manager (and wins over the CLI).

Example (deploy/config/manager.toml):

    [manager]
    id = "mgr1"
    listen = "127.0.0.1:50051"        # agents' AgentLink stream
    admin_listen = "127.0.0.1:50052"  # the operator CLI
    metrics_listen = "127.0.0.1:9464" # Prometheus; "" = off
    database = "sqlite:////var/lib/kvmha/manager.sqlite"
    auto_register_hosts = false       # true: hosts with a certificate of our CA register on their first Hello
    secrets_key = "/var/lib/kvmha/secrets.key"  # seals BMC passwords in the database (0600, made if missing)
    log_format = "kv"                 # or "json"
    [tls]                              # mutual TLS (kvmha pki), the default; plaintext needs allow_insecure_plaintext
    cert = "/etc/kvmha/pki/manager-mgr1.crt"
    key = "/etc/kvmha/pki/manager-mgr1.key"
    ca = "/etc/kvmha/pki/ca.crt"
    [dashboard]                        # optional: the read-only web dashboard and JSON API (docs/dashboard.md)
    listen = "127.0.0.1:8443"          # HTTPS only; "" or no [dashboard] = off (the default)
    cert = "/etc/kvmha/dashboard.crt"  # default: [tls] cert/key
    key = "/etc/kvmha/dashboard.key"
    tokens = "/etc/kvmha/dashboard-tokens.json"  # `kvmha dashboard token --role reader` adds to it
    [domain_xml]                       # guarded elements CreateVm may use (kvmha.manager.domainpolicy)
    allow = ["qemu:override"]
    [config]
    "ping.interval" = "2"
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvmha.manager.domainpolicy import KNOWN

DEFAULT_CONFIG_PATH = Path("/etc/kvmha/manager.toml")
DEFAULT_DATABASE = "sqlite:////var/lib/kvmha/manager.sqlite"
DEFAULT_SECRETS_KEY = "/var/lib/kvmha/secrets.key"
DEFAULT_DASHBOARD_TOKENS = "/etc/kvmha/dashboard-tokens.json"


class SettingsError(ValueError):
    """A setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class ManagerSettings:
    manager_id: str = field(default_factory=socket.gethostname)
    listen: str = "127.0.0.1:50051"
    admin_listen: str = "127.0.0.1:50052"
    metrics_listen: str = "127.0.0.1:9464"
    database: str = DEFAULT_DATABASE
    # Off: hosts are enrolled with `kvmha host add`. On: any host with a certificate of our CA registers itself on
    # its first Hello (with mutual TLS only such hosts get that far).
    auto_register_hosts: bool = False
    log_format: str = "kv"
    log_level: str = "INFO"
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # the CA whose certificates (hosts, operators) may connect: mutual TLS
    # Plaintext needs this, on any address: no host identities, every admin caller is an admin (logged loudly).
    allow_insecure_plaintext: bool = False
    config_overrides: tuple[tuple[str, str], ...] = ()
    dashboard_listen: str = ""  # off unless configured
    dashboard_cert: str = ""
    dashboard_key: str = ""
    dashboard_tokens: str = DEFAULT_DASHBOARD_TOKENS
    # The key BMC passwords are sealed with (0600, made at first start; never in the database): security/secrets.py
    secrets_key: str = DEFAULT_SECRETS_KEY
    # Guarded domain XML elements CreateVm may use (kvmha.manager.domainpolicy): [domain_xml] allow = [...]
    domain_xml_allow: tuple[str, ...] = ()

    def check(self) -> None:
        for name in ("listen", "admin_listen"):
            split_address(getattr(self, name))
        if not self.tls_cert and not self.allow_insecure_plaintext:
            raise SettingsError("mutual TLS is the default: configure [tls] cert, key and ca (kvmha pki init; "
                                "kvmha pki manager NAME --address ...), or set allow_insecure_plaintext = true "
                                "(anyone who reaches the ports is then any host and an admin)")
        if self.log_format not in ("kv", "json"):
            raise SettingsError(f"log_format must be 'kv' or 'json', not {self.log_format!r}")
        if bool(self.tls_cert) != bool(self.tls_key) or bool(self.tls_cert) != bool(self.tls_ca):
            raise SettingsError("[tls] needs cert, key and ca (the CA that signed the hosts' and operators' "
                                "certificates: kvmha pki init)")
        if self.dashboard_listen:
            split_address(self.dashboard_listen)
            if not (self.dashboard_cert and self.dashboard_key):
                raise SettingsError("[dashboard] is served over HTTPS only: give cert and key (or configure [tls])")


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise SettingsError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_KEYS = {
    "id": "manager_id", "listen": "listen", "admin_listen": "admin_listen", "metrics_listen": "metrics_listen",
    "database": "database", "auto_register_hosts": "auto_register_hosts", "log_format": "log_format",
    "log_level": "log_level", "allow_insecure_plaintext": "allow_insecure_plaintext", "secrets_key": "secrets_key",
}


def load(path: Path | None, env: dict[str, str], flags: dict[str, Any]) -> ManagerSettings:
    settings = ManagerSettings()
    config_path = path or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    if config_path is not None:
        settings = _from_toml(settings, config_path)
    for key, attribute in _KEYS.items():
        value = env.get(f"KVMHA_MANAGER_{key.upper()}")
        if value is not None:
            settings = replace(settings, **{attribute: _coerce(attribute, value)})  # type: ignore[arg-type]
    settings = replace(settings, **{k: v for k, v in flags.items() if v is not None})
    settings.check()
    return settings


def _from_toml(settings: ManagerSettings, path: Path) -> ManagerSettings:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise SettingsError(f"{path}: {error}") from None
    manager = data.get("manager", {})
    unknown = set(manager) - set(_KEYS)
    if unknown:
        raise SettingsError(f"{path}: unknown keys in [manager]: {sorted(unknown)}")
    changes = {_KEYS[k]: _coerce(_KEYS[k], v) for k, v in manager.items()}
    tls = data.get("tls", {})
    unknown_tls = set(tls) - {"cert", "key", "ca"}
    if unknown_tls:
        raise SettingsError(f"{path}: unknown keys in [tls]: {sorted(unknown_tls)}")
    changes["tls_cert"], changes["tls_key"] = str(tls.get("cert", "")), str(tls.get("key", ""))
    changes["tls_ca"] = str(tls.get("ca", ""))
    changes.update(_dashboard(path, data.get("dashboard", {}), str(changes["tls_cert"]), str(changes["tls_key"])))
    overrides = tuple((str(k), str(v).lower() if isinstance(v, bool) else str(v))
                      for k, v in data.get("config", {}).items())
    changes["domain_xml_allow"] = _domain_xml_allow(path, data.get("domain_xml", {}))
    return replace(settings, config_overrides=overrides, **changes)  # type: ignore[arg-type]


_DASHBOARD_KEYS = {"listen": "dashboard_listen", "cert": "dashboard_cert", "key": "dashboard_key",
                   "tokens": "dashboard_tokens"}


def _dashboard(path: Path, table: dict[str, Any], tls_cert: str, tls_key: str) -> dict[str, str]:
    unknown = set(table) - set(_DASHBOARD_KEYS)
    if unknown:
        raise SettingsError(f"{path}: unknown keys in [dashboard]: {sorted(unknown)}")
    values = {_DASHBOARD_KEYS[k]: str(v) for k, v in table.items()}
    values.setdefault("dashboard_cert", tls_cert)
    values.setdefault("dashboard_key", tls_key)
    return values


def _domain_xml_allow(path: Path, section: dict[str, Any]) -> tuple[str, ...]:
    unknown = set(section) - {"allow"}
    allow = section.get("allow", [])
    if unknown or not isinstance(allow, list):
        raise SettingsError(f"{path}: [domain_xml] takes one key, allow = [...] (one of {', '.join(KNOWN)})")
    names = tuple(str(name) for name in allow)
    for name in names:
        if name not in KNOWN and not name.startswith("qemu:"):
            raise SettingsError(f"{path}: [domain_xml] allow: {name!r} is not one of {', '.join(KNOWN)}")
    return names


def _coerce(attribute: str, value: object) -> object:
    if attribute in ("auto_register_hosts", "allow_insecure_plaintext"):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in ("true", "false", "1", "0", "yes", "no"):
            raise SettingsError(f"{attribute} must be true or false, not {value!r}")
        return text in ("true", "1", "yes")
    return str(value)


def parse_args(argv: list[str] | None) -> tuple[Path | None, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        prog="kvmha-manager",
        description="kvmha manager: keeps the agents' ping map, detects failed hosts and VMs, fences and restarts.")
    parser.add_argument("--config", type=Path, help=f"TOML settings (default {DEFAULT_CONFIG_PATH} if present)")
    parser.add_argument("--id", dest="manager_id", help="this manager's id (default: the host name)")
    parser.add_argument("--listen", help="HOST:PORT for agents (default 127.0.0.1:50051)")
    parser.add_argument("--admin-listen", help="HOST:PORT for the operator CLI (default 127.0.0.1:50052)")
    parser.add_argument("--metrics-listen", help="HOST:PORT for Prometheus metrics; empty to disable")
    parser.add_argument("--database", help=f"SQLAlchemy URL (default {DEFAULT_DATABASE})")
    parser.add_argument("--log-format", choices=["kv", "json"])
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--allow-insecure-plaintext", action="store_true", default=None,
                        help="run without TLS (no host identities, no admin roles): tests and isolated networks only")
    args = vars(parser.parse_args(argv))
    return args.pop("config"), args


def environment() -> dict[str, str]:
    return dict(os.environ)
