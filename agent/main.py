"""`kvmha-agent`: the composition root. Wires config, libvirt, heartbeat, commands, link and isolation response.

Exit codes: 0 after SIGTERM/SIGINT (Goodbye sent when a manager was connected), 2 on a configuration error.

Start order: configuration, logging, then kvmha-watchdog's arm, and only then the heavy imports (grpc, protobuf,
libvirt: 1-2 s on a busy host, imported inside run_agent): an agent restarted after a crash must take its
predecessor's arm over within the watchdog device's timeout (docs/watchdog.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import TYPE_CHECKING

from kvmha.agent.config import AgentConfig, ConfigError, load_config
from kvmha.agent.watchdog_client import ContactNote, WatchdogClient, arm_at_start

if TYPE_CHECKING:
    from kvmha.agent.libvirt_adapter import LibvirtHypervisor
    from kvmha.proto.v1 import agent_pb2 as pb

log = logging.getLogger("kvmha.agent")

_KV = re.compile(r"""(\w+)=('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""")


class KvFormatter(logging.Formatter):
    """One line per event: `ts=... level=... logger=... event=... key=value ...` (messages are already k=v)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        line = f"ts={ts} level={record.levelname.lower()} logger={record.name} {record.getMessage()}"
        if record.exc_info:
            line += f" exc={self.formatException(record.exc_info)!r}"
        return line


class JsonFormatter(logging.Formatter):
    """The same events as one JSON object per line; k=v pairs of the message become fields."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, object] = {"ts": ts, "level": record.levelname.lower(), "logger": record.name}
        message = record.getMessage()
        pairs = _KV.findall(message)
        if pairs:
            for key, value in pairs:
                out[key] = value[1:-1] if value[:1] in "'\"" and len(value) > 1 else value
        else:
            out["msg"] = message
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else KvFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.getLogger("grpc").setLevel(logging.WARNING)


def _agent_version() -> str:
    try:
        return metadata.version("kvmha")
    except metadata.PackageNotFoundError:
        return "0+unknown"


async def run_agent(cfg: AgentConfig, watchdog: WatchdogClient | None = None,
                    takeover: ContactNote | None = None) -> None:
    """Run until SIGTERM/SIGINT. `watchdog`: the client main() armed (or tried to), `takeover` its predecessor's
    note when this agent took a crashed agent's arm over."""
    # Here, not at the top: see the module docstring (the watchdog is armed before these take their time).
    from kvmha.agent.commands import CommandRunner
    from kvmha.agent.heartbeat import HeartbeatWriter
    from kvmha.agent.hypervisor import MigrationOptions
    from kvmha.agent.isolation import IsolationMonitor
    from kvmha.agent.lease import read_lock_config
    from kvmha.agent.libvirt_adapter import LibvirtHypervisor
    from kvmha.agent.link import AgentLink, LinkSettings
    from kvmha.agent.watchdog_agent import SelfFence

    started_at = time.monotonic()
    hypervisor = LibvirtHypervisor(cfg.libvirt_uri)
    heartbeat = HeartbeatWriter(cfg.storage_paths, cfg.host_uuid, cfg.heartbeat_interval_s)
    lock_config = read_lock_config(cfg.libvirt_config_dir)
    runner = CommandRunner(hypervisor, cfg.storage_paths, cfg.neighbor_port, lock_config=lock_config,
                           migration_uri=cfg.migration_uri,
                           migration=MigrationOptions(tls=cfg.migration_tls, unsafe=cfg.migration_unsafe))
    settings = LinkSettings(
        managers=cfg.managers, host_uuid=cfg.host_uuid, hostname=cfg.hostname,
        management_address=cfg.management_address, storage_paths=cfg.storage_paths,
        agent_version=_agent_version(), boot_id=str(uuid.uuid4()), ping_interval_s=cfg.ping_interval_s,
        resync_interval_s=cfg.resync_interval_s, reconnect_max_s=cfg.reconnect_max_s, tls_ca=cfg.tls_ca,
        tls_cert=cfg.tls_cert, tls_key=cfg.tls_key, inventory=_inventory_source(cfg, hypervisor))
    isolation = IsolationMonitor(hypervisor, cfg.isolation_policy, cfg.isolation_after_s,
                                 storage_configured=bool(cfg.storage_paths), started_at=started_at)
    # Issue 11: kvmha-watchdog backs the agent's liveness and its isolation response (kvmha.agent.watchdog_agent).
    self_fence = SelfFence(isolation, heartbeat, lock_config, watchdog)
    link = AgentLink(settings, hypervisor, runner, heartbeat, self_fence.hooks())
    self_fence.link = link
    if takeover is not None:
        self_fence.takeover(takeover)  # the isolation clock continues from the predecessor's last contact
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # Pets from here on, also while the start below waits for libvirt.
    keeper = asyncio.ensure_future(self_fence.keeper.run(stop)) if self_fence.keeper is not None else None
    log.info("event=agent_starting host_uuid=%s hostname=%s managers=%s libvirt_uri=%s storage_paths=%s "
             "isolation_policy=%s isolation_after_s=%.1f version=%s", cfg.host_uuid, cfg.hostname,
             ",".join(cfg.managers), cfg.libvirt_uri, ",".join(cfg.storage_paths) or "-", cfg.isolation_policy,
             cfg.isolation_after_s, settings.agent_version)
    if not cfg.tls_ca:
        log.warning("event=plaintext_link warning='NO TLS: allow_insecure_plaintext is set; anyone on the path can "
                    "read and forge this host's link to the manager'")
    if not lock_config.leases_on:
        log.warning("event=no_disk_leases lock_manager=%r error=%r why='without virtlockd leases nothing on the "
                    "hypervisor refuses a second start of a disk'", lock_config.lock_manager, lock_config.error)
    hypervisor.subscribe(link)
    hypervisor.open()
    heartbeat.start()
    # A short wait so the first Hello carries capacity and versions; a dead libvirtd must not hold the link back.
    if not await loop.run_in_executor(None, hypervisor.wait_connected, 5.0):
        log.warning("event=libvirt_not_connected_at_start uri=%s waited_s=5", cfg.libvirt_uri)

    isolation_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="isolation")

    async def watch_isolation() -> None:
        while not stop.is_set():
            # tick() may destroy domains (blocking libvirt calls): off the loop that sends pings.
            await loop.run_in_executor(isolation_thread, lambda: isolation.tick(
                time.monotonic(), link.manager_seen_at, heartbeat.last_ok_at()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    watcher = asyncio.ensure_future(watch_isolation())
    try:
        await link.run(stop)
    finally:
        watcher.cancel()
        if keeper is not None:
            keeper.cancel()
        if self_fence.keeper is not None and stop.is_set():
            # A planned stop (SIGTERM/SIGINT, Goodbye sent): disarm. Any other way out leaves the arm orphaned,
            # and the host resets unless a restarted agent takes it over in time.
            self_fence.keeper.disarm()
        isolation_thread.shutdown(wait=False, cancel_futures=True)
        heartbeat.stop()
        hypervisor.close()
        log.info("event=agent_stopped")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = load_config(argv)
    except ConfigError as exc:
        print(f"kvmha-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_format)
    responds = cfg.isolation_policy != "none" and bool(cfg.storage_paths)  # as IsolationMonitor decides
    watchdog, takeover = arm_at_start(cfg.watchdog_socket, cfg.watchdog_timeout_s, responds) \
        if cfg.watchdog_enabled else (None, None)
    asyncio.run(run_agent(cfg, watchdog, takeover))
    logging.shutdown()
    # The Goodbye is out and libvirt is closed. Worker threads may still sit in a blocking call (a StopVm waiting
    # for its guest, a read on a hung NFS mount); joining them would hold the exit hostage, so leave now.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())


def _inventory_source(cfg: AgentConfig, hypervisor: LibvirtHypervisor) -> Callable[[], pb.Inventory]:
    """Storage, networks, free memory (MemAvailable) and reserve for the manager's placement (agent/inventory.py)."""
    from kvmha.agent import inventory
    from kvmha.agent.hypervisor import HypervisorError

    probe = inventory.HealthProbe()
    reserve = cfg.memory_reserve_mib if cfg.memory_reserve_mib >= 0 else None

    def read() -> pb.Inventory:
        try:
            networks = hypervisor.active_networks()
        except HypervisorError:
            networks = []
        return inventory.collect(cfg.host_uuid, inventory.mem_available_mib(), reserve, networks, probe=probe)

    return read
