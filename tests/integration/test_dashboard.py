"""The dashboard of a real `kvmha-manager` (no lab): its own HTTPS port, token roles, pages, the JSON API, the
OpenAPI document and the live event stream.

A manager with [dashboard] on (self-signed certificate, token book in the test's folder) and two agents on
libvirt's test driver, all on 127.0.0.1 (SQLite). Every route of the server's table is walked without a
credential, with a bad one and with a reader token.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from kvmha.lab.bmc import find_free_port
from kvmha.lab.dashboard import DashboardClient, LabDashboard
from kvmha.lab.testing.local import LocalCluster
from kvmha.lab.wait import wait_for
from kvmha.manager.dashboard.auth import Role, TokenBook
from kvmha.manager.dashboard.server import MAX_CONNECTIONS, ROUTES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

FAST = {"ping.interval": "1", "ping.timeout": "3.5", "startup.grace": "4", "heartbeat.stale.after": "2"}
# A concrete path for each route pattern (the table is walked, so a new route must be added here).
SAMPLE_PATHS = {
    "page_cluster": "/", "page_vms": "/vms", "page_vm": "/vms/nosuchvm", "page_work": "/work",
    "page_events": "/events", "page_failures": "/failures", "failure_svg": "/failures/1.svg", "page_api": "/api",
    "api_whoami": "/api/v1/whoami", "api_cluster": "/api/v1/cluster", "api_hosts": "/api/v1/hosts",
    "api_host": "/api/v1/hosts/h1", "api_vms": "/api/v1/vms", "api_vm": "/api/v1/vms/nosuchvm",
    "api_work": "/api/v1/work", "api_events": "/api/v1/events", "api_stream": "/api/v1/events/stream",
    "api_failures": "/api/v1/failures", "api_openapi": "/api/v1/openapi.json", "page_login": "/login",
    "login": "/login", "logout": "/logout", "static": "/static/dashboard.css", "favicon": "/favicon.ico",
}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, LabDashboard]]:
    tmp_path: Path = tmp_path_factory.mktemp("dashboard")
    dashboard = LabDashboard.make(tmp_path / "dash", find_free_port())
    cluster = LocalCluster(tmp_path, f"sqlite:///{tmp_path / 'kvmha.sqlite'}", core_config=dict(FAST))
    cluster.dashboard_toml = dashboard.toml()
    try:
        cluster.start_manager()
        for name in ("h1", "h2"):
            cluster.start_agent(name, settings={"reconnect_max_s": 1.0})
        wait_for(lambda: (h := cluster.hosts()) and all(n in h and h[n].status == "Up" for n in ("h1", "h2")),
                 30, "h1 and h2 Up")
        yield cluster, dashboard
    finally:
        cluster.close()


@pytest.fixture
def client(running: tuple[LocalCluster, LabDashboard]) -> DashboardClient:
    return running[1].client()


def test_every_route_needs_its_role(running: tuple[LocalCluster, LabDashboard]) -> None:
    _, dashboard = running
    anonymous, forged = dashboard.client(token=""), dashboard.client(token="kvd_" + "x" * 43)
    assert {r.handler for r in ROUTES} == set(SAMPLE_PATHS), "a route without a sample path"
    for route in ROUTES:
        path = SAMPLE_PATHS[route.handler]
        for who in (anonymous, forged):
            reply = who.request(route.method, path, b"" if route.method == "POST" else None)
            if route.handler == "login":  # the sign-in form itself: an empty or wrong token is refused there
                assert reply.status == 401 and "Sign in" in reply.text
            elif route.role is None:
                assert reply.status not in (401, 403), (route.handler, reply.status)
            elif path.startswith("/api/"):
                assert reply.status == 401, (route.handler, reply.status)
                assert reply.headers["WWW-Authenticate"].startswith("Bearer")
                assert json.loads(reply.body)["error"]
            else:
                assert reply.status == 303, (route.handler, reply.status)
                assert reply.headers["Location"].startswith("/login?")


def test_roles_rank_and_revocation(running: tuple[LocalCluster, LabDashboard]) -> None:
    _, dashboard = running
    book = TokenBook(dashboard.tokens)
    for role in Role:
        entry, secret = book.issue(role, f"test-{role.value}")
        reply = dashboard.client(secret).get("/api/v1/whoami")
        assert reply.status == 200 and reply.json() == {"token_id": entry.id, "name": f"test-{role.value}",
                                                        "role": role.value}
        assert book.revoke(entry.id)
        # The manager re-reads the book when it changes: the revoked token is refused at once.
        assert dashboard.client(secret).get("/api/v1/whoami").status == 401


def test_browser_sign_in_by_link_and_form(running: tuple[LocalCluster, LabDashboard]) -> None:
    _, dashboard = running
    anonymous = dashboard.client(token="")
    # A ?token= link: the token moves into a Secure HttpOnly cookie and leaves the address bar.
    reply = anonymous.get("/vms?" + urlencode({"token": dashboard.token, "q": "x"}))
    assert reply.status == 303 and reply.headers["Location"] == "/vms?q=x"
    cookie = reply.headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    value = cookie.split(";")[0]
    assert anonymous.get("/vms", headers={"Cookie": value}).status == 200
    # The form: a wrong token is told so; a right one lands on the page asked for (never on another site).
    bad = anonymous.request("POST", "/login", urlencode({"token": "nope", "next": "/work"}).encode())
    assert bad.status == 401 and "not valid" in bad.text
    form = urlencode({"token": dashboard.token, "next": "//evil.example/"}).encode()
    good = anonymous.request("POST", "/login", form)
    assert good.status == 303 and good.headers["Location"] == "/"
    assert anonymous.get("/?token=kvd_wrong").status == 401


def test_pages_show_hosts_and_security_headers(client: DashboardClient) -> None:
    page = client.get("/")
    assert page.status == 200
    assert 'data-host="h1"' in page.text and 'data-host="h2"' in page.text
    assert "status-up" in page.text
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert page.headers["Cache-Control"] == "no-store"
    for path in ("/vms", "/work", "/events?subject=host%3A&severity=info", "/failures", "/api"):
        reply = client.get(path)
        assert reply.status == 200, (path, reply.text[:300])
        assert "<script" not in reply.text.replace('<script src="/static/dashboard.js" defer></script>', "")
    missing = client.get("/vms/nosuchvm")
    assert missing.status == 404 and "nosuchvm" in missing.text
    assert client.get("/static/dashboard.js").headers["Content-Type"].startswith("text/javascript")


def test_api_is_the_same_data_as_the_admin_api(running: tuple[LocalCluster, LabDashboard],
                                               client: DashboardClient) -> None:
    cluster, _ = running
    hosts = {h["name"]: h for h in client.get("/api/v1/hosts").json()}
    admin = cluster.hosts()
    assert set(hosts) == set(admin)
    for name, host in hosts.items():
        assert host["status"] == admin[name].status and host["uuid"] == admin[name].uuid
        assert host["cpus"] == admin[name].cpus and host["connected"] == admin[name].connected
        assert {h["name"] for h in host["health"]} == {"agent", "ping", "bmc", "lease", "watchdog"}
    assert client.get("/api/v1/hosts/h1").json()["name"] == "h1"
    assert client.get("/api/v1/hosts/nope").status == 404
    events = client.get("/api/v1/events?limit=1000").json()
    assert [e["id"] for e in events] == [e.id for e in cluster.events()][:len(events)]
    only = client.get("/api/v1/events?subject=host%3A&severity=info").json()
    assert only and all(e["subject"].startswith("host:") for e in only)
    ids = {f"host:{h.id}": name for name, h in admin.items()}
    assert all(e["subject_name"] == ids[e["subject"]] for e in only)
    assert client.get("/api/v1/events?after_id=x").status == 400
    cluster_view = client.get("/api/v1/cluster").json()
    assert cluster_view["counts"]["hosts"] == 2


def test_openapi_document_lists_every_api_route(client: DashboardClient) -> None:
    document = client.get("/api/v1/openapi.json", auth=False).json()
    assert document["openapi"].startswith("3.")
    api_routes = {SAMPLE_PATHS[r.handler] for r in ROUTES if SAMPLE_PATHS[r.handler].startswith("/api/v1/")}
    documented = set(document["paths"])
    for path in api_routes:
        generic = path.replace("/h1", "/{ref}").replace("/nosuchvm", "/{ref}")
        assert generic in documented, generic
    text = json.dumps(document)
    assert all(f"#/components/schemas/{name}" in text for name in document["components"]["schemas"])


def _read_events(stream: Any, wanted: int, into: list[dict[str, Any]], done: threading.Event) -> None:
    try:
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("data: "):
                into.append(json.loads(line[6:]))
                if len(into) >= wanted:
                    break
    except OSError:
        pass
    finally:
        done.set()


def test_event_stream_delivers_new_events_live(running: tuple[LocalCluster, LabDashboard],
                                               client: DashboardClient) -> None:
    cluster, _ = running
    last = max(e["id"] for e in client.get("/api/v1/events?limit=10000").json())
    received: list[dict[str, Any]] = []
    done = threading.Event()
    stream = client.open_stream(f"/api/v1/events/stream?after_id={last}&subject=host%3A", timeout_s=30)
    reader = threading.Thread(target=_read_events, args=(stream, 1, received, done), daemon=True)
    reader.start()
    try:
        time.sleep(0.5)
        # h2's agent says goodbye: the manager records host.status for it, and the stream carries it.
        cluster.agents["h2"].stop()
        assert done.wait(20), f"no event streamed\n{cluster.story()}"
    finally:
        stream.close()
    assert received[0]["subject"].startswith("host:") and received[0]["id"] > last
    cluster.start_agent("h2", settings={"reconnect_max_s": 1.0})
    wait_for(lambda: cluster.hosts()["h2"].status == "Up", 30, "h2 Up again")


def test_many_viewers_are_capped_and_leave_the_manager_alone(running: tuple[LocalCluster, LabDashboard],
                                                             client: DashboardClient) -> None:
    """A page hammering for two ping timeouts leaves the hosts Up (their pings were never delayed into a timeout);
    MAX_CONNECTIONS streams held open get more connections refused; closing them frees every slot again (a closed
    stream is noticed within a second, not at its next keepalive)."""
    cluster, _ = running
    before = max(e.id for e in cluster.events())
    stop = time.monotonic() + float(FAST["ping.timeout"]) * 2
    pages = 0
    while time.monotonic() < stop:
        for path in ("/", "/vms", "/failures", "/api/v1/cluster"):
            assert client.get(path).status == 200
            pages += 1
    hosts = cluster.hosts()
    assert all(h.status == "Up" for h in hosts.values()), cluster.story()
    behind = [e.message for e in cluster.events(after_id=before) if e.kind == "host.status"]
    assert not behind, f"hosts changed status under the dashboard's load ({pages} pages): {behind}"

    streams = _open_streams(client, MAX_CONNECTIONS)
    try:
        try:  # one more connection gets a bare 503 before any TLS, which the client may read or fail on
            answered: int | None = client.get("/api/v1/whoami", timeout_s=5).status
        except OSError:
            answered = None
        assert answered in (None, 503), f"connection {MAX_CONNECTIONS + 1} was served ({answered})"
    finally:
        for stream in streams:
            stream.close()

    def all_slots_free() -> bool:
        """MAX_CONNECTIONS streams can be held at once again."""
        try:
            again = _open_streams(client, MAX_CONNECTIONS)
        except OSError:  # urllib's HTTPError (503) is an OSError too
            return False
        for stream in again:
            stream.close()
        return True

    # Polled every 2 s: a failed try's own streams, closed, need their second to be noticed too.
    wait_for(all_slots_free, 15, "every slot free again", interval_s=2.0)


def _open_streams(client: DashboardClient, count: int) -> list[Any]:
    """`count` event streams held open; on any failure the ones opened are closed and the error raised."""
    streams: list[Any] = []
    try:
        for _ in range(count):
            streams.append(client.open_stream("/api/v1/events/stream", timeout_s=30))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams
