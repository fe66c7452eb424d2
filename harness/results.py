"""Per-check results of a run: ``results.json``, the plugin x image x guest matrix, ``summary.md``.

Every check (a test marked with ``@check``) carries JUnit properties naming its
plugin, check, host image and guest type from collection on, and the booted
host's Xen version, dom0 kernel, dom0 mode and accelerator once ``host_facts``
resolves. The same properties feed this module: it reads them from the test
reports (so it works under xdist too), keeps one :class:`CheckResult` per test,
and at the end of the run prints the matrix and writes ``results.json`` and
``summary.md`` (which `nested-xen report DIR --markdown` prints again).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .judge import PASSED_AFTER_FAULT
from .metrics import Record
from .plugins import GUEST_TYPES
from .report import markdown_table, summary_markdown

# Outcome -> the letter shown in the matrix, in the order of pytest's summary line.
OUTCOMES = {"failed": "F", "error": "E", "passed": "P", "passed-after-fault": "R", "skipped": "s",
            "xfailed": "x", "xpassed": "X"}
LEGEND = ("P passed, R passed only when run again after an emulator fault, F failed, E error (setup or "
          "teardown), s skipped, x expected failure (known issue), X passed although expected to fail")
NO_GUEST = "no guest"
CHECK_PROPERTIES = ("plugin", "check", "image", "guest_type")
HOST_PROPERTIES = ("xen_version", "kernel_release", "dom0_mode", "accel", "origin", "xen_changeset",
                   "device_model", "device_model_version", "device_model_package", "paging")
TRANSLATED = ("pvh", "hvm")  # the guest types that run on HAP or shadow paging (PV: neither)


@dataclass
class CheckResult:
    """One test of one check: where it ran and how it ended."""

    nodeid: str
    plugin: str
    check: str
    image: str = ""
    guest_type: str = ""
    dom0_mode: str = ""
    xen_version: str = ""
    kernel_release: str = ""
    accel: str = ""
    outcome: str = ""  # a key of OUTCOMES
    duration: float = 0.0  # seconds: setup + call + teardown, as in the JUnit XML
    reason: str = ""  # why it was skipped, expected to fail, or failed (first line)
    verdict: str = ""  # "passed after emulator fault" when a rerun passed (harness/verdict.py)
    incidents: list[dict] = dataclasses.field(default_factory=list)  # deaths that hit it
    finding: str = ""  # what the check measured about the host (its "finding" property)
    # the check's own record_property values (an exit status, a duration, an output tail)
    properties: dict[str, Any] = dataclasses.field(default_factory=dict)
    origin: str = ""  # where the host's Xen/kernel came from: "debian" or the inputs' label
    xen_changeset: str = ""
    # libxl's device model (HVM guests' QEMU): its path, version ("11.1.2") and package
    device_model: str = ""
    device_model_version: str = ""
    device_model_package: str = ""
    paging: str = ""  # what its PVH or HVM guest ran on: hap or shadow ("" a PV guest, or none)


def plugin_name(nodeid: str) -> str:
    """``plugins/smoke.py::…`` -> ``smoke``; ``acme/grants.py::…`` -> ``acme.grants``;
    ``README.md::…`` -> ``README.md``."""
    path = nodeid.split("::", 1)[0].removeprefix("plugins/")
    return path.removesuffix(".py").replace("/", ".")


def check_properties(item: pytest.Item, image: str | None, guest_type: str | None) -> list[tuple[str, str]]:
    """The JUnit properties a check carries from collection on (empty ones left out)."""
    name = getattr(item, "originalname", item.name)
    values = (plugin_name(item.nodeid), name, image, guest_type)
    return [(key, value) for key, value in zip(CHECK_PROPERTIES, values, strict=True) if value]


def host_properties(facts: Any) -> list[tuple[str, str]]:
    """The JUnit properties read from the booted host (``HostFacts``)."""
    values = ((key, getattr(facts, key, None)) for key in HOST_PROPERTIES)
    return [(key, str(value)) for key, value in values if value is not None]


def _outcome(report: pytest.TestReport) -> tuple[str, str] | None:
    """(outcome, reason) that this phase's report decides; None for a passed setup or teardown."""
    if report.when != "call" and report.passed:
        return None
    wasxfail = getattr(report, "wasxfail", None)
    if wasxfail is not None:
        return ("xfailed" if report.skipped else "xpassed"), wasxfail
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        return "skipped", reason.removeprefix("Skipped: ")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = (crash.message if crash is not None else report.longreprtext).strip()
        return ("failed" if report.when == "call" else "error"), (text.splitlines()[0][:300] if text else "")
    return "passed", ""


class Results:
    """The run's check results, built from test reports (``pytest_runtest_logreport``)."""

    def __init__(self) -> None:
        self._by_nodeid: dict[str, CheckResult] = {}

    @property
    def results(self) -> list[CheckResult]:
        return list(self._by_nodeid.values())

    def add(self, report: pytest.TestReport) -> None:
        props = {str(k): v for k, v in report.user_properties}
        if "plugin" not in props:
            return  # not a check
        result = self._by_nodeid.get(report.nodeid)
        if result is None:
            result = self._by_nodeid[report.nodeid] = CheckResult(report.nodeid, str(props["plugin"]),
                                                                 str(props.get("check", "")))
        for key in (*CHECK_PROPERTIES[2:], *HOST_PROPERTIES, "verdict"):
            if key in props:
                setattr(result, key, str(props[key]))
        if result.guest_type not in TRANSLATED:
            result.paging = ""  # the host's facts name the translated guests' paging
        for key, value in report.user_properties:
            if key == "incident" and json.loads(str(value)) not in result.incidents:
                result.incidents.append(json.loads(str(value)))
        if "finding" in props:
            result.finding = str(props["finding"])
        for key, value in props.items():
            if key not in (*CHECK_PROPERTIES, *HOST_PROPERTIES, "verdict", "incident", "finding"):
                result.properties[key] = value if isinstance(value, (int, float, bool)) else str(value)
        result.duration = round(result.duration + report.duration, 3)
        decided = _outcome(report)
        # A teardown error turns a passed (or skipped) test into an error; a failure stays one.
        if decided is not None and result.outcome not in ("failed", "error"):
            result.outcome, result.reason = decided
            if decided[0] == "passed" and result.verdict == PASSED_AFTER_FAULT:
                first = str(props.get("first_attempt", "")).strip().splitlines()
                result.outcome, result.reason = "passed-after-fault", (first[-1][:300] if first else "")


def write_json(results: list[CheckResult], path: Path, found: Sequence[Any] = ()) -> None:
    from .incidents import as_dicts

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": 1, "results": [dataclasses.asdict(r) for r in results],
            "incidents": as_dicts(found)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def load(path: Path) -> list[CheckResult]:
    data = json.loads(Path(path).read_text())
    names = {f.name for f in dataclasses.fields(CheckResult)}
    return [CheckResult(**{k: v for k, v in r.items() if k in names}) for r in data["results"]]


# ---------------------------------------------------------------------- the matrix

Row = tuple[str, str, str]  # plugin, image, dom0 mode


def matrix(results: Iterable[CheckResult]) -> tuple[list[str], dict[Row, dict[str, Counter[str]]]]:
    """The guest-type columns in use, and per (plugin, image, dom0 mode) the outcome counts
    in each column (checks without a guest type are in the ``no guest`` column)."""
    results = list(results)
    # A test skipped before its host came up has no dom0 mode: file it under the one
    # mode its image was seen booted with, when there is exactly one.
    modes: dict[str, set[str]] = defaultdict(set)
    for r in results:
        if r.dom0_mode:
            modes[r.image].add(r.dom0_mode)
    rows: dict[Row, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for r in results:
        dom0 = r.dom0_mode or (next(iter(modes[r.image])) if len(modes[r.image]) == 1 else "")
        rows[(r.plugin, r.image, dom0)][r.guest_type or NO_GUEST][r.outcome] += 1
    columns = [c for c in (NO_GUEST, *GUEST_TYPES) if any(c in cells for cells in rows.values())]
    return columns, dict(sorted(rows.items()))


def cell(counts: Counter[str] | None) -> str:
    """``3P 1x``: how many tests ended each way; ``-`` when none ran there."""
    if not counts:
        return "-"
    return " ".join(f"{counts[o]}{letter}" for o, letter in OUTCOMES.items() if counts[o])


def _matrix_rows(results: Iterable[CheckResult]) -> tuple[list[str], list[list[str]]]:
    columns, rows = matrix(results)
    header = ["plugin", "image", "dom0", *columns]
    body = [[plugin, image or "-", dom0 or "-", *(cell(cells.get(c)) for c in columns)]
            for (plugin, image, dom0), cells in rows.items()]
    return header, body


def matrix_table(results: Iterable[CheckResult]) -> str:
    """The matrix as a fixed-width table for the terminal, with its legend."""
    header, body = _matrix_rows(results)
    widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()

    return "\n".join([line(header), "-" * len(line(header)), *map(line, body), LEGEND])


def totals(results: Iterable[CheckResult]) -> str:
    """``1 failed, 12 passed, 3 skipped`` (in the order of pytest's summary line)."""
    counts = Counter(r.outcome for r in results)
    return ", ".join(f"{counts[o]} {o}" for o in OUTCOMES if counts[o]) or "no checks ran"


def image_times(results: Iterable[CheckResult]) -> dict[str, tuple[int, float]]:
    """Per image: how many tests ran and their summed durations (setup, call and
    teardown, so a host's boot or restore counts for the image that waited on it):
    in a serial run, how long that image took."""
    out: dict[str, tuple[int, float]] = {}
    for r in results:
        n, seconds = out.get(r.image, (0, 0.0))
        out[r.image] = (n + 1, round(seconds + r.duration, 1))
    return out


def image_label(image: str, origin: str) -> str:
    """The image column: the recipe, and where its Xen/kernel came from if not Debian's packages."""
    return image if origin in ("", "debian") else f"{image} ({origin})"


def xen_label(r: CheckResult) -> str:
    """``4.22.0 (changeset abc123)`` when the host reported one."""
    changeset = r.xen_changeset.split()
    return f"{r.xen_version} ({' '.join(changeset[-1:])})" if changeset else r.xen_version


def device_model_label(path: str, version: str, package: str) -> str:
    """``11.1.2 (qemu-system-xen 1:11.1.2+ds-3) /usr/libexec/xen-qemu-system-i386``; ``-``
    when the host has none (or did not say)."""
    if not path:
        return "-"
    return " ".join(p for p in (version or "?", f"({package})" if package else "", path) if p)


def dm_label(r: CheckResult) -> str:
    return device_model_label(r.device_model, r.device_model_version, r.device_model_package)


def incidents_markdown(found: Sequence[Any], results: Sequence[CheckResult] = ()) -> list[str]:
    """Incidents per image and guest type, by phase and signature (harness/incidents.py),
    and the checks that passed only after an emulator fault."""
    from .incidents import TABLE_HEADER, table_rows

    parts = []
    if found:
        parts += [f"### Incidents: {len(found)} death(s) the harness did not cause", "",
                  markdown_table(TABLE_HEADER, table_rows(found)), ""]
    rerun = [r for r in results if r.verdict]
    if rerun:
        parts += ["### Passed after an emulator fault", "",
                  markdown_table(("test", "verdict", "incidents"),
                                 [(f"`{r.nodeid}`", r.verdict, str(len(r.incidents))) for r in rerun]), ""]
    return parts


def markdown(results: list[CheckResult], records: Sequence[Record] = (), found: Sequence[Any] = ()) -> str:
    """The run as Markdown: hosts, the matrix, every test that did not pass, incidents,
    measurements."""
    parts = ["## nested-xen results", ""]
    if results:
        times = image_times(results)
        dm = any(r.device_model for r in results)  # a column once a host named its device model
        paging = {r.image: r.paging for r in results if r.paging}  # a column once a PVH/HVM check ran
        hosts = sorted({(r.image, r.dom0_mode, xen_label(r), r.kernel_release, *([dm_label(r)] if dm else []),
                         r.accel, *([paging.get(r.image, "-")] if paging else []))
                        for r in results if r.xen_version})
        parts += [f"**{totals(results)}** ({len(results)} tests)", ""]
        if hosts:
            origins = {r.image: r.origin for r in results if r.origin}
            rows = [(image_label(h[0], origins.get(h[0], "")), *h[1:], str(times[h[0]][0]),
                     f"{times[h[0]][1]:.0f} s") for h in hosts]
            header = ("image", "dom0", "Xen", "dom0 kernel", *(["device model"] if dm else []), "accel",
                      *(["PVH/HVM paging"] if paging else []))
            parts += [markdown_table((*header, "tests", "time"), rows), ""]
        parts += [markdown_table(*_matrix_rows(results)), "", LEGEND, ""]
        order = list(OUTCOMES)
        others = sorted((r for r in results if r.outcome != "passed"),
                        key=lambda r: (order.index(r.outcome) if r.outcome in order else 0, r.nodeid))
        if others:
            parts += ["### Not passed", "",
                      markdown_table(("test", "outcome", "reason"),
                                     [(f"`{r.nodeid}`", r.outcome, r.reason) for r in others]), ""]
    parts += incidents_markdown(found, results)
    findings = [(f"`{r.nodeid}`", r.finding) for r in results if r.finding]
    if findings:
        parts += ["### Findings", "", "Measured on the host that ran the check.", "",
                  markdown_table(("test", "finding"), findings), ""]
    if records:
        parts += ["### Measurements", "", summary_markdown(list(records)), ""]
    if not results and not records:
        parts += ["No check ran.", ""]
    return "\n".join(parts)


class ResultsPlugin:
    """Registered by the pytest plugin: collects results, writes them, prints the matrix."""

    def __init__(self, artifacts_dir: Path, measurements: Callable[[], list[Record]],
                 incidents: Callable[[], list[Any]] = list) -> None:
        self.json_path = artifacts_dir / "results.json"
        self.markdown_path = artifacts_dir / "summary.md"
        self.measurements = measurements
        self.incidents = incidents
        self.results = Results()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.results.add(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput") or not self.results.results:
            return  # an xdist worker (the controller writes), or no check ran
        found = self.incidents()
        write_json(self.results.results, self.json_path, found)
        self.markdown_path.write_text(markdown(self.results.results, self.measurements(), found))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        results = self.results.results
        if not results:
            return
        terminalreporter.section("nested-xen results: plugin x image x guest type")
        terminalreporter.write_line(matrix_table(results))
        for r in results:
            if r.verdict:
                terminalreporter.write_line(f"{r.verdict}: {r.nodeid} ({len(r.incidents)} incident(s))")
        for image, (n, seconds) in image_times(results).items():
            terminalreporter.write_line(f"image {image or '(none)'}: {n} tests in {seconds:.0f} s")
        terminalreporter.write_line(f"results: {self.json_path}  summary: {self.markdown_path}")
