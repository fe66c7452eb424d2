"""Xen's own test programs (tools/tests in the Xen tree), run in dom0, one check per program.

Xen installs them with its tools: Debian's xen-utils in ``/usr/lib/xen-<ver>/bin``
(Xen <= 4.19) or ``/usr/lib/xen-<ver>/tests`` (newer), an own build under
``/usr/local/lib/xen/``. Each run is timed and bounded (``timeout`` in dom0 kills the
program's whole process group), its output, exit status and duration become JUnit
properties, domains it left behind are destroyed (the harness's shared ``nx-*`` guests
must keep their domids), and dom0 must answer ``xl list`` afterwards.

Why one generated check per known program: pytest collects before any host boots, so
the cases cannot come from the host. Every program Xen's tools/tests has installed in
some release is one check named after it (test-resource -> ``test_resource``), so
``-k test_resource`` selects it and known_issues.yaml can name it
(``plugins/xen_tools_tests.py::test_tsx``). On a host, the check runs the program
found there and skips, naming the paths it looked for, when this Xen did not install
it. The host decides what runs; the list is a union, never per version.
``test_every_installed_program_is_known`` fails, naming the path, when a host ships a
test program the list lacks, so a new one is added rather than silently ignored.
(``depriv-fd-checker``, also from tools/tests, is no self-contained test: it inspects
a running device model's file descriptors given a domain, so it is not searched for.)
"""

from __future__ import annotations

import contextlib
import re
import shlex
import time
from dataclasses import dataclass, field

import pytest

from harness import dom0_layout as layout
from harness import timeouts as t
from harness.metrics import Record
from harness.plugins import check
from harness.verdict import watch

# program -> timeout in seconds (TCG is 10-50x slower than hardware; test-resource
# took about 10 s, test-xenstore about 5 s here). Names as Xen's Makefiles install them.
KNOWN_PROGRAMS = {
    "test-cpu-policy": 300,
    "test-domid": 120,
    "test-mem-claim": 300,
    "test-numa": 120,
    "test-paging-mempool": 300,
    "test-pdx-mask": 120,
    "test-pdx-offset": 120,
    "test-rangeset": 120,
    "test-resource": 300,
    "test-tsx": 300,
    "test-xenstore": 300,
    "test_vpci": 120,
    "test_x86_emulator": 3600,
}
# Where Xen installs them, in the order looked at ({mm}: the running Xen's major.minor).
# In a */tests directory every executable is a test; in */bin only test-* and test_*.
SEARCH_DIRS = tuple(f"{root}/{sub}" for root in (layout.DEBIAN_XEN_LIB, layout.OWN_XEN_LIB,
                                                  layout.OWN_XEN_LIBEXEC, layout.XEN_LIB, layout.XEN_LIBEXEC)
                    for sub in ("tests", "bin"))
SHARED_PREFIX = "nx-"  # the harness's guests: never destroyed here, domids must not change
KILL_GRACE_S = t.PROGRAM_KILL_GRACE_S
OUTPUT_LIMIT = 6000
XENSTORE_TIMING = re.compile(r"^(?P<name>\S[^:\n]*?)\s*: (?:avg: )?(?P<ns>\d+) ns\b", re.MULTILINE)


def check_name(program: str) -> str:
    """``test-cpu-policy`` -> ``test_cpu_policy``; ``test_vpci`` -> ``test_vpci``."""
    return "test_" + re.sub(r"^test[-_]", "", program).replace("-", "_")


def search_dirs(xen_version: str, dirs: tuple[str, ...] = SEARCH_DIRS) -> list[str]:
    mm = ".".join(xen_version.split(".")[:2])
    return [d.format(mm=mm) for d in dirs]


def discover(remote, dirs: list[str]) -> dict[str, str]:
    """Program name -> path of each test program installed in ``dirs`` (first found wins)."""
    script = ("for d in " + " ".join(shlex.quote(d) for d in dirs) + "; do [ -d \"$d\" ] || continue; "
              "case \"$d\" in */tests) set -- \"$d\"/*;; *) set -- \"$d\"/test-* \"$d\"/test_*;; esac; "
              "for f; do [ -f \"$f\" ] && [ -x \"$f\" ] && echo \"$f\"; done; done; true")
    found: dict[str, str] = {}
    for path in remote.run(script, timeout=t.QUICK_COMMAND_S).stdout.split():
        found.setdefault(path.rsplit("/", 1)[-1], path)
    return found


def unknown_programs(installed: dict[str, str]) -> list[str]:
    return sorted(path for name, path in installed.items() if name not in KNOWN_PROGRAMS)


def stray_programs(remote, dirs: list[str], root: str = layout.USR) -> list[str]:
    """Test programs under a ``*xen*`` directory below ``root`` but outside ``dirs``:
    installed where the plugin does not look."""
    out = remote.run(f"find {shlex.quote(root)} -path '*xen*' -type f -perm -u+x "
                     "\\( -name 'test-*' -o -name 'test_*' \\) 2>/dev/null; true",
                     timeout=t.FIND_PROGRAMS_S).stdout
    return sorted(p for p in out.split() if p.rsplit("/", 1)[0] not in dirs)


@dataclass(frozen=True)
class ProgramRun:
    program: str
    path: str
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timeout_s: float

    @property
    def timed_out(self) -> bool:
        """coreutils timeout exits 124 (SIGTERM worked) or 137 (SIGKILL after the grace)."""
        return self.rc in (124, 137) and self.seconds >= self.timeout_s

    def output(self, limit: int = OUTPUT_LIMIT) -> str:
        out, err = self.stdout.rstrip()[-limit:], self.stderr.rstrip()[-limit:]
        return ((f"--- stdout ---\n{out}\n" if out else "") + (f"--- stderr ---\n{err}\n" if err else "")
                or "(no output)\n")


def run_program(remote, program: str, path: str, timeout_s: float) -> ProgramRun:
    """Run one program in dom0 under ``timeout``, which kills its process group at the deadline."""
    command = f"cd {layout.TMP} && timeout -k {KILL_GRACE_S} {timeout_s} {shlex.quote(path)}"
    result = remote.run(command, timeout=timeout_s + KILL_GRACE_S + t.PROGRAM_MARGIN_S)
    return ProgramRun(program, path, result.rc, result.stdout, result.stderr, round(result.seconds, 2),
                      timeout_s)


@dataclass
class Domains:
    """What became of the domains around one program run."""

    destroyed: list[str] = field(default_factory=list)  # "name (domid)" left by the program
    left: list[str] = field(default_factory=list)  # still listed after xl destroy
    shared_changed: list[str] = field(default_factory=list)  # "nx-shared-pv: domid 3 -> gone"


def clean_up_domains(xl, before: list, settle_s: float = t.DOMAINS_GONE_S) -> Domains:
    """Destroy the domains that appeared since ``before`` (not dom0, not ``nx-*``); report
    shared guests whose domid changed or vanished."""
    known = {d.domid for d in before}
    new = [d for d in xl.list() if d.domid != 0 and d.domid not in known
           and not d.name.startswith(SHARED_PREFIX)]
    report = Domains(destroyed=[f"{d.name} ({d.domid})" for d in new])
    for d in new:
        xl.remote.run(f"xl destroy {d.domid}", timeout=t.XL_DESTROY_S)
    deadline = time.monotonic() + settle_s
    while True:  # a destroyed domain can stay listed, dying, for a moment
        now = xl.list()
        left = [d for d in now if d.domid in {n.domid for n in new}]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(1)
    report.left = [f"{d.name} ({d.domid}, state {d.state})" for d in left]
    ids = {d.name: d.domid for d in now}
    report.shared_changed = [f"{d.name}: domid {d.domid} -> {ids.get(d.name, 'gone')}" for d in before
                             if d.name.startswith(SHARED_PREFIX) and ids.get(d.name) != d.domid]
    return report


@dataclass
class Case:
    run: ProgramRun
    domains: Domains
    dom0_answers: bool


def run_case(remote, xl, program: str, path: str, timeout_s: float, before: list | None = None) -> Case:
    """The whole case: run the program, destroy what it left (also when the run raised),
    check that dom0 still answers. ``before``: the domains just before, if already listed."""
    before = xl.list() if before is None else before
    try:
        run = run_program(remote, program, path, timeout_s)
    except Exception:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            clean_up_domains(xl, before)
        raise
    domains = clean_up_domains(xl, before)
    answers = remote.run("xl list >/dev/null", timeout=t.SMALL_COMMAND_S).rc == 0
    return Case(run, domains, answers)


def problems(case: Case) -> list[str]:
    run = case.run
    found = []
    if run.timed_out:
        found.append(f"{run.program} did not finish within {run.timeout_s:g} s and was killed "
                     f"(timeout exit {run.rc})")
    elif run.rc != 0:
        found.append(f"{run.program} exited {run.rc} after {run.seconds:.1f} s")
    if case.domains.left:
        found.append(f"domains still listed after xl destroy: {', '.join(case.domains.left)}")
    if case.domains.shared_changed:
        found.append(f"{run.program} changed the harness's shared guests: "
                     f"{', '.join(case.domains.shared_changed)}")
    if not case.dom0_answers:
        found.append(f"dom0's `xl list` failed after {run.program}")
    return found


def judge(case: Case) -> None:
    """Raise AssertionError with the program's own output when anything went wrong."""
    found = problems(case)
    assert not found, "; ".join(found) + f" ({case.run.path})\n" + case.run.output()


def xenstore_timings(text: str) -> dict[str, int]:
    """test-xenstore's ``ta rmw    : 21830566 ns`` (or ``avg: N ns (min .. max)``) lines."""
    return {m.group("name").strip(): int(m.group("ns")) for m in XENSTORE_TIMING.finditer(text)}


def measurements(run: ProgramRun, facts, image: str) -> list[Record]:
    """Records for metrics.json from what a program printed (test-xenstore's timings)."""
    if run.program != "test-xenstore" or run.rc != 0:
        return []
    return [Record(kind="xenstore", workload=name, image=image, xen_version=facts.xen_version,
                   kernel_release=facts.kernel_release, dom0_mode=facts.dom0_mode, accel=facts.accel,
                   total_s=ns / 1e9, extra={"ns": ns, "program": run.path})
            for name, ns in xenstore_timings(run.stdout).items()]


def record(case: Case, record_property) -> None:
    run = case.run
    for key, value in (("program", run.path), ("exit_status", run.rc), ("duration_s", run.seconds),
                       ("timed_out", run.timed_out), ("output", run.output(3000)),
                       ("domains_destroyed", ", ".join(case.domains.destroyed))):
        record_property(key, value)


# ---------------------------------------------------------------------- the checks


@pytest.fixture(scope="module")
def installed_programs(xen_host, host_facts) -> tuple[list[str], dict[str, str]]:
    """(directories looked in, program name -> path) on this host."""
    dirs = search_dirs(host_facts.xen_version)
    return dirs, discover(xen_host.remote, dirs)


def run_installed(program: str, installed, request, xen_host, host_facts, image: str, metrics,
                  record_property) -> None:
    dirs, found = installed
    if program not in found:
        looked = ", ".join(f"{d}/{program}" for d in dirs)
        pytest.skip(f"{program} is not installed with Xen {host_facts.xen_version} here; looked for {looked}")
    before = watch_shared_guests(request, xen_host)
    case = run_case(xen_host.remote, xen_host.xl, program, found[program], KNOWN_PROGRAMS[program], before)
    print(f"{case.run.path}: exit {case.run.rc} in {case.run.seconds:.1f} s\n{case.run.output()}")
    record(case, record_property)
    for rec in measurements(case.run, host_facts, image):
        metrics.add(rec)
        record_property(f"xenstore_ns:{rec.workload}", rec.extra["ns"])
    judge(case)


def watch_shared_guests(request, xen_host) -> list:
    """The harness's shared guests run beside the program: one that dies during it is
    judged by the verdict layer as a death in this check (harness/verdict.py), so an
    emulator fault (a triple fault, its signature) is an incident and the check runs
    again, while a guest gone without one fails the check with Xen's and the console's
    word on it. The shared-domid rule below still names the program for either. Only
    the guests alive now are watched (one `xl list`): one that died before the program
    started is not this check's death (the next check that takes it creates it again).
    Returns that `xl list`: the domains before the program (run_case's ``before``)."""
    domains = xen_host.xl.list()
    pool = getattr(xen_host, "guest_pool", None)
    if pool is not None:
        watch(request.node, [g for g in pool.guests.values()
                             if not g.released and not g.death_recorded and g.death(domains) is None])
    return domains


def _program_check(program: str):
    def program_check(request, installed_programs, xen_host, host_facts, host_image_name, metrics,
                      record_property) -> None:
        run_installed(program, installed_programs, request, xen_host, host_facts, host_image_name,
                      metrics, record_property)

    program_check.__name__ = program_check.__qualname__ = check_name(program)
    program_check.__doc__ = f"Xen's {program} (tools/tests) exits 0 in dom0 within its timeout."
    return check()(program_check)


for _program in KNOWN_PROGRAMS:
    globals()[check_name(_program)] = _program_check(_program)


@check()
def test_every_installed_program_is_known(installed_programs, xen_host, record_property):
    dirs, found = installed_programs
    record_property("installed", " ".join(sorted(found.values())))
    stray = stray_programs(xen_host.remote, dirs)
    assert not stray, (f"Xen test programs installed where the plugin does not look: {', '.join(stray)}; "
                       "add their directory to SEARCH_DIRS in plugins/xen_tools_tests.py")
    if not found:
        pytest.skip(f"no Xen test program is installed here; looked in {', '.join(dirs)}")
    unknown = unknown_programs(found)
    assert not unknown, (f"this host ships Xen test programs the plugin does not run: {', '.join(unknown)}; "
                         "add each to KNOWN_PROGRAMS in plugins/xen_tools_tests.py with a timeout")


# ---------------------------------------------------------------------- negative controls
# Real programs in dom0 through the same code path (run_case, judge) as the checks.

NEGATIVE_DIR = layout.TOOLTESTS_DIR


def _script(xen_host, name: str, body: str) -> str:
    path = f"{NEGATIVE_DIR}/{name}"
    xen_host.remote.put_text("#!/bin/sh\n" + body, path, mode=0o755)
    return path


@check()
def test_negative_control_failing_program_fails_with_its_output(xen_host):
    path = _script(xen_host, "nx-exits-3",
                   "echo 'NXNEG: the fault under test'\necho 'NXNEG err' >&2\nexit 3\n")
    case = run_case(xen_host.remote, xen_host.xl, "nx-exits-3", path, 60)
    with pytest.raises(AssertionError) as caught:
        judge(case)
    text = str(caught.value)
    assert "nx-exits-3 exited 3" in text and "NXNEG: the fault under test" in text and "NXNEG err" in text


@check()
def test_negative_control_hung_program_is_killed_at_its_timeout(xen_host):
    path = _script(xen_host, "nx-hangs", "echo 'NXNEG: started'\nsleep 611\necho never\n")
    case = run_case(xen_host.remote, xen_host.xl, "nx-hangs", path, 5)
    with pytest.raises(AssertionError) as caught:
        judge(case)
    text = str(caught.value)
    assert "did not finish within 5 s and was killed" in text and "NXNEG: started" in text, text
    assert "never" not in case.run.stdout
    # [1]: not pgrep's own shell
    left = xen_host.remote.run("pgrep -f 'sleep 61[1]'", timeout=t.QUICK_COMMAND_S)
    assert left.rc == 1, f"the hung program's child survived its timeout: pids {left.stdout.split()}"


@check()
def test_negative_control_created_domain_is_destroyed(request, xen_host):
    """A failing program that leaves a (paused) domain behind: its case destroys it and the
    shared guests keep their domids."""
    before = watch_shared_guests(request, xen_host)
    name = "tooltests-negative-control"
    config = (f'name = "{name}"\ntype = "pv"\nmemory = 256\nvcpus = 1\n'
              f'kernel = "{layout.GUEST_KERNEL}"\nramdisk = "{layout.GUEST_INITRAMFS}"\n')
    xen_host.remote.put_text(config, f"{NEGATIVE_DIR}/{name}.cfg")
    path = _script(xen_host, "nx-leaks-a-domain",
                   f"xl create -p {NEGATIVE_DIR}/{name}.cfg || exit 99\necho 'NXNEG: left {name}'\nexit 1\n")
    shared = {d.name: d.domid for d in before if d.name.startswith(SHARED_PREFIX)}
    case = run_case(xen_host.remote, xen_host.xl, "nx-leaks-a-domain", path, 120, before)
    assert case.run.rc == 1, case.run.output()  # 99: the domain could not be created
    assert [d.split(" ")[0] for d in case.domains.destroyed] == [name], case.domains
    with pytest.raises(AssertionError, match="NXNEG: left"):
        judge(case)
    after = {d.name: d.domid for d in xen_host.xl.list()}
    assert name not in after, f"{name} is still there: {after}"
    assert {n: after.get(n) for n in shared} == shared, f"shared guests changed: {shared} -> {after}"
