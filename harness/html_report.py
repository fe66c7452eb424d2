"""artifacts/report.html: one self-contained page per run (no server, no dependency).

It shows the checks' summary table (results.json) and the measurements'
(metrics.json), the migration plots (artifacts/plots/*.png as data URIs), each
failure with the tails of its serial log, ``xl dmesg`` and consoles
(artifacts/failures/*), the incidents (incidents.json: the run's one incidents
artifact, whose list results.json and summary.md hold too; under xdist the controller's
merge of this run's worker files), and a Gantt-style timeline of the run's stages (stages.jsonl:
image, boot, guests, snapshot, peer, each check) as inline SVG, with its largest
costs listed.
"""

from __future__ import annotations

import base64
import html
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from .metrics import load as load_metrics
from .report import SUMMARY_HEADER, summary_rows
from .results import device_model_label
from .stages import StageEvent, bars, load_events

TAIL_LINES = 40
# harness/incidents.py's Incident fields, as columns.
INCIDENT_FIELDS = ("subject", "name", "guest_type", "image", "phase", "nodeid", "detail", "signature",
                   "action", "evidence")
COLOURS = {"image": "#8e6c8a", "boot": "#3b75af", "snapshot": "#519e3e", "guest": "#ef8636",
           "peer": "#c53a32", "measure": "#17becf",
           "check": "#7f7f7f", "setup": "#bcbd22", "incident": "#d62728"}
OUTCOME_COLOURS = {"passed": "#d7f0d2", "passed-after-fault": "#e8f0b0", "failed": "#f6c7c3",
                   "error": "#f6c7c3", "skipped": "#eeeeee",
                   "xfailed": "#fbe8b5", "xpassed": "#f6c7c3"}
STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222}h1{font-size:1.5em}h2{margin-top:1.6em;
border-bottom:1px solid #ccc}table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;
padding:2px 6px;text-align:left;vertical-align:top}pre{background:#f6f6f6;padding:6px;font-size:.78em;
max-height:22em;overflow:auto;white-space:pre-wrap}img{max-width:100%;border:1px solid #ddd}
.none{color:#777}.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


# ------------------------------------------------------------------ sections


def results_section(artifacts: Path) -> str:
    data = _json(artifacts / "results.json") or {}
    results = data.get("results", [])
    if not results:
        return "<p class=none>no results.json: no check ran</p>"
    counts: dict[str, int] = {}
    for r in results:
        counts[r.get("outcome") or "?"] = counts.get(r.get("outcome") or "?", 0) + 1
    head = ("check", "image", "guest", "paging", "outcome", "s", "Xen", "kernel", "device model", "reason")
    rows = [(f"{r['plugin']}::{r['check']}", image_label(r), r.get("guest_type", ""), r.get("paging", ""),
             r.get("outcome", ""), f"{r.get('duration', 0):.1f}", r.get("xen_version", ""),
             r.get("kernel_release", ""),
             device_model_label(*(r.get(f"device_model{k}", "") for k in ("", "_version", "_package"))),
             (r.get("reason") or "")[:160]) for r in results]
    colours = [OUTCOME_COLOURS.get(r.get("outcome", ""), "") for r in results]
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    return f"<p>{esc(summary)}</p>" + table(head, rows, colours)


def image_label(result: dict) -> str:
    """A check's image; for a migration across Xen versions (plugins/cross_version.py) the
    pair, labelled ``cross-version a -> b`` with its outcome, as its record is."""
    props = result.get("properties") or {}
    cross = props.get("cross_version")
    if not cross:
        return result.get("image", "")
    outcome = props.get("cross_version_outcome")
    return f"{result.get('image', '')} {cross}" + (f" ({outcome})" if outcome else "")


def table(head: Iterable[str], rows: Iterable[Iterable[object]], colours: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        bg = f' style="background:{colours[i]}"' if colours and colours[i] else ""
        out.append(f"<tr{bg}>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    return "".join(out) + "</table>"


def measurements_section(artifacts: Path) -> str:
    path = artifacts / "metrics.json"
    records = load_metrics(path) if path.is_file() else []
    if not records:
        return "<p class=none>no measurements (metrics.json)</p>"
    return table(SUMMARY_HEADER, summary_rows(records))


def plots_section(artifacts: Path) -> str:
    pngs = sorted((artifacts / "plots").glob("*.png"))
    if not pngs:
        return "<p class=none>no plots (artifacts/plots)</p>"
    return "".join(f"<h3>{esc(p.stem)}</h3><img alt='{esc(p.name)}' src='data:image/png;base64,"
                   f"{base64.b64encode(p.read_bytes()).decode()}'>" for p in pngs)


def failures_section(artifacts: Path) -> str:
    dirs = sorted(d for d in (artifacts / "failures").glob("*") if d.is_dir())
    if not dirs:
        return "<p class=none>no failures</p>"
    out = []
    for d in dirs:
        out.append(f"<h3>{esc(d.name)}</h3>")
        for f in sorted(d.iterdir()):
            if f.is_file():
                out.append(f"<p><b>{esc(f.name)}</b> (last {TAIL_LINES} lines)</p><pre>{esc(tail(f))}</pre>")
    return "".join(out)


def incidents(artifacts: Path) -> list[dict]:
    """The run's incident records: incidents.json, the run's one incidents artifact, written
    by the only process or merged by the xdist controller from this run's incidents-gwN.json
    (not read here); results.json and summary.md hold the same list (fixtures/run.py
    ``run_incidents``)."""
    data = _json(artifacts / "incidents.json")
    return [d for d in (data if isinstance(data, list) else []) if isinstance(d, dict)]


def _cell(value: object) -> str:
    if isinstance(value, dict):  # evidence: each kind's text, its end kept
        return "\n".join(f"{k}: {str(v)[-300:]}" for k, v in value.items() if v)
    return "" if value is None else str(value)[:400]


def incidents_section(artifacts: Path) -> str:
    found = incidents(artifacts)
    if not found:
        return "<p class=none>no incidents</p>"
    rows = [[_cell(i.get(k)) for k in INCIDENT_FIELDS] for i in found]
    return f"<p class=incidents>{len(found)} incident(s)</p>" + table(INCIDENT_FIELDS, rows)


# ------------------------------------------------------------------ timeline


def timeline_bars(artifacts: Path) -> list[StageEvent]:
    """The timed stages of stages.jsonl (checks included); without check records there,
    the checks from the JUnit XML (its timestamp, then each test's time in order)."""
    events = bars(load_events(artifacts / "stages.jsonl"))
    if not any(e.kind == "check" for e in events):
        events += junit_checks(artifacts / "junit.xml")
    return sorted(events, key=lambda e: (e.start, e.t))


def junit_checks(path: Path) -> list[StageEvent]:
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    if suite is None or not suite.get("timestamp"):
        return []
    t = datetime.fromisoformat(suite.get("timestamp")).timestamp()
    out = []
    for case in suite.iter("testcase"):
        seconds = float(case.get("time") or 0)
        t += seconds
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        out.append(StageEvent(name, "setup+call+teardown (JUnit)", "check", 2, seconds, t))
    return out


def _label(e: StageEvent) -> str:
    if e.kind == "check":
        return f"{e.text.split()[0]} {e.subject.rsplit('/', 1)[-1]}"
    return f"{e.kind}: " + (f"[{e.subject}] " if e.subject else "") + e.text


def _colour(e: StageEvent) -> str:
    if e.kind == "check" and not e.text.startswith("call"):
        return COLOURS["setup"]
    return COLOURS.get(e.kind, "#999")


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def costs(events: list[StageEvent]) -> list[tuple[float, str]]:
    """(seconds, label), largest first: finished stages and checks' calls as they are; a
    check's setup or teardown without the stages it contains (which are listed themselves)."""
    stages = [e for e in events if e.kind != "check" and e.level == 0]
    out = [(e.seconds or 0.0, _label(e)) for e in stages]
    for e in events:
        if e.kind != "check":
            continue
        inner = [(max(s.start, e.start), min(s.t, e.t)) for s in stages if s.t > e.start and s.start < e.t]
        out.append(((e.seconds or 0.0) - _union(inner), _label(e) + (" (own time)" if inner else "")))
    return sorted(out, key=lambda c: -c[0])


def timeline_svg(events: list[StageEvent], width: int = 1300, row: int = 15, label_w: int = 470) -> str:
    if not events:
        return "<p class=none>no timed stages (stages.jsonl)</p>"
    t0 = min(e.start for e in events)
    span = max(max(e.t for e in events) - t0, 1.0)
    scale = (width - label_w - 50) / span  # room for the last bar's "N s"
    height = row * len(events) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">']
    parts += _axis(span, scale, label_w, height)
    for i, e in enumerate(events):
        y = 20 + i * row
        x = label_w + (e.start - t0) * scale
        w = max((e.seconds or 0) * scale, 1.5)
        label = _label(e)
        parts.append(f'<text x="{label_w - 6}" y="{y + row - 4}" text-anchor="end">{esc(label[:78])}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="{_colour(e)}">'
                     f'<title>{esc(label)}: {e.seconds or 0:.1f} s</title></rect>')
        parts.append(f'<text x="{x + w + 3:.1f}" y="{y + row - 4}" fill="#555">{e.seconds or 0:.0f} s</text>')
    return "".join(parts) + "</svg>"


def _axis(span: float, scale: float, label_w: int, height: int) -> list[str]:
    step = next(s for s in (10, 30, 60, 120, 300, 600, 1800, 3600, 10**9) if span / s <= 12)
    out = []
    for k in range(int(span // step) + 1):
        x = label_w + k * step * scale
        out.append(f'<line x1="{x:.1f}" y1="14" x2="{x:.1f}" y2="{height}" stroke="#ddd"/>'
                   f'<text x="{x + 2:.1f}" y="11" fill="#555">{k * step // 60}:{k * step % 60:02d}</text>')
    return out


def legend() -> str:
    return "<p class=legend>" + "".join(f'<span style="background:{c}"></span>{esc(k)}'
                                        for k, c in COLOURS.items()) + "</p>"


def timeline_section(artifacts: Path) -> str:
    events = timeline_bars(artifacts)
    top = costs(events)[:5]
    listing = "".join(f"<li>{s:.0f} s: {esc(label)}</li>" for s, label in top)
    return (f"<p>Top costs:</p><ol>{listing}</ol>" if top else "") + legend() + timeline_svg(events)


# ------------------------------------------------------------------ page

SECTIONS: tuple[tuple[str, Callable[[Path], str]], ...] = (
    ("Summary", results_section),
    ("Measurements", measurements_section),
    ("Timeline", timeline_section),
    ("Migration plots", plots_section),
    ("Failures", failures_section),
    ("Incidents", incidents_section),
)


def render(artifacts: Path, title: str = "nested-xen run") -> str:
    body = "".join(f"<h2 id='{name.split()[0].lower()}'>{esc(name)}</h2>{make(artifacts)}"
                   for name, make in SECTIONS)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f"<p>{esc(artifacts)}</p>{body}</body></html>\n")


def write(artifacts: Path) -> Path:
    path = artifacts / "report.html"
    path.write_text(render(artifacts))
    return path


class ReportPlugin:
    """Writes artifacts/report.html at the end of a run that ran checks (not on xdist workers)."""

    def __init__(self, artifacts: Path, ran_checks: Callable[[], bool]) -> None:
        self.artifacts = artifacts
        self.ran_checks = ran_checks

    @pytest.hookimpl(trylast=True)  # after results.json, the plots and the guests' deaths
    def pytest_terminal_summary(self, terminalreporter: Any, config: Any) -> None:
        if hasattr(config, "workerinput") or not self.ran_checks():
            return
        try:
            path = write(self.artifacts)
        except OSError as exc:
            terminalreporter.write_line(f"report.html not written: {exc}")
            return
        terminalreporter.write_line(f"report: {path}")
