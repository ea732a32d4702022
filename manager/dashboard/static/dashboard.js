// kvmha dashboard: light progressive enhancement over server-rendered pages (they work without this file).
// - one EventSource per page on /api/v1/events/stream: new events are prepended to the page's event table
//   (filtered by the page's subject/severity fields) and trigger a refresh of the page's live regions;
// - live regions ([data-live]) are refreshed from the same URL, debounced, and every few seconds (ping ages);
// - the VM search box filters the table as one types.
"use strict";
(function () {
  const SEVERITY = { info: 0, warning: 1, alert: 2 };
  const MAX_ROWS = 500;
  // The server says how often (data-refresh-ms: larger clusters, rarer full refreshes); events show at once anyway.
  const REFRESH_MS = Number(document.body && document.body.dataset.refreshMs) || 5000;
  const AFTER_EVENT_MS = Math.max(300, REFRESH_MS / 10);
  const state = document.getElementById("live-state");
  let refreshTimer = null;
  let refreshing = false;

  function setState(text, cls) {
    if (!state) return;
    state.textContent = text;
    state.className = "live-state " + cls;
  }

  function filterValues() {
    const subject = document.getElementById("f-subject");
    const severity = document.getElementById("f-severity");
    return { subject: subject ? subject.value.trim() : "", severity: severity ? severity.value : "info" };
  }

  function matches(ev, f) {
    if (f.subject) {
      const prefix = f.subject.endsWith(":");
      if (!(ev.subject === f.subject || (prefix && ev.subject.startsWith(f.subject)))) return false;
    }
    return (SEVERITY[ev.severity] || 0) >= (SEVERITY[f.severity] || 0);
  }

  function clock(at) {
    const d = new Date(at * 1000);
    return d.toTimeString().slice(0, 8);
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function eventRow(ev) {
    const tr = document.createElement("tr");
    tr.dataset.id = String(ev.id);
    tr.dataset.subject = ev.subject;
    tr.dataset.severity = ev.severity;
    const time = document.createElement("time");
    time.dateTime = ev.at.toFixed(3);
    time.textContent = clock(ev.at);
    const td = document.createElement("td");
    td.appendChild(time);
    tr.appendChild(td);
    tr.appendChild(cell(ev.severity, "sev-" + ev.severity));
    tr.appendChild(cell(ev.subject_name ? ev.subject + " (" + ev.subject_name + ")" : ev.subject));
    tr.appendChild(cell(ev.kind));
    tr.appendChild(cell(ev.message));
    tr.className = "new";
    // When the row reached the screen (wall clock, ms): bench/dashboard_latency.py reads it.
    tr.dataset.shownAtMs = String(performance.timeOrigin + performance.now());
    return tr;
  }

  function applyFilter() {
    const f = filterValues();
    document.querySelectorAll("table[data-stream] tbody tr").forEach(function (tr) {
      tr.hidden = !matches({ subject: tr.dataset.subject || "", severity: tr.dataset.severity || "info" }, f);
    });
  }

  function addEvent(ev) {
    document.querySelectorAll("table[data-stream] tbody").forEach(function (body) {
      if (body.querySelector('tr[data-id="' + ev.id + '"]')) return;
      const tr = eventRow(ev);
      tr.hidden = !matches(ev, filterValues());
      body.insertBefore(tr, body.firstChild);
      while (body.rows.length > MAX_ROWS) body.deleteRow(body.rows.length - 1);
    });
    document.body.dataset.lastEventId = String(ev.id);
    scheduleRefresh(AFTER_EVENT_MS);
  }

  // A refresh must not close what the reader opened: <details> with an id are re-opened after it.
  function openDetails() {
    return Array.from(document.querySelectorAll("details[open][id]")).map(function (d) { return d.id; });
  }

  async function refresh() {
    const regions = document.querySelectorAll("[data-live]");
    if (!regions.length || refreshing) return;
    refreshing = true;
    try {
      const reply = await fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } });
      if (!reply.ok) return;
      const fresh = new DOMParser().parseFromString(await reply.text(), "text/html");
      const open = openDetails();
      regions.forEach(function (region) {
        const next = fresh.querySelector('[data-live="' + region.dataset.live + '"]');
        if (next && next.innerHTML !== region.innerHTML) region.innerHTML = next.innerHTML;
      });
      open.forEach(function (id) {
        const d = document.getElementById(id);
        if (d) d.open = true;
      });
      filterTables();
      showPngButtons();
    } catch (error) {
      setState("reconnecting", "lost");
    } finally {
      refreshing = false;
    }
  }

  function scheduleRefresh(delayMs) {
    if (refreshTimer !== null) return;
    refreshTimer = setTimeout(function () { refreshTimer = null; refresh(); }, delayMs);
  }

  function filterTables() {
    document.querySelectorAll("input[data-filter-table]").forEach(function (input) {
      const table = document.getElementById(input.dataset.filterTable);
      if (!table) return;
      const words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
      let shown = 0;
      table.querySelectorAll("tbody tr").forEach(function (tr) {
        const text = tr.textContent.toLowerCase();
        tr.hidden = !words.every(function (w) { return text.includes(w); });
        if (!tr.hidden) shown += 1;
      });
      const count = document.querySelector('[data-live="vm-count"]');
      if (count && words.length) count.textContent = shown + " VMs match";
    });
  }

  function connect() {
    if (!window.EventSource) return;
    const after = document.body.dataset.lastEventId || "0";
    const source = new EventSource("/api/v1/events/stream?after_id=" + encodeURIComponent(after));
    source.onopen = function () { setState("live", "live"); };
    source.onerror = function () { setState("reconnecting", "lost"); };
    source.addEventListener("kvmha", function (message) {
      setState("live", "live");
      addEvent(JSON.parse(message.data));
    });
  }

  // PNG export of a timeline, drawn by the browser from the inline SVG (the server stays free of image libraries).
  function svgToPng(svg) {
    return new Promise(function (resolve, reject) {
      const text = new XMLSerializer().serializeToString(svg);
      const image = new Image();
      image.onload = function () {
        const canvas = document.createElement("canvas");
        canvas.width = svg.viewBox.baseVal.width * 2;
        canvas.height = svg.viewBox.baseVal.height * 2;
        const context = canvas.getContext("2d");
        context.scale(2, 2);
        context.drawImage(image, 0, 0);
        resolve(canvas.toDataURL("image/png"));
      };
      image.onerror = reject;
      image.src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(text);
    });
  }
  window.kvmhaSvgToPng = svgToPng;

  function showPngButtons() {
    document.querySelectorAll("button.png-export").forEach(function (button) { button.hidden = false; });
  }

  // One listener for every button, also those a live refresh puts in later.
  document.addEventListener("click", async function (event) {
    const button = event.target.closest ? event.target.closest("button.png-export") : null;
    if (!button) return;
    const svg = document.getElementById(button.dataset.svg);
    if (!svg) return;
    const link = document.createElement("a");
    link.href = await svgToPng(svg);
    link.download = button.dataset.filename;
    link.click();
  });

  document.addEventListener("DOMContentLoaded", function () {
    showPngButtons();
    document.querySelectorAll("input[data-filter-table]").forEach(function (input) {
      input.addEventListener("input", filterTables);
    });
    document.querySelectorAll("form[data-stream-filter] input, form[data-stream-filter] select").forEach(
      function (field) { field.addEventListener("input", applyFilter); });
    filterTables();
    if (document.querySelector("main [data-live], table[data-stream]")) {
      connect();
      setInterval(function () { scheduleRefresh(0); }, REFRESH_MS);
    }
  });
})();
