"""A recovery timeline as one self-contained SVG (inline in the page, and downloadable as a file).

Pure: a `Failure` in, SVG text out. Rows: the host (silent → investigating → fencing → dead) and one per VM
(waiting for the verdict → start sent → confirmed running). x is seconds from the host's last ping (or from the
detection when the last ping is unknown); an open phase ends at `now` and is drawn dashed, so an unfinished recovery
is never drawn as a finished one. Colours come with text labels (never colour alone) and the SVG has a title and a
description for screen readers.
"""

from __future__ import annotations

from html import escape

from kvmha.manager.dashboard.timeline import Failure

WIDTH_PX = 900
LABEL_PX = 150
ROW_PX = 34
TOP_PX = 40
COLOURS = {"silent": "#8a8f98", "investigating": "#c98a00", "fencing": "#d35400", "dead": "#b03030",
           "waiting": "#9db4d0", "starting": "#1f6fb2", "confirmed": "#2e7d32", "failed": "#b03030"}


def _fmt(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 100 else f"{seconds:.0f} s"


class _Canvas:
    def __init__(self, origin: float, end: float) -> None:
        self.origin = origin
        self.span_s = max(end - origin, 1.0)
        self.parts: list[str] = []

    def x(self, at: float) -> float:
        return LABEL_PX + (at - self.origin) / self.span_s * (WIDTH_PX - LABEL_PX - 20)

    def bar(self, row: int, start: float, end: float | None, now: float, phase: str, label: str) -> None:
        y = TOP_PX + row * ROW_PX + 6
        stop = now if end is None else end
        x0, x1 = self.x(start), max(self.x(stop), self.x(start) + 2)
        dash = ' stroke-dasharray="4 3" stroke="#333"' if end is None else ""
        title = f"{label}: {_fmt(stop - start)}{' (still open)' if end is None else ''}"
        self.parts.append(f'<rect class="phase {phase}" x="{x0:.1f}" y="{y}" width="{x1 - x0:.1f}" height="18" '
                          f'fill="{COLOURS[phase]}"{dash}><title>{escape(title)}</title></rect>')
        if x1 - x0 > 60:
            self.parts.append(f'<text x="{x0 + 4:.1f}" y="{y + 13}" class="in-bar" fill="#fff" font-size="11">'
                              f'{escape(label)} {_fmt(stop - start)}</text>')

    def mark(self, row: int, at: float, text: str) -> None:
        x, y = self.x(at), TOP_PX + row * ROW_PX
        # Near the right edge the label goes to the left of its line, so it is never cut off.
        anchor, text_x = ("end", x - 3) if x > WIDTH_PX - 170 else ("start", x + 3)
        self.parts.append(f'<line x1="{x:.1f}" y1="{y + 2}" x2="{x:.1f}" y2="{y + 28}" stroke="#222" />'
                          f'<text x="{text_x:.1f}" y="{y + 33}" font-size="10" fill="#222" text-anchor="{anchor}">'
                          f'{escape(text)}</text>')

    def label(self, row: int, text: str) -> None:
        y = TOP_PX + row * ROW_PX + 19
        self.parts.append(f'<text x="6" y="{y}" font-size="12" fill="#111">{escape(text)}</text>')


def render(failure: Failure, now: float, element_id: str = "") -> str:
    origin = failure.origin
    ends = [failure.detected_at, failure.verdict_at or now]
    for vm in failure.vms:
        ends += [t for t in (vm.started_at, vm.confirmed_at, vm.ended_at) if t is not None]
    finished = failure.verdict_at is not None and all(v.ended_at is not None for v in failure.vms)
    canvas = _Canvas(origin, max(ends) if finished else max([*ends, now]))
    canvas.label(0, f"host {failure.host}")
    if failure.origin < failure.detected_at:
        label = "silent" if failure.last_ping_at is not None else "link lost"
        canvas.bar(0, failure.origin, failure.detected_at, now, "silent", label)
    investigated_until = failure.fencing_at or failure.verdict_at
    canvas.bar(0, failure.detected_at, investigated_until, now, "investigating", "investigating")
    if failure.fencing_at is not None:
        canvas.bar(0, failure.fencing_at, failure.verdict_at, now, "fencing", "fencing")
    if failure.verdict_at is not None:
        canvas.mark(0, failure.verdict_at, f"{failure.verdict} +{_fmt(failure.verdict_at - origin)}")
    for row, vm in enumerate(failure.vms, start=1):
        canvas.label(row, f"vm {vm.vm}")
        canvas.bar(row, vm.scheduled_at, vm.started_at or vm.ended_at, now, "waiting", "waiting")
        if vm.started_at is not None:
            phase = "starting" if vm.outcome in ("Done", "in progress") else "failed"
            canvas.bar(row, vm.started_at, vm.confirmed_at or vm.ended_at, now, phase, f"start on {vm.target}")
        if vm.confirmed_at is not None:
            canvas.mark(row, vm.confirmed_at, f"running on {vm.target} +{_fmt(vm.confirmed_at - origin)}")
        elif vm.ended_at is not None:
            canvas.mark(row, vm.ended_at, vm.outcome)
    height = TOP_PX + (len(failure.vms) + 1) * ROW_PX + 20
    axis = _axis(canvas, height)
    title = f"Recovery timeline of host {failure.host}"
    desc = describe(failure)
    ident = f' id="{escape(element_id)}"' if element_id else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg"{ident} class="timeline" role="img" width="{WIDTH_PX}" '
            f'height="{height}" viewBox="0 0 {WIDTH_PX} {height}" aria-labelledby="{element_id or "t"}-title '
            f'{element_id or "t"}-desc" font-family="sans-serif">'
            f'<title id="{element_id or "t"}-title">{escape(title)}</title>'
            f'<desc id="{element_id or "t"}-desc">{escape(desc)}</desc>'
            f'<rect width="100%" height="100%" fill="#fff" />'
            f'<text x="6" y="18" font-size="14" font-weight="bold" fill="#111">{escape(title)}</text>'
            f'{axis}{"".join(canvas.parts)}</svg>')


def _axis(canvas: _Canvas, height: int) -> str:
    steps = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
    step_s = next((s for s in steps if canvas.span_s / s <= 8), 7200.0)
    parts = []
    count = 0
    while count * step_s <= canvas.span_s + 1e-6:
        tick = count * step_s
        x = canvas.x(canvas.origin + tick)
        label = f"{tick:.1f} s" if step_s < 1 else f"{tick:.0f} s"
        parts.append(f'<line x1="{x:.1f}" y1="{TOP_PX - 6}" x2="{x:.1f}" y2="{height - 16}" stroke="#ddd" />'
                     f'<text x="{x:.1f}" y="{height - 4}" font-size="10" fill="#444" text-anchor="middle">'
                     f'{label}</text>')
        count += 1
    return "".join(parts)


def describe(failure: Failure) -> str:
    """The timeline in one sentence (the SVG's description, and the text beside it for readers without images)."""
    parts = [f"Host {failure.host}"]
    figures = failure.durations_s()
    if "detection_s" in figures:
        since = "its last ping" if failure.last_ping_at is not None else "its agent link broke"
        parts.append(f"was detected failing {_fmt(figures['detection_s'])} after {since}")
    else:
        parts.append("was detected failing")
    if failure.verdict_at is not None:
        parts.append(f"and found {failure.verdict} {_fmt(figures['verdict_s'])} later")
    else:
        parts.append(f"and is {failure.verdict}")
    text = " ".join(parts) + "."
    origin = failure.origin
    for vm in failure.vms:
        if vm.confirmed_at is not None:
            text += f" {vm.vm} ran again on {vm.target} at +{_fmt(vm.confirmed_at - origin)}."
        else:
            text += f" {vm.vm}: {vm.outcome}."
    return text
