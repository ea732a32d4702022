"""The dashboard in a real browser (issue 18 point 4): headless Chromium against the real manager of a namespace lab.

- every page loads with no console error and passes axe-core (vendored from the npm registry under vendor/) with no
  serious or critical violation;
- the live event stream shows a VM's QEMU being killed and the VM started again, without a reload;
- after a host loses its power, its recovery timeline renders (inline SVG with the host, the verdict and each VM
  running again) and the exported SVG is well formed.

Screenshots go to the test's tmp folder (printed); KVMHA_DASHBOARD_SCREENSHOTS=DIR copies them there too (how
docs/dashboard-*.png were made). One lab for the module, healed between tests like the other e2e modules.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmha.lab import browser
from kvmha.lab.dashboard import LabDashboard
from kvmha.lab.wait import wait_for

from .conftest import AGENT_SETTINGS, E2E, FAST_CONFIG, SharedCluster, e2e_test, place, shared_cluster, vm_is

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.timeout(300)]

AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
PAGES = ("/", "/vms", "/work", "/events", "/failures", "/api")
BLOCKING_IMPACTS = ("serious", "critical")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedCluster]:
    reason = browser.missing()
    if reason:
        pytest.skip(reason)
    with shared_cluster(tmp_path_factory, FAST_CONFIG, AGENT_SETTINGS) as cluster:
        yield cluster


@pytest.fixture
def e2e(shared: SharedCluster) -> Iterator[E2E]:
    with e2e_test(shared) as test:
        yield test


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    with browser.chromium(tmp_path) as driver:
        yield driver


def dashboard_of(e2e: E2E) -> LabDashboard:
    assert e2e.cluster.dashboard is not None, "the lab's manager serves no dashboard"
    return e2e.cluster.dashboard


def sign_in(driver: Any, dashboard: LabDashboard) -> None:
    driver.get(dashboard.login_url)
    wait_for(lambda: driver.current_url.rstrip("/") == dashboard.url.rstrip("/"), 10, "signed in, token gone")


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"dashboard-{name}.png"
    driver.save_screenshot(str(path))
    copy_to = os.environ.get("KVMHA_DASHBOARD_SCREENSHOTS")
    if copy_to:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(copy_to) / path.name)
    print(f"screenshot {path}")
    return path


def axe_violations(driver: Any) -> list[dict[str, Any]]:
    driver.execute_script(AXE.read_text())
    driver.set_script_timeout(60)
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(JSON.stringify(r.violations)))"
        ".catch(e => done(JSON.stringify([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}])));")
    violations: list[dict[str, Any]] = json.loads(result)
    return violations


def rows(driver: Any) -> list[dict[str, str]]:
    """The event table's rows as the browser shows them (newest first)."""
    script = ("return Array.from(document.querySelectorAll('table[data-stream] tbody tr')).map(tr => ({"
              "id: tr.dataset.id, subject: tr.dataset.subject, kind: tr.cells[3].textContent,"
              "message: tr.cells[4].textContent, hidden: tr.hidden}));")
    found: list[dict[str, str]] = driver.execute_script(script)
    return found


def test_every_page_loads_clean_and_accessible(e2e: E2E, chrome: Any, tmp_path: Path) -> None:
    place(e2e, "h1", {"br-a": True})
    dashboard = dashboard_of(e2e)
    sign_in(chrome, dashboard)
    vm_page = "/vms/br-a"
    failures: list[str] = []
    for path in (*PAGES, vm_page):
        chrome.get(dashboard.url.rstrip("/") + path)
        wait_for(lambda: chrome.execute_script("return document.readyState") == "complete", 10, f"{path} loaded")
        time.sleep(0.5)  # the page's script has opened its stream and may have refreshed once
        assert chrome.find_element("css selector", "main h1").text, path
        errors = browser.console_errors(chrome)
        if errors:
            failures.append(f"{path}: console errors {errors}")
        blocking = [v for v in axe_violations(chrome) if v.get("impact") in BLOCKING_IMPACTS]
        failures += [f"{path}: axe {v['id']} ({v['impact']}): {v['help']} at "
                     f"{[n.get('target') for n in v.get('nodes', [])][:3]}" for v in blocking]
        screenshot(chrome, tmp_path, path.strip("/").replace("/", "-") or "cluster")
    assert not failures, "\n".join(failures)


def test_live_stream_shows_a_vm_kill_and_its_restart_without_reload(e2e: E2E, chrome: Any, tmp_path: Path) -> None:
    c = e2e.cluster
    place(e2e, "h2", {"br-kill": True})
    subject = e2e.vm_subject("br-kill")
    dashboard = dashboard_of(e2e)
    sign_in(chrome, dashboard)
    chrome.get(dashboard.url + "events")
    wait_for(lambda: chrome.find_element("id", "live-state").text == "live", 15, "the stream connected")
    chrome.execute_script("window.kvmhaNoReload = 'still the same page';")
    before = {r["id"] for r in rows(chrome)}
    killed_at = time.time()
    c.lab.vm_kill("br-kill")

    def streamed(kind: str, text: str = "") -> bool:
        return any(r["id"] not in before and r["kind"] == kind and text in r["message"] for r in rows(chrome))

    try:
        # The kill as the manager recorded it on the VM, then the restart: start sent, and the work item done.
        wait_for(lambda: any(r["id"] not in before and r["subject"] == subject for r in rows(chrome)), 30,
                 "an event about the killed VM on the page")
        wait_for(lambda: streamed("vm.starting"), 30, "the restart's start on the page")
        wait_for(lambda: streamed("work.done", "br-kill runs on"), 30, "the restart confirmed on the page")
    except TimeoutError as error:
        screenshot(chrome, tmp_path, "kill-timeout")
        pytest.fail(f"{error}; page rows: {rows(chrome)[:12]}{e2e.story()}")
    assert chrome.execute_script("return window.kvmhaNoReload") == "still the same page", "the page was reloaded"
    new = [r for r in rows(chrome) if r["id"] not in before]
    ids = [int(r["id"]) for r in new]
    assert ids == sorted(ids, reverse=True), f"newest first: {ids}"
    assert browser.console_errors(chrome) == []
    wait_for(lambda: vm_is(e2e, "br-kill", "Running", power="PowerOn"), 30, "br-kill Running in the manager")
    screenshot(chrome, tmp_path, "events-live")
    print(f"QEMU kill -> restart confirmed on the page within {time.time() - killed_at:.1f} s")


def test_power_loss_shows_live_and_its_timeline_renders(e2e: E2E, chrome: Any, tmp_path: Path) -> None:
    c = e2e.cluster
    victim = "h3"
    place(e2e, victim, {"br-ha1": True, "br-ha2": True})
    dashboard = dashboard_of(e2e)
    sign_in(chrome, dashboard)
    wait_for(lambda: chrome.find_element("id", "live-state").text == "live", 15, "the stream connected")
    tile = f'li.tile[data-host="{victim}"]'
    c.lab.power(victim, "off", wait=False)
    try:
        # The cluster page follows without a reload: the victim's tile turns Down, its HA VMs run elsewhere.
        # (the live region is replaced on each refresh: the tile is looked up afresh every time)
        status = f"const t = document.querySelector('{tile}'); return t ? t.dataset.status : null;"
        wait_for(lambda: chrome.execute_script(status) == "Down", 40, f"{victim}'s tile Down")
        screenshot(chrome, tmp_path, "cluster-host-down")
        placed = c.wait_running(["br-ha1", "br-ha2"], 40, not_on=victim)
        wait_for(lambda: all(vm_is(e2e, n, "Running", placed[n], "PowerOn") for n in placed), 30, "both Running")
    except TimeoutError as error:
        screenshot(chrome, tmp_path, "power-loss-timeout")
        pytest.fail(f"{error}{e2e.story()}")
    chrome.get(dashboard.url + "failures")
    figure = wait_for(lambda: chrome.find_elements("css selector", "section.failure svg.timeline"), 10,
                      "a timeline on /failures")
    title = figure[0].find_element("css selector", "title").get_attribute("textContent")
    assert victim in title, title
    text = chrome.find_element("css selector", "section.failure").text
    assert "Down" in text and "br-ha1" in text and "br-ha2" in text, text
    marks = chrome.execute_script(
        "return Array.from(document.querySelectorAll('section.failure svg.timeline text')).map(t => t.textContent)")
    assert sum("running on" in m for m in marks) == 2, marks
    assert browser.console_errors(chrome) == []
    assert not [v for v in axe_violations(chrome) if v.get("impact") in BLOCKING_IMPACTS]
    screenshot(chrome, tmp_path, "failures")
    # The PNG export, drawn by the browser from the inline SVG.
    png = chrome.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "window.kvmhaSvgToPng(document.querySelector('section.failure svg.timeline'))"
        ".then(done, e => done(String(e)));")
    assert png.startswith("data:image/png;base64,") and len(png) > 2000, png[:200]
    assert chrome.find_element("css selector", "section.failure button.png-export").is_displayed()
    (tmp_path / "timeline.png").write_bytes(base64.b64decode(png.split(",", 1)[1]))
    # The exported SVG: the same picture, a well-formed file.
    failure_id = chrome.find_element("css selector", "section.failure").get_attribute("id").removeprefix("failure-")
    reply = dashboard.client().get(f"/failures/{failure_id}.svg")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/svg+xml"
    root = ET.fromstring(reply.body)
    assert root.tag.endswith("svg") and victim in reply.text
    (tmp_path / "timeline.svg").write_bytes(reply.body)
    c.lab.power(victim, "on")
