"""Server-rendered HTML pages. Pure functions of view records (view.py, timeline.py) and `now`: every value is
escaped here, the pages work without JavaScript, and dashboard.js only refreshes the `data-live` regions and appends
streamed events. No inline script or style: the Content-Security-Policy allows only the manager's own files.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from urllib.parse import quote, urlencode

from kvmha.manager.dashboard import svg
from kvmha.manager.dashboard.auth import Principal
from kvmha.manager.dashboard.timeline import Failure
from kvmha.manager.dashboard.view import SEVERITIES, Cluster, HostTile, VmLine, VmPage, WorkItem
from kvmha.manager.store import EventRow

NAV = (("/", "Cluster"), ("/vms", "VMs"), ("/work", "HA work"), ("/events", "Events"), ("/failures", "Failures"),
       ("/api", "API"))
CURRENT = ' aria-current="page"'
REFRESH_MIN_MS, REFRESH_MAX_MS, REFRESH_PER_HOST_MS = 5_000, 60_000, 25


def e(value: object) -> str:
    return escape(str(value), quote=True)


def clock(at: float | None) -> str:
    return "-" if not at else time.strftime("%H:%M:%S", time.localtime(at))


def clock_tenths(at: float | None) -> str:
    """Seconds with tenths: the steps of one recovery are often within the same second."""
    return "-" if not at else time.strftime("%H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 10)}"


def stamp(at: float | None) -> str:
    return "-" if not at else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    return f"{seconds / 60:.0f} min ago"


def css_token(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def refresh_ms(hosts: int) -> int:
    """How often an open page refreshes its live regions: every 5 s for small clusters, less often for large ones,
    where one render is megabytes and takes the manager's CPU (25 ms per host, at most a minute). Events still show
    at once: the stream does not wait for a refresh."""
    return max(REFRESH_MIN_MS, min(REFRESH_MAX_MS, hosts * REFRESH_PER_HOST_MS))


def layout(title: str, body: str, principal: Principal | None, current: str = "", last_event_id: int = 0,
           hosts: int = 0) -> str:
    links = "".join(f'<li><a href="{href}"{CURRENT if href == current else ""}>{e(text)}</a></li>'
                    for href, text in NAV)
    who = (f'<span class="who">{e(principal.name)} ({e(principal.role.value)})</span> '
           f'<a href="/logout">Sign out</a>') if principal else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)} · kvmha</title><link rel="icon" href="/static/favicon.svg" type="image/svg+xml">'
            f'<link rel="stylesheet" href="/static/dashboard.css">'
            f'<script src="/static/dashboard.js" defer></script></head>'
            f'<body data-last-event-id="{last_event_id}" data-refresh-ms="{refresh_ms(hosts)}">'
            f'<a class="skip" href="#main">Skip to content</a>'
            f'<header><span class="brand">kvmha</span><nav aria-label="Main"><ul>{links}</ul></nav>'
            f'<span id="live-state" class="live-state" role="status" aria-live="polite">static</span>{who}</header>'
            f'<main id="main"><h1>{e(title)}</h1>{body}</main></body></html>')


# ---------------------------------------------------------------------- cluster


def cluster_page(cluster: Cluster, events: Sequence[EventRow], principal: Principal | None) -> str:
    counts = cluster.counts
    summary = (f'<p class="summary" data-live="summary">{counts.get("hosts_up", 0)} of {counts.get("hosts", 0)} '
               f'hosts Up · {counts.get("vms_running", 0)} of {counts.get("vms", 0)} VMs running · '
               f'{counts.get("ha_work_active", 0)} HA work items active · read {clock(cluster.at)}</p>')
    tiles = "".join(host_tile(h) for h in cluster.hosts) or "<p>No hosts registered yet.</p>"
    active = [w for w in cluster.work if w.active]
    body = (f'{summary}<section aria-labelledby="hosts-h"><h2 id="hosts-h">Hosts</h2>'
            f'{legend()}<ul class="tiles" data-live="tiles">{tiles}</ul></section>'
            f'<section aria-labelledby="work-h"><h2 id="work-h">HA work in progress</h2>'
            f'<div data-live="work">{work_list(active, "No HA work in progress.")}</div></section>'
            f'<section aria-labelledby="events-h"><h2 id="events-h">Latest events</h2>'
            f'{event_table(events, live=True, names=cluster.names)}</section>')
    return layout("Cluster", body, principal, "/", cluster.last_event_id, len(cluster.hosts))


def legend() -> str:
    statuses = ("Connecting", "Up", "Investigating", "Alert", "Fencing", "Fenced", "Down", "Disconnected", "Removed")
    items = "".join(f'<li><span class="swatch status-{css_token(s)}"></span>{e(s)}</li>' for s in statuses)
    return f'<details class="legend"><summary>Colour legend</summary><ul>{items}</ul></details>'


def host_tile(host: HostTile) -> str:
    marks = "" if host.resource_state == "Enabled" else (
        f'<span class="resource resource-{css_token(host.resource_state)}">{e(host.resource_state)}</span>')
    health = "".join(f'<li class="health-{css_token(h.state)}"><span class="h-name">{e(h.name)}</span> '
                     f'<span class="h-state">{e(h.state)}</span> <span class="h-detail">{e(h.detail)}</span></li>'
                     for h in host.health)
    vms = "".join(f'<li><a href="/vms/{e(quote(v.name))}">{e(v.name)}</a> '
                  f'<span class="state-{css_token(v.state)}">{e(v.state)}</span></li>' for v in host.vms)
    cpu = _meter("vCPUs", host.used_vcpus, host.cpus, "")
    mem = _meter("Memory", host.used_memory_mib, host.memory_mib, " MiB")
    return (f'<li class="tile status-{css_token(host.status)} resource-{css_token(host.resource_state)}" '
            f'data-host="{e(host.name)}" data-status="{e(host.status)}">'
            f'<h3>{e(host.name)}</h3><p class="status-line"><span class="status">{e(host.status)}</span> {marks}</p>'
            f'<p class="ping">last ping {e(age(host.last_ping_age_s))}</p>{cpu}{mem}'
            f'<ul class="health" aria-label="health of {e(host.name)}">{health}</ul>'
            f'<details id="vms-{host.id}"><summary>{len(host.vms)} VM{"" if len(host.vms) == 1 else "s"}</summary>'
            f'<ul class="vm-list">{vms}</ul></details></li>')


def _meter(label: str, used: int, total: int, unit: str) -> str:
    if total <= 0:
        return f'<p class="cap">{e(label)}: {used}{unit} used (capacity unknown)</p>'
    return (f'<p class="cap"><label>{e(label)} {used}/{total}{unit} '
            f'<meter min="0" max="{total}" value="{min(used, total)}" high="{total * 0.85:.0f}">'
            f'{used}/{total}</meter></label></p>')


# ---------------------------------------------------------------------- VMs


def vms_page(vms: Sequence[VmLine], query: str, principal: Principal | None, last_event_id: int) -> str:
    rows = "".join(vm_row(v) for v in vms)
    body = (f'<form class="search" role="search" action="/vms" method="get">'
            f'<label for="vm-q">Search VMs</label> <input id="vm-q" name="q" type="search" value="{e(query)}" '
            f'data-filter-table="vm-table" placeholder="name, host, state, group…"> '
            f'<button type="submit">Search</button></form>'
            f'<p class="count" data-live="vm-count">{len(vms)} VMs</p>'
            f'<table id="vm-table" class="data"><caption>VMs</caption><thead><tr><th scope="col">Name</th>'
            f'<th scope="col">State</th><th scope="col">Power</th><th scope="col">Host</th><th scope="col">HA</th>'
            f'<th scope="col">Priority</th><th scope="col">Group</th><th scope="col">vCPUs</th>'
            f'<th scope="col">Memory MiB</th></tr></thead><tbody data-live="vm-rows">{rows}</tbody></table>')
    return layout("VMs", body, principal, "/vms", last_event_id, len(vms) // 10)


def vm_row(vm: VmLine) -> str:
    return (f'<tr><th scope="row"><a href="/vms/{e(quote(vm.name))}">{e(vm.name)}</a></th>'
            f'<td class="state-{css_token(vm.state)}">{e(vm.state)}</td>'
            f'<td class="state-{css_token(vm.power_state)}">{e(vm.power_state)}</td><td>{e(vm.host or "-")}</td>'
            f'<td>{"yes" if vm.ha_enabled else "no"}</td><td>{vm.restart_priority}</td>'
            f'<td>{e(vm.anti_affinity_group or "-")}</td><td>{vm.vcpus}</td><td>{vm.memory_mib}</td></tr>')


def vm_page(page: VmPage, principal: Principal | None, last_event_id: int) -> str:
    vm = page.vm
    facts = (("uuid", vm.uuid), ("state", vm.state), ("power state", vm.power_state),
             ("power state updated", stamp(vm.power_state_updated_at)), ("host", vm.host or "-"),
             ("last host", vm.last_host or "-"), ("HA", "enabled" if vm.ha_enabled else "disabled"),
             ("restart priority", vm.restart_priority), ("anti-affinity group", vm.anti_affinity_group or "-"),
             ("vCPUs", vm.vcpus), ("memory", f"{vm.memory_mib} MiB"))
    items = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    body = (f'<div data-live="vm-facts"><dl class="facts">{items}</dl></div>'
            f'<section aria-labelledby="vw-h"><h2 id="vw-h">HA work</h2>'
            f'<div data-live="vm-work">{work_list(page.work, "No HA work for this VM.")}</div></section>'
            f'<section aria-labelledby="vh-h"><h2 id="vh-h">History</h2>'
            f'<div data-live="vm-history">{event_table(list(reversed(page.history)), live=False)}</div></section>')
    return layout(f"VM {vm.name}", body, principal, "", last_event_id)


# ---------------------------------------------------------------------- HA work


def work_page(items: Sequence[WorkItem], principal: Principal | None, last_event_id: int) -> str:
    active = [w for w in items if w.active]
    finished = [w for w in items if not w.active]
    body = (f'<section aria-labelledby="wa-h"><h2 id="wa-h">In progress</h2><div data-live="work">'
            f'{work_list(active, "No HA work in progress.")}</div></section>'
            f'<section aria-labelledby="wf-h"><h2 id="wf-h">Recently finished</h2><div data-live="work-done">'
            f'{work_list(finished, "Nothing finished yet.")}</div></section>')
    return layout("HA work", body, principal, "/work", last_event_id)


def work_list(items: Iterable[WorkItem], empty: str) -> str:
    parts = []
    for w in items:
        steps = "".join(f'<li><time>{clock_tenths(s.at)}</time> '
                        f'<span class="sev-{css_token(s.severity)}">{e(s.kind)}</span> '
                        f'{e(s.message)}</li>' for s in w.steps)
        steps_html = f'<ol class="steps">{steps}</ol>' if steps else ""
        parts.append(f'<li class="work step-{css_token(w.step)}"><strong>work {w.id}</strong> {e(w.type)} of '
                     f'<a href="/vms/{e(quote(w.vm))}">{e(w.vm)}</a> from {e(w.host or "-")}: '
                     f'<span class="step">{e(w.step)}</span> (tried {w.tried}, created {clock(w.created_at)}, '
                     f'updated {clock(w.updated_at)})<p class="reason">{e(w.reason)}</p>{steps_html}</li>')
    return f'<ul class="work-list">{"".join(parts)}</ul>' if parts else f"<p>{e(empty)}</p>"


# ---------------------------------------------------------------------- events


def event_table(events: Sequence[EventRow], live: bool, names: Mapping[str, str] | None = None) -> str:
    rows = "".join(event_row(r, names or {}) for r in events)
    stream = ' data-stream="1"' if live else ""
    return (f'<table class="data events"{stream}><caption>Events, newest first</caption><thead><tr>'
            f'<th scope="col">Time</th><th scope="col">Severity</th><th scope="col">Subject</th>'
            f'<th scope="col">Kind</th><th scope="col">Message</th></tr></thead><tbody>{rows}</tbody></table>')


def subject_text(subject: str, names: Mapping[str, str]) -> str:
    name = names.get(subject)
    return f"{subject} ({name})" if name else subject


def event_row(row: EventRow, names: Mapping[str, str]) -> str:
    return (f'<tr data-id="{row.id}" data-subject="{e(row.subject)}" data-severity="{e(row.severity)}">'
            f'<td><time datetime="{row.at:.3f}">{clock(row.at)}</time></td>'
            f'<td class="sev-{css_token(row.severity)}">{e(row.severity)}</td>'
            f'<td>{e(subject_text(row.subject, names))}</td>'
            f'<td>{e(row.kind)}</td><td>{e(row.message)}</td></tr>')


def events_page(events: Sequence[EventRow], subject: str, severity: str, principal: Principal | None,
                last_event_id: int, names: Mapping[str, str] | None = None) -> str:
    options = "".join(f'<option value="{s}"{" selected" if s == severity else ""}>{s} and above</option>'
                      for s in SEVERITIES)
    body = (f'<form class="filters" action="/events" method="get" data-stream-filter="1">'
            f'<label for="f-subject">Subject</label> <input id="f-subject" name="subject" value="{e(subject)}" '
            f'placeholder="host:3, vm:, work:" size="14"> '
            f'<label for="f-severity">Severity</label> <select id="f-severity" name="severity">{options}</select> '
            f'<button type="submit">Filter</button></form>'
            f'<p class="hint">New events appear at the top as they are recorded; a subject ending in ":" matches '
            f'every host, VM or work item.</p>{event_table(events, live=True, names=names)}')
    return layout("Events", body, principal, "/events", last_event_id)


# ---------------------------------------------------------------------- failures


def failures_page(items: Sequence[Failure], now: float, principal: Principal | None, last_event_id: int) -> str:
    if not items:
        inner = "<p>No host failure in the recent events.</p>"
    else:
        inner = "".join(failure_section(f, now) for f in reversed(items))
    return layout("Host failures", f'<div data-live="failures">{inner}</div>', principal, "/failures", last_event_id)


def failure_section(failure: Failure, now: float) -> str:
    figures = failure.durations_s()
    rows = "".join(f'<tr><th scope="row">{e(k.removesuffix("_s"))}</th><td>{v:.1f} s</td></tr>'
                   for k, v in figures.items())
    evidence = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in failure.evidence.items())
    vms = "".join(
        f'<tr><th scope="row">{e(v.vm)}</th><td>{clock_tenths(v.scheduled_at)}</td>'
        f'<td>{clock_tenths(v.started_at)}</td><td>{e(v.target or "-")}</td><td>{clock_tenths(v.confirmed_at)}</td>'
        f'<td>{e(v.outcome)}</td></tr>'
        for v in failure.vms)
    marks = "".join(f'<li><time>+{m.at - failure.origin:.1f} s</time> {e(m.status)}: {e(m.reason)}</li>'
                    for m in failure.marks)
    ident = f"failure-{failure.id}"
    return (f'<section class="failure" id="{ident}" aria-labelledby="{ident}-h">'
            f'<h2 id="{ident}-h">{e(failure.host)}: {e(failure.verdict)} (detected {stamp(failure.detected_at)})</h2>'
            f'<p>{e(svg.describe(failure))}</p>'
            f'<figure>{svg.render(failure, now, f"svg-{failure.id}")}<figcaption>'
            f'<a href="/failures/{failure.id}.svg" download="kvmha-failure-{failure.id}.svg">Download SVG</a> '
            f'<button type="button" class="png-export" data-svg="svg-{failure.id}" hidden '
            f'data-filename="kvmha-failure-{failure.id}.png">Download PNG</button>'
            f'</figcaption></figure>'
            f'<table class="data figures"><caption>Durations</caption><tbody>{rows}</tbody></table>'
            f'<h3>Evidence</h3><dl class="facts">{evidence or "<dt>verdict</dt><dd>none yet</dd>"}</dl>'
            f'<details id="marks-{failure.id}">'
            f'<summary>Every status change of {e(failure.host)} ({len(failure.marks)})</summary>'
            f'<ol class="steps">{marks}</ol></details>'
            f'<table class="data"><caption>VMs of {e(failure.host)}</caption><thead><tr><th scope="col">VM</th>'
            f'<th scope="col">Scheduled</th><th scope="col">Start sent</th><th scope="col">Target</th>'
            f'<th scope="col">Confirmed</th><th scope="col">Outcome</th></tr></thead><tbody>{vms}</tbody></table>'
            f'</section>')


# ---------------------------------------------------------------------- login and errors


def login_page(next_path: str, error: str = "") -> str:
    message = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    body = (f'{message}<form class="login" action="/login" method="post">'
            f'<input type="hidden" name="next" value="{e(next_path)}">'
            f'<label for="token">Dashboard token</label> '
            f'<input id="token" name="token" type="password" autocomplete="current-password" required size="50"> '
            f'<button type="submit">Sign in</button></form>'
            f'<p class="hint">An admin issues tokens on the manager host: '
            f'<code>kvmha dashboard token --role reader</code>.</p>')
    return layout("Sign in", body, None)


def error_page(status: int, message: str, principal: Principal | None) -> str:
    return layout(f"{status}", f'<p role="alert">{e(message)}</p><p><a href="/">Back to the cluster</a></p>',
                  principal)


def api_page(principal: Principal | None) -> str:
    endpoints = (("/api/v1/cluster", "hosts (tiles), VMs, HA work and counts in one read"),
                 ("/api/v1/hosts", "hosts with health, capacity and VMs"), ("/api/v1/vms?q=", "VMs (searchable)"),
                 ("/api/v1/vms/{ref}", "one VM with its HA work and history"), ("/api/v1/work", "HA work"),
                 ("/api/v1/events?after_id=&limit=&subject=&severity=", "events"),
                 ("/api/v1/events/stream", "events as Server-Sent Events"),
                 ("/api/v1/failures", "host failures with their recovery timelines"),
                 ("/api/v1/whoami", "the caller's token name and role"),
                 ("/api/v1/openapi.json", "this API as an OpenAPI 3.1 document"))
    rows = "".join(f'<tr><th scope="row"><code>{e(p)}</code></th><td>{e(d)}</td></tr>' for p, d in endpoints)
    query = urlencode({"token": "TOKEN"})
    body = ('<p>Every endpoint answers JSON to a bearer token (<code>Authorization: Bearer TOKEN</code>), the same '
            'roles as the pages (reader at least). The sign-in cookie of a browser works too.</p>'
            f'<table class="data"><caption>Endpoints</caption><tbody>{rows}</tbody></table>'
            f'<p><a href="/api/v1/openapi.json">OpenAPI document</a>. A link that signs a browser in: '
            f'<code>/?{e(query)}</code> (the token is moved into a cookie and removed from the address).</p>')
    return layout("JSON read API", body, principal, "/api")
