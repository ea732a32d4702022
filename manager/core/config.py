"""The core's tunables: one frozen dataclass, and a table that names, documents and parses each of them.

Defaults are tuned for fast failover without false fencing: a host is behind after 7 s without a ping (three and a
half missed 2 s pings, so one lost ping never starts an investigation), an investigation answers within 4 s, and a
host with a working BMC is fenced and its VMs restarted within ~20 s of its death (Proxmox ~2 min, CloudStack 15 min).
A host without a BMC is waited out only when its self-fence is guaranteed: its agent reported an armed watchdog
(kvmha-watchdog) at its last contact, so it destroys its VMs after `isolation.after` or its host is reset at most the
watchdog's timeout later; the manager restarts its VMs only after that plus `isolation.margin` of stale storage
heartbeat (and `isolation.link.slack` more of agent silence). Without an armed watchdog, silence proves nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key, the value and what is expected."""


@dataclass(frozen=True, slots=True)
class CoreConfig:
    ping_interval_s: float = 2.0
    ping_timeout_s: float = 7.0
    ha_workers: int = 5
    investigation_timeout_s: float = 4.0
    check_neighbor_timeout_s: float = 3.0
    neighbors_per_investigation: int = 3
    heartbeat_stale_after_s: float = 4.0
    investigate_retry_interval_s: float = 10.0
    restart_retry_interval_s: float = 10.0
    max_retries: int = 5
    start_timeout_s: float = 30.0
    start_confirm_timeout_s: float = 15.0
    stop_timeout_s: float = 60.0
    fence_timeout_s: float = 30.0
    fence_retry_interval_s: float = 5.0
    fence_retry_max_interval_s: float = 120.0
    fence_max_silent_ratio: float = 0.5
    startup_grace_s: float = 20.0
    power_report_missing_grace_s: float = 4.0
    planned_disconnect_wait_s: float = 60.0
    guest_shutdown_restart: bool = False
    restart_window_s: float = 3600.0
    restart_max_per_window: int = 3
    flap_window_s: float = 600.0
    flap_max_failures: int = 3
    flap_holdout_s: float = 900.0
    isolation_after_s: float = 30.0
    isolation_margin_s: float = 10.0
    isolation_self_fence: bool = True
    isolation_link_slack_s: float = 10.0
    lease_probe: bool = True
    lease_probe_timeout_s: float = 5.0
    cpu_overcommit_ratio: float = 4.0
    placement_candidates: int = 32
    host_memory_reserve_mib: int = 1024
    admission_host_failures: int = 1
    migration_timeout_s: float = 300.0
    maintenance_migrations: int = 2
    ha_disabled_hosts: bool = True

    @classmethod
    def from_mapping(cls, values: Mapping[str, str], base: CoreConfig | None = None) -> CoreConfig:
        """Build a config from dotted names (``ping.interval``) and string values; unknown names are errors."""
        changes: dict[str, Any] = {}
        for name, raw in values.items():
            spec = SPECS_BY_NAME.get(name)
            if spec is None:
                raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(SPECS_BY_NAME))}")
            changes[spec.field] = spec.parse(name, raw)
        config = dataclasses.replace(base or cls(), **changes)
        _check_relations(config)
        return config


@dataclass(frozen=True, slots=True)
class ConfigSpec:
    name: str  # dotted name shown to operators
    field: str  # CoreConfig attribute
    default: str
    description: str
    parse: Callable[[str, str], object]


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: {raw!r} must be a finite number greater than 0")
    return value


def _non_negative_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}: {raw!r} must be a finite number, 0 or more")
    return value


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if value < 1:
        raise ConfigError(f"{name}: {raw!r} must be at least 1")
    return value


def _non_negative_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if value < 0:
        raise ConfigError(f"{name}: {value} must be 0 or more")
    return value


def _ratio(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number between 0 and 1") from None
    if not 0 < value <= 1:
        raise ConfigError(f"{name}: {raw!r} must be greater than 0 and at most 1")
    return value


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{name}: {raw!r} is not a boolean (true/false)")


def _check_relations(config: CoreConfig) -> None:
    """Values that are fine alone but unsafe together."""
    if config.ping_timeout_s <= config.ping_interval_s:
        raise ConfigError(
            f"ping.timeout ({config.ping_timeout_s} s) must be longer than ping.interval ({config.ping_interval_s} s): "
            "otherwise one late ping starts an investigation"
        )
    if config.heartbeat_stale_after_s >= config.ping_timeout_s - config.ping_interval_s:
        raise ConfigError(
            f"heartbeat.stale.after ({config.heartbeat_stale_after_s} s) must be shorter than ping.timeout - "
            "ping.interval: otherwise a host that died just after a ping still shows a fresh heartbeat when it is "
            "investigated and is taken for alive"
        )
    if config.check_neighbor_timeout_s > config.investigation_timeout_s:
        raise ConfigError("check.neighbor.timeout must not exceed investigation.timeout")
    if config.fence_retry_max_interval_s < config.fence_retry_interval_s:
        raise ConfigError("fence.retry.max.interval must not be shorter than fence.retry.interval")


_F, _I, _R, _B, _Z, _N = _positive_float, _positive_int, _ratio, _bool, _non_negative_float, _non_negative_int

# (dotted name, CoreConfig field, parser, description); the default comes from the dataclass.
_TABLE: tuple[tuple[str, str, Callable[[str, str], object], str], ...] = (
    ("ping.interval", "ping_interval_s", _F, "seconds between agent pings (sent to agents in Welcome)"),
    ("ping.timeout", "ping_timeout_s", _F, "seconds without a ping after which a host is behind (not a multiplier)"),
    ("ha.workers", "ha_workers", _I, "HA work items restarting a VM at the same time"),
    ("investigation.timeout", "investigation_timeout_s", _F, "seconds an investigation may take before it decides"),
    ("check.neighbor.timeout", "check_neighbor_timeout_s", _F, "seconds a neighbour has to answer CheckNeighbor"),
    ("investigation.neighbors", "neighbors_per_investigation", _I, "neighbours asked about a silent host"),
    ("heartbeat.stale.after", "heartbeat_stale_after_s", _F, "storage heartbeat age (s) from which it is stale"),
    (
        "investigate.retry.interval",
        "investigate_retry_interval_s",
        _F,
        "seconds between investigations of a host in Alert, and re-checks of work waiting for a VM's power state",
    ),
    (
        "restart.retry.interval",
        "restart_retry_interval_s",
        _F,
        "seconds before a failed or capacity-starved restart is tried again",
    ),
    ("max.retries", "max_retries", _I, "failed start attempts of one HA work item before it ends in Error"),
    ("start.timeout", "start_timeout_s", _F, "seconds a StartVm command may take"),
    (
        "start.confirm.timeout",
        "start_confirm_timeout_s",
        _F,
        "seconds after a successful StartVm within which the target's power report must show the VM on",
    ),
    ("stop.timeout", "stop_timeout_s", _F, "seconds of graceful shutdown for an operator stop before destroy"),
    ("fence.timeout", "fence_timeout_s", _F, "seconds a fence may take before it counts as failed"),
    ("fence.retry.interval", "fence_retry_interval_s", _F, "first backoff (s) after a failed fence; doubles each time"),
    ("fence.retry.max.interval", "fence_retry_max_interval_s", _F, "largest backoff (s) between fence attempts"),
    (
        "fence.max.silent.ratio",
        "fence_max_silent_ratio",
        _R,
        "no fencing while more than this share of enabled hosts is silent (the manager is probably cut off)",
    ),
    ("startup.grace", "startup_grace_s", _F, "seconds after the manager starts during which nothing is fenced"),
    (
        "power.report.missing.grace",
        "power_report_missing_grace_s",
        _F,
        "seconds a VM may be absent from its host's full report before it is PowerReportMissing",
    ),
    (
        "planned.disconnect.wait",
        "planned_disconnect_wait_s",
        _F,
        "seconds a host whose agent said Goodbye may stay away before it is investigated",
    ),
    ("guest.shutdown.restart", "guest_shutdown_restart", _B, "restart HA VMs that the guest shut down itself"),
    ("restart.window", "restart_window_s", _F, "window (s) for restart.max.per.window"),
    ("restart.max.per.window", "restart_max_per_window", _I, "HA restarts of one VM per window, then Error"),
    ("flap.window", "flap_window_s", _F, "window (s) in which a host's failures are counted"),
    ("flap.max.failures", "flap_max_failures", _I, "failures in flap.window after which a host is flapping"),
    ("flap.holdout", "flap_holdout_s", _F, "seconds a flapping host is held out of placement"),
    (
        "isolation.after",
        "isolation_after_s",
        _F,
        "seconds after which an agent that lost the manager and its storage heartbeat self-fences (agent setting)",
    ),
    ("isolation.margin", "isolation_margin_s", _Z, "extra seconds the manager waits beyond isolation.after"),
    (
        "isolation.self.fence",
        "isolation_self_fence",
        _B,
        "count on the agents' self-fence when their watchdog is armed (kvmha-watchdog resets a host whose agent "
        "died, hangs or did not complete its isolation response); a host without an armed watchdog is never taken "
        "for dead by its silence either way. false: only a BMC (or `kvmha host confirm-down`) proves a silent host "
        "dead",
    ),
    (
        "isolation.link.slack",
        "isolation_link_slack_s",
        _Z,
        "seconds an agent may still count its manager link alive after the manager's last received ping (its HTTP/2 "
        "keepalive must end the stream first): added to the agent silence a self-fence verdict needs",
    ),
    (
        "lease.probe",
        "lease_probe",
        _B,
        "before a silent host is declared dead on anything but its power being off (self-fence, operator), a "
        "neighbour probes its VMs' disk leases: a held lease keeps the host from Down (its VMs are not started)",
    ),
    ("lease.probe.timeout", "lease_probe_timeout_s", _F, "seconds a neighbour has to answer one CheckLease"),
    ("cpu.overcommit.ratio", "cpu_overcommit_ratio", _F, "vCPUs placed per host CPU"),
    ("placement.candidates", "placement_candidates", _I, "fitting hosts compared per placement (spread)"),
    (
        "host.memory.reserve",
        "host_memory_reserve_mib",
        _N,
        "MiB of each host's memory kept for the hypervisor and never placed (an agent's own memory_reserve_mib wins)",
    ),
    (
        "admission.host.failures",
        "admission_host_failures",
        _N,
        "an operator start of an HA VM is refused if, with the worst N hosts lost, some HA VM could not be restarted "
        "(0: off; HA restarts are never refused)",
    ),
    (
        "migration.timeout",
        "migration_timeout_s",
        _F,
        "seconds a live migration may take; then the agent cancels it and the VM stays on its source",
    ),
    ("maintenance.migrations", "maintenance_migrations", _I, "VMs migrated off a host entering maintenance at once"),
    (
        "ha.disabled.hosts",
        "ha_disabled_hosts",
        _B,
        "investigate a silent Disabled host and restart its HA VMs (false: the seed's rule, it is only disconnected)",
    ),
)


def _default_text(field_name: str) -> str:
    value = getattr(CoreConfig(), field_name)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


CONFIG_SPECS: tuple[ConfigSpec, ...] = tuple(
    ConfigSpec(name, field_name, _default_text(field_name), description, parse)
    for name, field_name, parse, description in _TABLE
)
SPECS_BY_NAME: dict[str, ConfigSpec] = {spec.name: spec for spec in CONFIG_SPECS}
