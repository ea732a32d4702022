"""The dashboard's composition: from the manager's settings, store and service to a started `Dashboard`.

Called by the manager's composition root (main.serve) only when [dashboard] listen is set.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from kvmha.manager.dashboard.auth import TokenBook
from kvmha.manager.dashboard.server import Dashboard, DashboardSettings
from kvmha.manager.dashboard.source import EventFeed, Source, live_from_loop
from kvmha.manager.service import ManagerService
from kvmha.manager.settings import ManagerSettings
from kvmha.manager.store import Store


def dashboard_settings(settings: ManagerSettings) -> DashboardSettings:
    return DashboardSettings(settings.dashboard_listen, settings.dashboard_cert, settings.dashboard_key,
                             Path(settings.dashboard_tokens))


def start_dashboard(settings: DashboardSettings, store: Store, service: ManagerService) -> Dashboard:
    """Must be called on the driver's loop (it captures it for the live view of the agents' links)."""
    loop = asyncio.get_running_loop()
    source = Source(store, live_from_loop(loop, service.live_hosts), lambda: service.config.ping_timeout_s)
    feed = EventFeed(source)
    service.on_events_recorded(feed.wake)
    dashboard = Dashboard(settings, source, feed, TokenBook(settings.tokens))
    dashboard.start()
    return dashboard
