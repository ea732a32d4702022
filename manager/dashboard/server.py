"""The dashboard's HTTPS server: its own port, its own threads, read-only.

Standard library only (`http.server.ThreadingHTTPServer` + `ssl`): a thread per connection suits a handful of
operators' browsers and Server-Sent Event streams, needs no new dependency, and keeps the dashboard entirely off
the driver's event loop (reads go through source.py). Limits keep it from hurting the manager: at most
`MAX_CONNECTIONS` open connections (more get 503), at most one database read at a time (source.py).

Authentication: a bearer token (`Authorization: Bearer ...`) or the `kvmha_dashboard` cookie a browser gets from the
sign-in form or a `?token=` link (the token then leaves the address bar by a redirect). Every route names the least
role it needs in `ROUTES`; `None` marks the few public ones (sign-in, static files, the OpenAPI document).
Responses carry a strict Content-Security-Policy (only the manager's own scripts and styles), no-store caching for
data, and HSTS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from kvmha.manager import operations as ops
from kvmha.manager.dashboard import api, pages, svg
from kvmha.manager.dashboard.auth import Principal, Role, TokenBook, TokenError
from kvmha.manager.dashboard.source import EventFeed, Source
from kvmha.manager.dashboard.view import build_vm_page, matches, search_vms
from kvmha.manager.operations import OperationError
from kvmha.manager.store import EventRow

log = logging.getLogger("kvmha.manager.dashboard")
COOKIE = "kvmha_dashboard"
TOKEN_IN_QUERY = re.compile(r"(token=)[^&\s\"]*")
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 30.0
STREAM_KEEPALIVE_S = 15.0
STREAM_CHECK_S = 1.0
REFUSE_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 4096
STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=31536000",
}


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    role: Role | None  # None: public
    handler: str  # the Handler method serving it


def _route(method: str, path: str, role: Role | None, handler: str) -> Route:
    return Route(method, re.compile(f"^{path}$"), role, handler)


R = Role.READER
ROUTES: tuple[Route, ...] = (
    _route("GET", "/", R, "page_cluster"),
    _route("GET", "/vms", R, "page_vms"),
    _route("GET", r"/vms/(?P<ref>[^/]+)", R, "page_vm"),
    _route("GET", "/work", R, "page_work"),
    _route("GET", "/events", R, "page_events"),
    _route("GET", "/failures", R, "page_failures"),
    _route("GET", r"/failures/(?P<id>\d+)\.svg", R, "failure_svg"),
    _route("GET", "/api", R, "page_api"),
    _route("GET", "/api/v1/whoami", R, "api_whoami"),
    _route("GET", "/api/v1/cluster", R, "api_cluster"),
    _route("GET", "/api/v1/hosts", R, "api_hosts"),
    _route("GET", r"/api/v1/hosts/(?P<ref>[^/]+)", R, "api_host"),
    _route("GET", "/api/v1/vms", R, "api_vms"),
    _route("GET", r"/api/v1/vms/(?P<ref>[^/]+)", R, "api_vm"),
    _route("GET", "/api/v1/work", R, "api_work"),
    _route("GET", "/api/v1/events", R, "api_events"),
    _route("GET", "/api/v1/events/stream", R, "api_stream"),
    _route("GET", "/api/v1/failures", R, "api_failures"),
    _route("GET", "/api/v1/openapi.json", None, "api_openapi"),
    _route("GET", "/login", None, "page_login"),
    _route("POST", "/login", None, "login"),
    _route("GET", "/logout", None, "logout"),
    _route("GET", r"/static/(?P<name>[a-z.]+)", None, "static"),
    _route("GET", "/favicon.ico", None, "favicon"),
)


@dataclass(frozen=True)
class DashboardSettings:
    listen: str  # HOST:PORT
    cert: str
    key: str
    tokens: Path


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: Dashboard

    def __init__(self, address: tuple[str, int], app: Dashboard) -> None:
        self.app = app
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.app.slots.acquire(blocking=False):
            # Writing does the TLS handshake here, in the accepting thread: bounded to REFUSE_TIMEOUT_S, so a
            # client that never completes it cannot stall accepting the others.
            with contextlib.suppress(OSError):
                request.settimeout(REFUSE_TIMEOUT_S)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.app.slots.release()


class Dashboard:
    """The server and what it serves; `start()` returns once it listens, `stop()` ends its threads."""

    def __init__(self, settings: DashboardSettings, source: Source, feed: EventFeed, tokens: TokenBook) -> None:
        self.settings, self.source, self.feed, self.tokens = settings, source, feed, tokens
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.load_cert_chain(settings.cert, settings.key)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self.settings.listen.rpartition(":")[0].strip("[]")
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}/"

    def start(self) -> None:
        host, _, port = self.settings.listen.rpartition(":")
        server = _Server((host.strip("[]"), int(port)), self)
        # The TLS handshake happens in the connection's own thread (do_handshake_on_connect=False plus an explicit
        # handshake in Handler.setup): a slow client never holds up accepting the next one.
        server.socket = self._context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        self._server = server
        self.feed.start()
        self._thread = threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True)
        self._thread.start()
        log.info("event=dashboard_listening url=%s", self.url)

    def stop(self) -> None:
        self.feed.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def authenticate(self, token: str) -> Principal | None:
        try:
            return self.tokens.authenticate(token)
        except TokenError as error:
            log.error("event=dashboard_tokens_unreadable error=%s", error)
            return None


class Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def version_string(self) -> str:
        return "kvmha-dashboard"

    def setup(self) -> None:
        self.request.settimeout(REQUEST_TIMEOUT_S)
        try:
            self.request.do_handshake()
        except (OSError, ssl.SSLError):
            self.close_connection = True
            raise
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError, ssl.SSLError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        # A sign-in link carries its token in the request line: never into the log.
        log.debug("event=dashboard_request client=%s %s", self.client_address[0],
                  TOKEN_IN_QUERY.sub(r"\1***", format % args))

    @property
    def app(self) -> Dashboard:
        return self.server.app

    # ------------------------------------------------------------------ dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.principal: Principal | None = None
        path = url.path
        for route in ROUTES:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method != method:
                continue
            if route.role is not None and not self._authorised(route.role, url.path):
                return
            try:
                getattr(self, route.handler)(**{k: unquote(v) for k, v in found.groupdict().items()})
            except OperationError as error:
                self._error(HTTPStatus.NOT_FOUND if error.refusal is ops.Refusal.NOT_FOUND
                            else HTTPStatus.BAD_REQUEST, str(error))
            except OSError:  # the client went away (a closed stream, a reset TLS connection)
                self.close_connection = True
            except Exception as error:  # a bug or the database down: a clear 503, the manager goes on
                log.exception("event=dashboard_failed path=%s", path)
                self._error(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"cannot read the manager's state now ({type(error).__name__})")
            return
        allowed = any(r.pattern.match(path) for r in ROUTES)
        self._error(HTTPStatus.METHOD_NOT_ALLOWED if allowed else HTTPStatus.NOT_FOUND,
                    "method not allowed" if allowed else f"no page {path}")

    def _is_api(self) -> bool:
        return self.path.startswith("/api/v1/")

    def _authorised(self, role: Role, path: str) -> bool:
        token = self.query.get("token")
        if token is not None and not self._is_api():
            principal = self.app.authenticate(token)
            if principal is None:
                self._send_html(HTTPStatus.UNAUTHORIZED, pages.login_page(path, "That token is not valid."))
                return False
            rest = {k: v for k, v in self.query.items() if k != "token"}
            self._redirect(path + (f"?{urlencode(rest)}" if rest else ""), cookie=token)
            return False
        self.principal = self.app.authenticate(self._presented())
        if self.principal is None:
            if self._is_api():
                self._json(HTTPStatus.UNAUTHORIZED, {"error": "a bearer token is needed (kvmha dashboard token)"},
                           {"WWW-Authenticate": 'Bearer realm="kvmha"'})
            else:
                self._redirect("/login?" + urlencode({"next": self.path}))
            return False
        if not self.principal.role.allows(role):
            self._error(HTTPStatus.FORBIDDEN, f"this needs the {role.value} role")
            return False
        return True

    def _presented(self) -> str:
        header = self.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            return header[7:].strip()
        try:
            cookie = SimpleCookie(self.headers.get("Cookie", ""))
        except CookieError:
            return ""
        morsel = cookie.get(COOKIE)
        return morsel.value if morsel is not None else ""

    # ------------------------------------------------------------------ responses

    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None,
              cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_html(self, status: int, text: str) -> None:
        self._send(status, text.encode(), "text/html; charset=utf-8")

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", headers)

    def _error(self, status: int, message: str) -> None:
        if self._is_api():
            self._json(status, {"error": message})
        else:
            self._send_html(status, pages.error_page(status, message, self.principal))

    def _redirect(self, location: str, cookie: str | None = None, clear: bool = False) -> None:
        headers = {"Location": location}
        if cookie is not None:
            headers["Set-Cookie"] = f"{COOKIE}={cookie}; Path=/; Secure; HttpOnly; SameSite=Strict"
        if clear:
            headers["Set-Cookie"] = f"{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0"
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", headers)

    # ------------------------------------------------------------------ pages

    def page_cluster(self) -> None:
        cluster = self.app.source.cluster()
        events = self.app.source.read(lambda uow: uow.events.all(max(0, cluster.last_event_id - 30), 30))
        self._send_html(200, pages.cluster_page(cluster, list(reversed(events)), self.principal))

    def page_vms(self) -> None:
        cluster = self.app.source.cluster()
        query = self.query.get("q", "")
        self._send_html(200, pages.vms_page(search_vms(cluster.vms, query), query, self.principal,
                                            cluster.last_event_id))

    def page_vm(self, ref: str) -> None:
        page = self.app.source.read(lambda uow: build_vm_page(uow, ops.vm(uow, ref)))
        self._send_html(200, pages.vm_page(page, self.principal, self.app.feed.last_id))

    def page_work(self) -> None:
        cluster = self.app.source.cluster()
        self._send_html(200, pages.work_page(cluster.work, self.principal, cluster.last_event_id))

    def page_events(self) -> None:
        subject, severity = self.query.get("subject", "").strip(), self.query.get("severity", "info")
        rows = self._recent_events(subject, severity, 200)
        self._send_html(200, pages.events_page(list(reversed(rows)), subject, severity, self.principal,
                                               self.app.feed.last_id, self.app.source.cluster().names))

    def _recent_events(self, subject: str, severity: str, limit: int) -> list[EventRow]:
        exact = subject if subject and not subject.endswith(":") else ""

        def read(uow: Any) -> list[EventRow]:
            last = uow.events.last_id()
            return list(uow.events.all(max(0, last - 5000), 5000, exact))

        return [r for r in self.app.source.read(read) if matches(r, subject, severity)][-limit:]

    def page_failures(self) -> None:
        self._send_html(200, pages.failures_page(self.app.source.failures(), self.app.source.clock(),
                                                 self.principal, self.app.feed.last_id))

    def failure_svg(self, id: str) -> None:
        found = [f for f in self.app.source.failures() if f.id == int(id)]
        if not found:
            self._error(HTTPStatus.NOT_FOUND, f"no failure {id}")
            return
        text = svg.render(found[0], self.app.source.clock(), f"svg-{id}")
        self._send(200, text.encode(), "image/svg+xml",
                   {"Content-Disposition": f'attachment; filename="kvmha-failure-{id}.svg"'})

    def page_api(self) -> None:
        self._send_html(200, pages.api_page(self.principal))

    def page_login(self) -> None:
        self._send_html(200, pages.login_page(_local(self.query.get("next", "/"))))

    def login(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too large")
            return
        form = {k: v[-1] for k, v in parse_qs(self.rfile.read(length).decode(errors="replace")).items()}
        token, next_path = form.get("token", "").strip(), _local(form.get("next", "/"))
        if self.app.authenticate(token) is None:
            self._send_html(HTTPStatus.UNAUTHORIZED, pages.login_page(next_path, "That token is not valid."))
            return
        self._redirect(next_path, cookie=token)

    def logout(self) -> None:
        self._redirect("/login", clear=True)

    def static(self, name: str) -> None:
        if name not in STATIC:
            self._error(HTTPStatus.NOT_FOUND, f"no file {name}")
            return
        body = resources.files("kvmha.manager.dashboard").joinpath("static", name).read_bytes()
        self._send(200, body, STATIC[name], cache="max-age=300")

    def favicon(self) -> None:
        self._redirect("/static/favicon.svg")

    # ------------------------------------------------------------------ API

    def api_whoami(self) -> None:
        assert self.principal is not None
        self._json(200, {"token_id": self.principal.token_id, "name": self.principal.name,
                         "role": self.principal.role.value})

    def api_cluster(self) -> None:
        self._json(200, api.plain(self.app.source.cluster()))

    def api_hosts(self) -> None:
        self._json(200, api.plain(self.app.source.cluster().hosts))

    def api_host(self, ref: str) -> None:
        hosts = [h for h in self.app.source.cluster().hosts if ref in (str(h.id), h.name, h.uuid)]
        if not hosts:
            self._error(HTTPStatus.NOT_FOUND, f"no host {ref!r}")
            return
        self._json(200, api.plain(hosts[0]))

    def api_vms(self) -> None:
        self._json(200, api.plain(search_vms(self.app.source.cluster().vms, self.query.get("q", ""))))

    def api_vm(self, ref: str) -> None:
        self._json(200, api.plain(self.app.source.read(lambda uow: build_vm_page(uow, ops.vm(uow, ref)))))

    def api_work(self) -> None:
        self._json(200, api.plain(self.app.source.cluster().work))

    def api_events(self) -> None:
        try:
            after, limit = int(self.query.get("after_id", 0)), min(int(self.query.get("limit", 200)), 10_000)
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "after_id and limit are integers")
            return
        subject, severity = self.query.get("subject", ""), self.query.get("severity", "info")
        exact = subject if subject and not subject.endswith(":") else ""
        rows = self.app.source.read(lambda uow: uow.events.all(after, limit, exact))
        names = self.app.source.cluster().names
        self._json(200, api.events([r for r in rows if matches(r, subject, severity)], names))

    def api_failures(self) -> None:
        self._json(200, [api.failure(f) for f in self.app.source.failures()])

    def api_openapi(self) -> None:
        self._json(200, api.openapi())

    def api_stream(self) -> None:
        """Server-Sent Events: one `event` per row (id = event id, so a reconnect resumes after the last seen)."""
        try:
            after = int(self.headers.get("Last-Event-ID") or self.query.get("after_id") or self.app.feed.last_id)
        except ValueError:
            self._error(HTTPStatus.BAD_REQUEST, "after_id is an integer")
            return
        subject, severity = self.query.get("subject", ""), self.query.get("severity", "info")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        self.wfile.write(b"retry: 1000\n\n")
        self.wfile.flush()
        quiet_since = time.monotonic()
        while not self.app.feed.closed and not self._client_gone():
            rows = self.app.feed.since(after, STREAM_CHECK_S)
            names = self._names() if rows else {}
            chunks = [_sse(r, names) for r in rows if matches(r, subject, severity)]
            if rows:
                after = rows[-1].id
            if not chunks and time.monotonic() - quiet_since < STREAM_KEEPALIVE_S:
                continue
            self.wfile.write(b"".join(chunks) if chunks else b": keepalive\n\n")
            self.wfile.flush()
            quiet_since = time.monotonic()

    def _names(self) -> Mapping[str, str]:
        """Subjects' names for the stream; without them (the store is down) the events still flow."""
        try:
            return self.app.source.cluster().names
        except Exception:
            return {}

    def _client_gone(self) -> bool:
        """A stream's client sends nothing after its request: anything readable is its close (EOF or TLS
        close_notify). Checked every STREAM_CHECK_S, so a closed tab frees its connection slot at once."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable)


def _sse(row: EventRow, names: Mapping[str, str]) -> bytes:
    data = json.dumps(api.event(row, names))
    return f"id: {row.id}\nevent: kvmha\ndata: {data}\n\n".encode()


def _local(path: str) -> str:
    """Only a path on this server may be a redirect target (no open redirect to another site)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"

