"""`kvmha-manager`: the composition root. Wires settings, database, the service (driver + production environment),
gRPC servers and metrics, and stops the process if the driver fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from kvmha.manager import logs
from kvmha.manager.adapters.admin import AdminServicer
from kvmha.manager.adapters.agent_link import AgentLinkServicer
from kvmha.manager.adapters.db import make_engine, migrate
from kvmha.manager.adapters.ipmi_zygote import close_shared_zygote, shared_zygote
from kvmha.manager.adapters.repository import SqlStore
from kvmha.manager.dashboard.wiring import dashboard_settings, start_dashboard
from kvmha.manager.fencing import ipmi_factory
from kvmha.manager.metrics import Metrics
from kvmha.manager.security.auth import RoleInterceptor, server_credentials
from kvmha.manager.security.roles import Role
from kvmha.manager.security.secrets import SecretBox, SecretError
from kvmha.manager.service import ManagerService, ServiceSettings
from kvmha.manager.settings import ManagerSettings, SettingsError, environment, load, parse_args, split_address
from kvmha.proto.v1 import admin_pb2_grpc, agent_pb2_grpc

log = logging.getLogger("kvmha.manager")
VERSION = "0.1.0"
MAX_MESSAGE_BYTES = 8 << 20  # a full report of thousands of domains fits; a larger message is refused
METRICS_REFRESH_S = 5.0
CAPACITY_REFRESH_S = 60.0  # the capacity gauges (issue 16): a worst-failure plan is O(hosts^2)
HEALTH_SERVICE = "kvmha.v1.AgentLink"
ADMIN_CONCURRENT_RPCS = 64  # event followers included
STOP_GRACE_S = 2.0  # calls in flight get this long once the manager stops
STOP_DEADLINE_S = 4.5  # SIGTERM to exit, at most (issue 14: <= 5 s under 10,000 agents)
# Evidence at once (core/linkloss.py): a host that loses its power or its cable closes nothing, so the manager pings
# every agent itself, every half second, and drops a link whose ping is not answered within half a second (0.5-1 s
# after the host vanished); the broken stream makes the core ask the BMC at once instead of waiting for
# ping.timeout. The manager sends little data on these streams, so pings without data must not be capped (gRPC's
# default stops after two). Agents accept server pings at any rate (gRPC enforces ping rates on servers only). A
# false alarm costs a reconnect and one BMC query that reads "on" (none seen in bench/failover.py at load 6).
AGENT_KEEPALIVE = [("grpc.keepalive_time_ms", 500), ("grpc.keepalive_timeout_ms", 500),
                   ("grpc.http2.max_pings_without_data", 0), ("grpc.keepalive_permit_without_calls", 1)]
SWITCH_INTERVAL_S = 0.001  # the GIL hand-over period (sys.setswitchinterval; Python's default 0.005)


def main(argv: list[str] | None = None) -> int:
    config_path, flags = parse_args(argv)
    try:
        settings = load(config_path, environment(), flags)
    except SettingsError as error:
        print(f"kvmha-manager: {error}", file=sys.stderr)
        return 2
    logs.configure(settings.log_format, settings.log_level)
    # The state this manager writes (the SQLite file, the secrets key) is for its user alone, also when it runs
    # outside systemd (whose unit says UMask=0077 too).
    os.umask(0o077)
    # The event loop thread reads thousands of streams and rarely lets go of the GIL; a database worker thread that
    # released it for a round trip waits up to the switch interval to get it back, at every round trip (a batch's
    # transaction of a few thousand statements took tens of seconds at 7,000 agents with the default 5 ms).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        asyncio.run(serve(settings, on_stopping=_stop_deadline))
    except KeyboardInterrupt:
        pass
    except SecretError as error:
        print(f"kvmha-manager: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        log.exception("event=manager_failed error=%s", error)
        return 1
    return 0


def _credentials(settings: ManagerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        log.warning("event=plaintext_listeners agents=%s admin=%s warning=%s", settings.listen, settings.admin_listen,
                    "NO TLS: any peer can claim to be any host and every admin caller is an admin")
        return None
    return server_credentials(Path(settings.tls_cert), Path(settings.tls_key), Path(settings.tls_ca))


def _add_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> None:
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise SettingsError(f"cannot listen on {address}")


def _stop_deadline() -> None:
    """Once stopping, the process ends within STOP_DEADLINE_S whatever still runs (a transaction stuck on a dead
    database, thousands of streams closing): everything the manager did is recorded before it acted (persist
    first), so ending here loses nothing a restart would not recover."""

    def exit_now() -> None:
        log.warning("event=stop_deadline seconds=%.1f action=exit_now", STOP_DEADLINE_S)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(STOP_DEADLINE_S, exit_now)
    timer.daemon = True
    timer.start()


def _seal_stored_passwords(store: SqlStore) -> None:
    with store.unit_of_work() as uow:
        sealed = uow.hosts.seal_stored_passwords()
        uow.commit()
    if sealed:
        log.info("event=bmc_passwords_sealed count=%d", sealed)


async def serve(settings: ManagerSettings, ready: asyncio.Event | None = None,
                on_stopping: Callable[[], None] | None = None) -> None:
    engine = make_engine(settings.database)
    await _migrate_when_reachable(engine)
    metrics = Metrics()
    secrets = SecretBox.from_file(Path(settings.secrets_key))
    store = SqlStore(engine, secrets=secrets)
    await asyncio.to_thread(_seal_stored_passwords, store)
    service = ManagerService(
        store,
        ServiceSettings(manager_id=settings.manager_id, address=settings.listen, version=VERSION,
                        auto_register_hosts=settings.auto_register_hosts,
                        config_overrides=settings.config_overrides),
        fencer_factory=ipmi_factory(settings.manager_id), metrics=metrics)
    await service.start()
    # The IPMI zygote pays the interpreter start and the pyghmi import now, not during the first investigation.
    shared_zygote().start()
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
               ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
               ("grpc.http2.min_ping_interval_without_data_ms", 5_000)]
    credentials = _credentials(settings)
    keepalive = dict(AGENT_KEEPALIVE)
    agents = grpc.aio.server(options=[*(o for o in options if o[0] not in keepalive), *AGENT_KEEPALIVE])
    agent_pb2_grpc.add_AgentLinkServicer_to_server(AgentLinkServicer(service, service.links,
                                                                  host_certificates=credentials is not None), agents)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, agents)
    _add_port(agents, settings.listen, credentials)
    # Roles are checked in one place (security/auth.py); plaintext has no identities, so its callers are admins.
    plaintext_role = Role.ADMIN if credentials is None else None
    # Push back on operators rather than queue without end: beyond ADMIN_CONCURRENT_RPCS calls at once, a new one is
    # refused with RESOURCE_EXHAUSTED (the CLI says so); listings are paged, so each call is short.
    admin = grpc.aio.server(options=options, interceptors=[RoleInterceptor(plaintext_role)],
                            maximum_concurrent_rpcs=ADMIN_CONCURRENT_RPCS)
    admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(service, settings.domain_xml_allow), admin)
    _add_port(admin, settings.admin_listen, credentials)
    if settings.metrics_listen:
        host, port = split_address(settings.metrics_listen)
        metrics.serve(port, host)
    await agents.start()
    await admin.start()
    # The dashboard runs in its own threads and reads through the store port: it never delays the driver.
    dashboard = start_dashboard(dashboard_settings(settings), store, service) if settings.dashboard_listen else None
    for name in ("", HEALTH_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("event=listening agents=%s admin=%s metrics=%s dashboard=%s database=%s", settings.listen,
             settings.admin_listen, settings.metrics_listen or "off", dashboard.url if dashboard else "off",
             engine.url.render_as_string(hide_password=True))
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    refresher = asyncio.create_task(_refresh_metrics(service, health_servicer))
    stopping = asyncio.create_task(stop.wait())
    try:
        # The driver ends only with a core bug (an impossible transition): stop the manager loudly; a restart
        # rebuilds the core from its records.
        await asyncio.wait([stopping, service.driver.task], return_when=asyncio.FIRST_COMPLETED)
        if service.driver.task.done() and not service.driver.task.cancelled():
            error = service.driver.task.exception()
            log.critical("event=driver_failed error=%r", error)
            raise RuntimeError("the manager's driver failed") from error
    finally:
        if on_stopping is not None:
            on_stopping()
        stopping.cancel()
        log.info("event=manager_stopping")
        for name in ("", HEALTH_SERVICE):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        refresher.cancel()
        if dashboard is not None:
            await asyncio.to_thread(dashboard.stop)
        await service.stop()
        await asyncio.to_thread(close_shared_zygote)  # its children (fences in flight) are killed with it
        await asyncio.gather(agents.stop(grace=STOP_GRACE_S), admin.stop(grace=STOP_GRACE_S))
        engine.dispose()
        log.info("event=manager_stopped")


async def _migrate_when_reachable(engine: Engine) -> None:
    """A database that is down at start is waited for (with a clear line in the log), not a crash loop."""
    delay_s = 1.0
    while True:
        try:
            await asyncio.to_thread(migrate, engine)
            return
        except OperationalError as error:
            log.error("event=database_unreachable url=%s error=%s retry_in_s=%.0f",
                      engine.url.render_as_string(hide_password=True), str(error).splitlines()[0][:300], delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 30.0)


async def _refresh_metrics(service: ManagerService, health: health_aio.HealthServicer) -> None:
    """Gauges every few seconds; the health status every second: NOT_SERVING while the driver says why (the store
    has not committed, or a batch has not finished, for longer than its set time), said once each way."""
    not_serving: str | None = None
    tick = 0
    while True:
        reason = service.driver.health()
        if (reason is None) != (not_serving is None):
            status = health_pb2.HealthCheckResponse.SERVING if reason is None else \
                health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", HEALTH_SERVICE):
                await health.set(name, status)
            if reason is None:
                log.warning("event=health status=SERVING")
            else:
                log.error("event=health status=NOT_SERVING reason=%s", reason)
        not_serving = reason
        core = service.core
        if core is not None and tick % int(METRICS_REFRESH_S) == 0:
            service.metrics.refresh(core.hosts.values(), core.vms, core.works.values(), len(service.links))
        if core is not None and tick % int(CAPACITY_REFRESH_S) == 0:
            # a plan per host: ~0.5 s of the loop at 1,000 hosts (bench/capacity_plan.py), so once a minute
            _, worst = core.worst_failure()
            service.metrics.refresh_capacity(core.headroom(), sum(1 for p in worst if p.ha and p.target is None))
        service.metrics.backlog.set(service.driver.backlog)
        service.metrics.coalesced.set(service.driver.coalesced)
        hearing = service.driver.hearing
        service.metrics.hearing_lag.labels("loop").set(hearing.loop_lag_s(service.driver.env.clock.monotonic()))
        service.metrics.hearing_lag.labels("transit").set(hearing.transit_lag_s)
        tick += 1
        await asyncio.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main())
