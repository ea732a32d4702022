"""The dashboard's route table: every route is served by a handler, names its role, and only the sign-in, static
files and the OpenAPI document are public; a sign-in link's token never reaches the log."""

from __future__ import annotations

from kvmha.manager.dashboard.auth import Role
from kvmha.manager.dashboard.server import ROUTES, TOKEN_IN_QUERY, Handler, _local

PUBLIC = {"api_openapi", "page_login", "login", "logout", "static", "favicon"}


def test_every_route_has_a_handler_and_a_role() -> None:
    for route in ROUTES:
        assert callable(getattr(Handler, route.handler, None)), route.handler
        assert (route.role is None) == (route.handler in PUBLIC), route.handler
        assert route.role in (None, Role.READER), "the dashboard is read-only: reader is enough for every view"
    assert len({(r.method, r.pattern.pattern) for r in ROUTES}) == len(ROUTES)


def test_only_the_sign_in_form_takes_a_post() -> None:
    assert [r.handler for r in ROUTES if r.method != "GET"] == ["login"]


def test_tokens_are_scrubbed_from_logged_request_lines() -> None:
    line = '"GET /vms?q=a&token=kvd_abc-_XYZ HTTP/1.1" 303 -'
    assert TOKEN_IN_QUERY.sub(r"\1***", line) == '"GET /vms?q=a&token=*** HTTP/1.1" 303 -'


def test_redirects_stay_on_this_server() -> None:
    assert _local("/vms?q=1") == "/vms?q=1"
    for outside in ("//evil.example/", "https://evil.example/", "evil", "/\\evil.example"):
        assert _local(outside) == "/"


def test_large_clusters_refresh_less_often() -> None:
    from kvmha.manager.dashboard.pages import refresh_ms

    assert refresh_ms(0) == refresh_ms(50) == 5_000
    assert refresh_ms(1_000) == 25_000
    assert refresh_ms(100_000) == 60_000
