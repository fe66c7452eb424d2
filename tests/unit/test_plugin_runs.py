"""pytest, with the harness's plugin, run in-process on small plugin projects (no VM).

The host fixtures are replaced in the project's conftest.py (``xen_host``, ``host_facts``,
``guest``, ``agent``); everything else is the real plugin: collection of ``plugins/``,
entry-point plugins and the README's example, parametrization, gating, JUnit XML and
the results files.
"""

from __future__ import annotations

import json
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from harness import cli
from harness.config import REPO_ROOT
from harness.discovery import ENTRY_POINT_GROUP, readme_example
from harness.plugins import spec_of

pytest_plugins = ["pytester"]

README = REPO_ROOT / "README.md"

# A booted host, as far as the checks below can tell: per image, what `xl info` and
# `uname -r` would say; guests whose probe pages sit at pfn 0x100 + i; an agent that
# maps a frame to the page the (fake) translation puts there, through the real MapResult.
FAKE_HOST = '''
import hashlib
import os
from types import SimpleNamespace

import pytest

from harness.agent.client import MapResult
from harness.guests import ProbePageInfo

FACTS = {"alpha": ("4.17.5", "6.1.0-50-amd64", "pv"), "beta": ("4.19.1", "6.12.9+deb13-amd64", "pvh")}
SHIFT = 0  # where the fake translation puts gfn g: on page g + SHIFT


ALIVE = {"alpha": True, "beta": True}  # does dom0 answer? (a check may "kill" its host)
import harness.fixtures.hosts  # noqa: E402
harness.fixtures.hosts.HEALTH_PATIENCE_S = 0  # a dom0 that does not answer at once is lost
SERIAL = {"alpha": "", "beta": ""}  # the L1's serial log (a check may write a death into it)


@pytest.fixture(scope="module")
def xen_host(host_image_name):
    def run(command, timeout=None):
        return SimpleNamespace(rc=0 if ALIVE[host_image_name] else 255)

    return SimpleNamespace(name=f"fake-{host_image_name}", remote=SimpleNamespace(run=run),
                           machine=SimpleNamespace(read_serial=lambda: SERIAL[host_image_name]))


@pytest.fixture(scope="module")
def host_facts(host_image_name):
    xen, kernel, dom0 = FACTS[host_image_name]
    accel = os.environ.get("NX_FAKE_ACCEL", "tcg")
    return SimpleNamespace(xen_version=xen, kernel_release=kernel, dom0_mode=dom0, accel=accel,
                           virt_caps=frozenset({"pv", "hvm", "hap"}), xen_caps=frozenset())


# The dom0 side of guests, at the SSH boundary: what `xl list`, `xl dmesg` and the
# console files say. A check may "kill" its guest (DOMAINS.pop, DMESG.append); a guest
# created again boots with the same probe pages under the next domid.
DOMAINS = {}
DMESG = []
NEXT_DOMID = [7]


def probe_console():
    from harness.probe_report import ProbePage, format_probe_line, page_digest

    pages = [ProbePage(i, 0x100 + i, hashlib.sha256(bytes([i]) * 4096).hexdigest()) for i in range(8)]
    lines = [format_probe_line({"ev": "hello", "v": 1, "nonce": "ab" * 16, "pages": 8,
                                "page_size": 4096, "tick_ms": 0})]
    lines += [format_probe_line({"ev": "page", "i": p.index, "pfn": p.pfn, "sha256": p.sha256})
              for p in pages]
    lines.append(format_probe_line({"ev": "ready", "pages": 8, "digest": page_digest(pages)}))
    return "\\n".join(lines) + "\\n"


class FakeDom0:
    def run(self, command, timeout=None):
        return SimpleNamespace(rc=0, stdout=probe_console() if command.startswith("cat ") else "", stderr="")

    def put_text(self, text, path, mode=None):
        pass

    def run_expect(self, command, codes=(0,), **kwargs):
        return self.run(command)


class FakeXl:
    remote = FakeDom0()

    def list(self):
        return list(DOMAINS.values())

    def domain(self, name):
        return DOMAINS.get(name)

    def dmesg(self):
        return "\\n".join(DMESG)

    def create(self, path, paused=False):
        from harness.xen import Domain

        name = path.rsplit("/", 1)[-1].removesuffix(".cfg")
        NEXT_DOMID[0] += 1
        DOMAINS[name] = Domain(name, NEXT_DOMID[0], 256, 1, "--p---" if paused else "-b----")

    def domid(self, name):
        return DOMAINS[name].domid

    def unpause(self, domid):
        pass

    def destroy(self, name):
        DOMAINS.pop(name, None)


SHARED = {}  # like the pool: one shared guest object per type, replaced in place when dead


@pytest.fixture(scope="module")
def guest(xen_host, guest_type, host_image_name):
    from harness.guests import Guest, GuestSpec
    from harness.xen import Domain

    if guest_type in SHARED:  # as the pool does: a dead shared guest is replaced in place
        shared = SHARED[guest_type]
        shared.released = False
        shared.replace_if_dead(lambda domid, pfns: {}, 5, "when a check asked for it")
        return shared
    pages = [ProbePageInfo(i, 0x100 + i, hashlib.sha256(bytes([i]) * 4096).hexdigest()) for i in range(8)]
    shared = Guest(GuestSpec(type=guest_type, name=f"nx-shared-{guest_type}"), FakeXl(), domid=7,
                   pages=pages, image=host_image_name)
    DOMAINS[shared.name] = Domain(shared.name, 7, 256, 1, "-b----")
    SHARED[guest_type] = shared
    return shared


class FakeAgent:
    def __init__(self, guest):
        self.memory = {page.gfn: page.sha256 for page in guest.pages}

    def p2m(self, domid, pfns):
        return {}

    def map_foreign(self, domid, frames):
        shas = [self.memory.get(f + SHIFT) for f in frames]
        return MapResult.from_json({"ok": True, "call": "mmapbatch_v2",
                                    "pages": [{"frame": f, "sha256": s} for f, s in zip(frames, shas)],
                                    "errors": [0 if s else -14 for s in shas]})


@pytest.fixture(scope="module")
def agent(xen_host, guest):
    return FakeAgent(guest)
'''


@pytest.fixture(autouse=True)
def own_plugins_package(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each project below has a `plugins` package of its own: hide the repository's, if imported.
    Its fake hosts' images (alpha, beta) are recipes, beside the repository's."""
    for name in [m for m in sys.modules if m == "plugins" or m.startswith("plugins.")]:
        monkeypatch.delitem(sys.modules, name)
    import harness.config

    recipes = tmp_path_factory.mktemp("recipes")
    for real in harness.config.RECIPE_DIR.glob("*.yaml"):
        (recipes / real.name).symlink_to(real)
    for fake in ("alpha", "beta"):  # FAKE_HOST's FACTS
        (recipes / f"{fake}.yaml").write_text("# a fake host of tests/unit/test_plugin_runs.py\n")
    monkeypatch.setattr(harness.config, "RECIPE_DIR", recipes)


def project(pytester: pytest.Pytester, shift: int = 0) -> Path:
    """A checkout-like directory: the project's python_files, an empty plugins/ package, fakes."""
    # The outer run imported the harness already, so the inner one cannot rewrite its asserts.
    pytester.makeini("[pytest]\npython_files = test_*.py plugins/[a-z]*.py\njunit_family = xunit1\n"
                     "filterwarnings = ignore:Module already imported:pytest.PytestAssertRewriteWarning\n")
    pytester.makeconftest(FAKE_HOST.replace("SHIFT = 0", f"SHIFT = {shift}"))
    return pytester.mkpydir("plugins")


def nodeids(result: pytest.RunResult) -> list[str]:
    return [line for line in result.outlines if "::" in line]


def has_line(result: pytest.RunResult, start: str, contains: str = "") -> bool:
    """Does the output have a line starting with ``start`` (and containing ``contains``)?
    (fnmatch_lines would read the brackets of test ids as character classes.)"""
    return any(line.startswith(start) and contains in line for line in result.outlines)


# ---------------------------------------------------------------------- entry points


def install(site: Path, module: str, source: str, entry_point: str | None = None) -> None:
    """A real (if tiny) installed distribution: a package and its dist-info with entry points."""
    package, _, name = module.rpartition(".")
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    (site / package / f"{name}.py").write_text(textwrap.dedent(source))
    info = site / "acme_xen_checks-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-xen-checks\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nacme-grants = {entry_point or module}\n")


ACME = """
    from harness.plugins import check


    @check(guests=["pvh"])
    def test_grant_table_maps(guest, agent):
        assert agent.map_foreign(guest.domid, [guest.pages[0].gfn]).frames[0].ok


    @check()
    def test_lists_compare():
        assert [1, 2, 3] == [1, 2, 4]
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "site-packages"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


def test_entry_point_module_is_collected_with_plugins(pytester: pytest.Pytester, site: Path) -> None:
    (project(pytester) / "local.py").write_text("def test_local():\n    pass\n")
    install(site, "acme_xen_checks.grants", ACME)
    result = pytester.runpytest_inprocess("plugins", "--collect-only", "-q", "--host-image", "alpha")
    assert nodeids(result) == [
        "plugins/local.py::test_local",
        "acme_xen_checks/grants.py::test_grant_table_maps[img=alpha-guest=pvh]",
        "acme_xen_checks/grants.py::test_lists_compare",
    ]


def test_entry_point_plugins_are_listed_in_the_header(pytester: pytest.Pytester, site: Path) -> None:
    project(pytester)
    install(site, "acme_xen_checks.grants", ACME)
    result = pytester.runpytest_inprocess("plugins", "--collect-only")
    result.stdout.fnmatch_lines([f"nested-xen: {ENTRY_POINT_GROUP} entry point "
                                 "acme-grants = acme_xen_checks.grants (acme-xen-checks 1.0)"])


def test_entry_point_checks_run_with_assertion_rewriting(pytester: pytest.Pytester, site: Path) -> None:
    project(pytester)
    install(site, "acme_xen_checks.grants", ACME)
    result = pytester.runpytest_inprocess("plugins", "--host-image", "alpha")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*At index 2 diff: 3 != 4*"])  # pytest's rewritten assert


def test_no_entry_points_option(pytester: pytest.Pytester, site: Path) -> None:
    project(pytester)
    install(site, "acme_xen_checks.grants", ACME)
    result = pytester.runpytest_inprocess("plugins", "--collect-only", "--nx-no-entry-points")
    result.stdout.fnmatch_lines([f"nested-xen: {ENTRY_POINT_GROUP} entry points not collected "
                                 "(--nx-no-entry-points)", "*no tests collected*"])
    assert "acme" not in "\n".join(nodeids(result))


def test_entry_points_are_not_collected_outside_plugins(pytester: pytest.Pytester, site: Path) -> None:
    project(pytester)
    pytester.makepyfile(test_unit="def test_unit():\n    pass\n")
    install(site, "acme_xen_checks.grants", ACME)
    result = pytester.runpytest_inprocess("test_unit.py", "--collect-only", "-q")
    assert nodeids(result) == ["test_unit.py::test_unit"]


def test_missing_entry_point_module_is_a_collection_error(pytester: pytest.Pytester, site: Path) -> None:
    project(pytester)
    install(site, "acme_xen_checks.grants", ACME, entry_point="acme_xen_checks.grantz")
    result = pytester.runpytest_inprocess("plugins")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*entry point acme-grants = acme_xen_checks.grantz (acme-xen-checks 1.0) "
                                 f"in group {ENTRY_POINT_GROUP}: no module named 'acme_xen_checks.grantz'*"])


# ---------------------------------------------------------------------- the README's example


def test_readme_example_is_collected_with_its_gating(pytester: pytest.Pytester) -> None:
    example = readme_example(README.read_text())
    assert example is not None, "README.md has no <!-- plugin-example --> block"
    (project(pytester) / "readme_example.py").write_text(example)
    items, _ = pytester.inline_genitems("plugins", "--host-image", "alpha")
    assert [item.name for item in items] == [
        f"{name}[img=alpha-guest={guest}]"
        for name in ("test_first_and_last_probe_pages_map", "test_negative_control_swapped_frames_are_caught")
        for guest in ("pvh", "hvm")
    ]
    for item in items:
        spec = spec_of(item)
        assert spec.guests == ("pvh", "hvm")
        assert str(spec.xen) == ">=4.17" and str(spec.kernel) == ">=6.1" and spec.caps == ("hap",)
        assert {"e2e", "image"} <= {m.name for m in item.iter_markers()}


def test_readme_example_runs_in_every_plugins_run(pytester: pytest.Pytester) -> None:
    project(pytester)
    (pytester.path / "README.md").write_text(README.read_text())
    result = pytester.runpytest_inprocess("plugins", "-v", "--host-image", "alpha")
    result.assert_outcomes(passed=4)
    assert has_line(result, "README.md::test_first_and_last_probe_pages_map[img=alpha-guest=pvh] PASSED")
    assert has_line(result, "README.md::test_negative_control_swapped_frames_are_caught[img=alpha-guest=hvm] "
                    "PASSED")
    written = pytester.path / "artifacts" / "readme-example" / "readme_example.py"
    assert written.read_text() == readme_example(README.read_text())


def test_readme_example_fails_on_a_wrong_translation(pytester: pytest.Pytester) -> None:
    # Each gfn shows the next page: the check must fail, and so must its negative control:
    # the last page's gfn shows a page that does not exist, and a swapped frame that maps
    # nothing says nothing about the content comparison.
    project(pytester, shift=1)
    (pytester.path / "README.md").write_text(README.read_text())
    result = pytester.runpytest_inprocess("plugins", "--host-image", "alpha")
    result.assert_outcomes(failed=4)
    assert has_line(result, "FAILED README.md::test_first_and_last_probe_pages_map[img=alpha-guest=pvh]")
    assert has_line(result, "FAILED README.md::test_negative_control_swapped_frames_are_caught", "guest=pvh")
    result.stdout.fnmatch_lines(["E * AssertionError: 2 of 2 frames differ from the probe:",
                                 "E * AssertionError: the control shows nothing:"])


def test_readme_example_is_skipped_where_the_host_is_out_of_range(pytester: pytest.Pytester) -> None:
    project(pytester)
    (pytester.path / "README.md").write_text(README.read_text())
    pytester.makeconftest(FAKE_HOST.replace('"6.1.0-50-amd64", "pv"', '"5.10.0-30-amd64", "pv"'))
    result = pytester.runpytest_inprocess("plugins", "-rs", "--host-image", "alpha")
    result.assert_outcomes(skipped=4)
    result.stdout.fnmatch_lines(["*needs dom0 kernel >=6.1, host runs 5.10.0-30-amd64*"])


# ---------------------------------------------------------------------- new-plugin


def test_new_plugin_is_collected_with_its_negative_control(pytester: pytest.Pytester,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    plugins = project(pytester)
    assert cli.main(["new-plugin", "edge_pages", "--dir", str(plugins)]) == 0
    capsys.readouterr()
    result = pytester.runpytest_inprocess("plugins", "--collect-only", "-q", "--host-image", "alpha")
    ids = nodeids(result)
    assert len(ids) == 4 and all(i.startswith("plugins/edge_pages.py::test_") for i in ids), ids
    assert sum("::test_negative_control_" in i for i in ids) == 2
    result = pytester.runpytest_inprocess("plugins", "--host-image", "alpha")
    result.assert_outcomes(passed=4)


# ---------------------------------------------------------------------- JUnit XML and results


FAKE_PLUGIN = """
    import pytest

    from harness.plugins import check


    @check(guests=["pv", "hvm"])
    def test_guest_is_up(guest):
        assert guest.type in ("pv", "hvm")


    @check(xen=">=4.18")
    def test_needs_newer_xen(host_facts):
        pass


    @check()
    def test_runs_the_pinned_xen(host_facts):
        assert host_facts.xen_version == "4.17.5", "wrong Xen"


    @check(guests=["pvh"])
    @pytest.mark.xfail(reason="a known fault", strict=True)
    def test_known_fault(guest):
        assert False


    def test_not_a_check():
        pass
"""


def run_fake_plugin(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, Path]:
    (project(pytester) / "fake.py").write_text(textwrap.dedent(FAKE_PLUGIN))
    result = pytester.runpytest_inprocess("plugins", "--junitxml=junit.xml", "--host-image", "alpha,beta",
                                          *args)
    return result, pytester.path / "junit.xml"


def junit_cases(path: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """name -> (classname, properties) of every testcase."""
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases[case.get("name")] = (case.get("classname"), props)
    return cases


def test_junit_names_and_properties_identify_plugin_image_guest(pytester: pytest.Pytester) -> None:
    result, junit = run_fake_plugin(pytester)
    result.assert_outcomes(passed=7, failed=1, skipped=1, xfailed=2)  # beta runs Xen 4.19.1
    cases = junit_cases(junit)
    assert cases["test_guest_is_up[img=beta-guest=hvm]"] == ("plugins.fake", {
        "plugin": "fake", "check": "test_guest_is_up", "image": "beta", "guest_type": "hvm",
        "xen_version": "4.19.1", "kernel_release": "6.12.9+deb13-amd64", "dom0_mode": "pvh", "accel": "tcg"})
    _, skipped = cases["test_needs_newer_xen[img=alpha]"]
    assert skipped["image"] == "alpha" and skipped["dom0_mode"] == "pv" and "guest_type" not in skipped
    assert {name for name, (_, props) in cases.items() if "plugin" not in props} == {"test_not_a_check"}


def test_junit_names_carry_the_requested_dom0_mode(pytester: pytest.Pytester) -> None:
    result, junit = run_fake_plugin(pytester, "--dom0", "pvh")
    assert "test_guest_is_up[img=alpha-dom0=pvh-guest=pv]" in junit_cases(junit)


def test_results_json_summary_md_and_the_terminal_matrix(pytester: pytest.Pytester) -> None:
    result, _ = run_fake_plugin(pytester)
    result.stdout.fnmatch_lines([
        "*nested-xen results: plugin x image x guest type*",
        "plugin  image  dom0  no guest  pv  pvh  hvm",
        "-*",
        "fake    alpha  pv    1P 1s     1P  1x   1P",
        "fake    beta   pvh   1F 1P     1P  1x   1P",
        "P passed, R passed only when run again after an emulator fault, F failed, *",
    ])
    artifacts = pytester.path / "artifacts"
    records = {r["nodeid"]: r for r in json.loads((artifacts / "results.json").read_text())["results"]}
    assert len(records) == 10 and "plugins/fake.py::test_not_a_check" not in records
    record = records["plugins/fake.py::test_needs_newer_xen[img=alpha]"]
    assert record == {**record, "plugin": "fake", "check": "test_needs_newer_xen", "image": "alpha",
                      "guest_type": "", "dom0_mode": "pv", "xen_version": "4.17.5",
                      "kernel_release": "6.1.0-50-amd64", "accel": "tcg", "outcome": "skipped",
                      "reason": "needs Xen >=4.18, host runs 4.17.5"}
    assert record["duration"] >= 0
    failed = records["plugins/fake.py::test_runs_the_pinned_xen[img=beta]"]
    assert failed["outcome"] == "failed" and failed["reason"].startswith("AssertionError: wrong Xen")
    xfailed = records["plugins/fake.py::test_known_fault[img=alpha-guest=pvh]"]
    assert (xfailed["outcome"], xfailed["reason"]) == ("xfailed", "a known fault")
    summary = (artifacts / "summary.md").read_text()
    assert "| fake | beta | pvh | 1F 1P | 1P | 1x | 1P |" in summary
    assert "| alpha | pv | 4.17.5 | 6.1.0-50-amd64 | tcg |" in summary
    assert "| `plugins/fake.py::test_runs_the_pinned_xen[img=beta]` | failed | AssertionError: wrong Xen" \
        in summary


def test_setup_and_teardown_errors_are_errors(pytester: pytest.Pytester) -> None:
    (project(pytester) / "broken.py").write_text(textwrap.dedent("""
        import pytest

        from harness.plugins import check


        @pytest.fixture
        def bad_setup():
            raise RuntimeError("no guest today")


        @pytest.fixture
        def bad_teardown():
            yield
            raise RuntimeError("guest would not die")


        @check()
        def test_setup_fails(bad_setup):
            pass


        @check()
        def test_teardown_fails(bad_teardown):
            pass


        @check()
        def test_fails_then_teardown_fails(bad_teardown):
            assert False, "first"
    """))
    pytester.runpytest_inprocess("plugins")
    results = json.loads((pytester.path / "artifacts" / "results.json").read_text())["results"]
    assert {r["check"]: (r["outcome"], r["reason"]) for r in results} == {
        "test_setup_fails": ("error", "RuntimeError: no guest today"),
        "test_teardown_fails": ("error", "RuntimeError: guest would not die"),
        "test_fails_then_teardown_fails": ("failed", "AssertionError: first"),
    }


def test_no_results_files_without_checks(pytester: pytest.Pytester) -> None:
    project(pytester)
    pytester.makepyfile(test_unit="def test_unit():\n    pass\n")
    pytester.runpytest_inprocess("test_unit.py").assert_outcomes(passed=1)
    assert not (pytester.path / "artifacts" / "results.json").exists()


HOST_KILLER = """
    import pytest

    from harness.plugins import check
    import conftest


    @check()
    @pytest.mark.xfail(reason="known: the L1 may freeze here", strict=False)
    def test_a_freezes_the_host(xen_host, host_image_name):
        conftest.ALIVE[host_image_name] = False
        assert False, "dom0 stopped answering"


    @check()
    def test_b_runs_after_it(xen_host):
        pass
"""


@pytest.mark.parametrize("expected", [True, False])
def test_checks_after_a_lost_host_name_the_check_that_lost_it(pytester: pytest.Pytester,
                                                              expected: bool) -> None:
    """Seen here: an L1 froze during a PVH localhost migration (a known, flaky issue) and
    every later check of the module errored on SSH. The lost host is an incident (subject
    host); the module's later checks fail naming it, never a blanket expected failure
    (whatever that check's outcome); the next module gets a fresh host."""
    code = textwrap.dedent(HOST_KILLER)
    if not expected:
        code = code.replace('@pytest.mark.xfail(reason="known: the L1 may freeze here", strict=False)\n', "")
    (project(pytester) / "killer.py").write_text(code)
    result = pytester.runpytest_inprocess("plugins", "--host-image", "alpha", "-rA")
    if expected:
        result.assert_outcomes(xfailed=1, errors=1)
    else:
        result.assert_outcomes(failed=1, errors=1)
        result.stdout.fnmatch_lines(["*fake-alpha stopped answering during this check (incident: *"])
    result.stdout.fnmatch_lines(["*fake-alpha stopped answering during plugins/killer.py::"
                                 "test_a_freezes_the_host*(incident: during-check: fake-alpha*"
                                 "this check could not run on it*"])
    [incident] = json.loads((pytester.path / "artifacts" / "incidents.json").read_text())
    assert (incident["subject"], incident["phase"]) == ("host", "during-check")
    assert incident["action"] == ("expected-failure" if expected else "failed")
    assert "serial" in incident["evidence"]




# Measured on trixie (Xen 4.20.5, QEMU 10.0.13 TCG): a PVH dom0's vCPU "triple-faulted"
# with Xen's own CS and the RIP right after Xen's `vmrun` (the emulator leaked host state).
VMRUN_LEAK = """(XEN) d0v1 Triple fault - invoking HVM shutdown action 1
(XEN) *** Dumping Dom0 vcpu#1 state: ***
(XEN) RIP:    e008:[<ffff82d040215abd>]
(XEN) RFLAGS: 0000000000000246   CONTEXT: hvm guest (d0v1)
(XEN) Hardware Dom0 shutdown: rebooting machine"""
HOST_DEATH_ENTRY = """
- check: host-death
  xen: ">=4.17,<4.18"
  signature: 'd0v\\d+ Triple fault(?s:.*?)RIP:\\s+e008:\\[<ffff82d0'
  evidence: [serial]
  reason: the emulator leaked Xen's state into dom0's vCPU
"""


@pytest.mark.parametrize("serial, known", [
    (VMRUN_LEAK, HOST_DEATH_ENTRY),
    (VMRUN_LEAK.replace("e008", "0010"), HOST_DEATH_ENTRY),  # negative control: a guest CS
    (VMRUN_LEAK, HOST_DEATH_ENTRY.replace("4.18", "4.17.1")),  # negative control: other versions
])
def test_a_dom0_death_with_a_host_death_signature_is_not_a_regression(
        pytester: pytest.Pytester, serial: str, known: str) -> None:
    """The check dom0 died under is an expected failure (result unknown) and the module's
    later checks are skipped as not run, naming the incident, only when a host-death
    entry's versions match and its signature is in the serial tail; else both fail."""
    code = textwrap.dedent(HOST_KILLER).replace(
        '@pytest.mark.xfail(reason="known: the L1 may freeze here", strict=False)\n', "").replace(
        "conftest.ALIVE[host_image_name] = False",
        f"conftest.ALIVE[host_image_name] = False\n    conftest.SERIAL[host_image_name] = {serial!r}")
    (project(pytester) / "killer.py").write_text(code)
    (pytester.path / "known.yaml").write_text(known)
    result = pytester.runpytest_inprocess("plugins", "--host-image", "alpha", "-rA",
                                          "--known-issues", "known.yaml")
    [incident] = json.loads((pytester.path / "artifacts" / "incidents.json").read_text())
    if serial == VMRUN_LEAK and known == HOST_DEATH_ENTRY:
        result.assert_outcomes(xfailed=1, skipped=1)
        assert incident["action"] == "expected-failure"
        assert incident["signature"].startswith("host-death ")
        assert has_line(result, "SKIPPED", "not run: fake-alpha (dom0) died during plugins/killer.py::"
                                           "test_a_freezes_the_host[img=alpha] of a known emulator fault")
    else:
        result.assert_outcomes(failed=1, errors=1)
        assert incident["action"] == "failed"


# CI, stop 23 (bookworm, QEMU 7.2 TCG): translation's own HVM guest was being created for
# test_translation_survives_save_restore[hvm] when dom0 stopped answering ("transport
# failed during `xl list`: Timeout opening channel"); the setup error and the module
# fixtures' teardown ("cannot connect ... No existing session") were two bare ERRORs,
# with no serial tail and no incident.
SETUP_KILLER = """
    import pytest

    from harness.plugins import check
    from harness.remote import RemoteError
    import conftest


    @pytest.fixture(scope="module")
    def own_host_guest(xen_host, host_image_name):
        yield "created"
        if not conftest.ALIVE[host_image_name]:
            raise RemoteError("[fake] cannot connect to 127.0.0.1:42783: No existing session")


    @pytest.fixture
    def slow_guest(own_host_guest, host_image_name):
        conftest.ALIVE[host_image_name] = False
        conftest.SERIAL[host_image_name] = SERIAL_TEXT
        raise RemoteError("[fake] transport failed during `xl list`: Timeout opening channel.")


    @check()
    def test_save_restore(xen_host, slow_guest):
        pass
"""


@pytest.mark.parametrize("serial, known", [
    (VMRUN_LEAK, HOST_DEATH_ENTRY),
    (VMRUN_LEAK.replace("e008", "0010"), HOST_DEATH_ENTRY),  # negative control: a guest CS
])
def test_a_host_lost_while_a_check_is_set_up_is_an_incident(pytester: pytest.Pytester, serial: str,
                                                            known: str) -> None:
    """dom0 stops answering while a check's fixture creates its guest: the host is lost
    (an incident with the serial tail), judged by the host-death entries as under a check;
    the module's teardown that cannot reach it adds no second error."""
    code = textwrap.dedent(SETUP_KILLER).replace("SERIAL_TEXT", repr(serial))
    (project(pytester) / "setup_killer.py").write_text(code)
    (pytester.path / "known.yaml").write_text(known)
    result = pytester.runpytest_inprocess("plugins", "--host-image", "alpha", "-rA",
                                          "--known-issues", "known.yaml")
    [incident] = json.loads((pytester.path / "artifacts" / "incidents.json").read_text())
    assert (incident["subject"], incident["phase"]) == ("host", "during-check")
    assert "Triple fault" in incident["evidence"]["serial"]
    if "e008" in serial:
        result.assert_outcomes(xfailed=1)
        assert incident["action"] == "expected-failure"
        assert has_line(result, "XFAIL", "fake-alpha (dom0) died while this check was being set up "
                                         "of a known emulator fault")
    else:
        result.assert_outcomes(errors=1)
        assert incident["action"] == "failed"
        reason = "RemoteError: [fake] transport failed during `xl list`: Timeout opening channel."
        assert reason in result.stdout.str()
        result.stdout.fnmatch_lines(["*fake-alpha stopped answering while this check was being set up*"])
    result.stdout.fnmatch_lines(["*teardown could not reach fake-alpha, lost earlier*No existing session*"])


def test_teardown_errors_on_a_host_that_answers_stay_errors(pytester: pytest.Pytester) -> None:
    """Negative control: a teardown's transport error while dom0 answers is an error."""
    code = textwrap.dedent(SETUP_KILLER).replace("SERIAL_TEXT", "''")
    code = code.replace("if not conftest.ALIVE[host_image_name]:", "if True:")
    code = code.replace("    conftest.ALIVE[host_image_name] = False\n", "")
    code = code.replace('    raise RemoteError("[fake] transport failed during `xl list`: '
                        'Timeout opening channel.")', "    return None")
    (project(pytester) / "setup_killer.py").write_text(code)
    result = pytester.runpytest_inprocess("plugins", "--host-image", "alpha", "-rA")
    result.assert_outcomes(passed=1, errors=1)
    assert "RemoteError: [fake] cannot connect to 127.0.0.1:42783: No existing session" in result.stdout.str()
