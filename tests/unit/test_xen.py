"""Unit tests for harness.xen: `xl` output parsing and the Xl wrapper over a fake Remote."""

from __future__ import annotations

import pytest

from harness.remote import CommandResult
from harness.xen import Domain, XenInfo, Xl, XlError, dmesg_problems, parse_xl_info, parse_xl_list

XL_INFO = """\
host                   : nxdom0
release                : 6.1.0-28-amd64
version                : #1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)
machine                : x86_64
nr_cpus                : 2
max_cpu_id             : 1
nr_nodes               : 1
cores_per_socket       : 1
threads_per_core       : 1
cpu_mhz                : 2994.372
hw_caps                : 178bfbff:f6d8320b:2e500800:244037ff:0000000f:219c01ab:0040069c:00000000
virt_caps              : pv hvm hap shadow gnttab-v1 gnttab-v2
total_memory           : 3071
free_memory            : 1958
sharing_freed_memory   : 0
sharing_used_memory    : 0
outstanding_claims     : 0
free_cpus              : 0
xen_major              : 4
xen_minor              : 17
xen_extra              : .5
xen_version            : 4.17.5
xen_caps               : xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64
xen_scheduler          : credit2
xen_pagesize           : 4096
platform_params        : virt_start=0xffff800000000000
xen_changeset          :
xen_commandline        : placeholder console=com1 com1=115200,8n1 noreboot loglvl=all
                         guest_loglvl=all dom0_mem=1024M,max:1024M
cc_compiler            : x86_64-linux-gnu-gcc (Debian 12.2.0-14) 12.2.0
cc_compile_by          : pkg-xen-devel
cc_compile_domain      : lists.alioth.debian.org
cc_compile_date        : Mon Dec  2 10:00:00 UTC 2024
build_id               : 0c0c1b0f2d2a6a9b3b5f7c6c2a9d4e0f1a2b3c4d
xend_config_format     : 4
"""

XL_LIST = """\
Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  1024     2     r-----      25.3
nx-guest-hvm                                 3   256     1     --p-c-       0.4
nx-guest-pv                                  5   128     1     -b----       1.2
(null)                                       4     0     0     --ps-d       0.0
"""


# ------------------------------------------------------------------ xl info


def test_parse_xl_info() -> None:
    info = parse_xl_info(XL_INFO)
    assert info.xen_version == "4.17.5"
    assert info.virt_caps == frozenset({"pv", "hvm", "hap", "shadow", "gnttab-v1", "gnttab-v2"})
    assert "hvm-3.0-x86_64" in info.xen_caps
    assert info.free_memory_mb == 1958 and info.total_memory_mb == 3071
    assert info.dom0_kernel == "6.1.0-28-amd64"
    # Values may contain colons; only the first one splits.
    assert info.raw["hw_caps"].startswith("178bfbff:f6d8320b:")
    assert info.raw["cc_compile_date"] == "Mon Dec  2 10:00:00 UTC 2024"
    assert info.raw["xen_changeset"] == ""


def test_parse_xl_info_continuation_line() -> None:
    info = parse_xl_info(XL_INFO)
    assert info.raw["xen_commandline"] == (
        "placeholder console=com1 com1=115200,8n1 noreboot loglvl=all "
        "guest_loglvl=all dom0_mem=1024M,max:1024M"
    )
    # The continuation did not become a key of its own.
    assert not any(k.startswith("guest_loglvl") for k in info.raw)
    assert info.raw["cc_compiler"].startswith("x86_64-linux-gnu-gcc")


@pytest.mark.parametrize(
    ("major", "minor", "extra", "version"),
    [("4", "17", ".5", "4.17.5"), ("4", "21", "-unstable", "4.21"), ("4", "19", ".0-pre", "4.19.0"),
     ("4", "20", "", "4.20")],
)
def test_xen_version_from_parts(major: str, minor: str, extra: str, version: str) -> None:
    info = XenInfo({"xen_major": major, "xen_minor": minor, "xen_extra": extra})
    assert info.xen_version == version


def test_empty_info() -> None:
    info = parse_xl_info("")
    assert info.xen_version == "0.0" and info.virt_caps == frozenset() and info.free_memory_mb == 0


# ------------------------------------------------------------------ xl list


def test_parse_xl_list() -> None:
    domains = parse_xl_list(XL_LIST)
    assert [d.name for d in domains] == ["Domain-0", "nx-guest-hvm", "nx-guest-pv", "(null)"]
    dom0, hvm, pv, dying = domains
    assert dom0 == Domain("Domain-0", 0, 1024, 2, "r-----")
    assert dom0.running and not dom0.crashed and not dom0.dying
    assert hvm.domid == 3 and hvm.memory_mb == 256 and hvm.state == "--p-c-"
    assert hvm.crashed and not hvm.running
    assert pv.running and not pv.crashed  # blocked counts as running
    assert dying.dying and not dying.running


@pytest.mark.parametrize(("state", "running"), [
    ("r-----", True), ("-b----", True),
    ("------", True),  # runnable, waiting for a CPU (a restored guest on a busy host)
    ("--p---", False), ("---s--", False), ("----c-", False), ("-----d", False),
])
def test_running_means_alive_and_unpaused(state: str, running: bool) -> None:
    assert Domain("g", 5, 256, 1, state).running is running


def test_parse_xl_list_ignores_noise() -> None:
    text = XL_LIST + "libxl: warning: something odd\n\n"
    assert len(parse_xl_list(text)) == 4
    assert parse_xl_list("Name ID Mem VCPUs State Time(s)\n") == []


# ------------------------------------------------------------------ dmesg


def test_dmesg_problems() -> None:
    text = """\
(XEN) Xen version 4.17.5 (Debian 4.17.5+20-g4e8a3d6b7a-1) (pkg-xen-devel@lists.alioth.debian.org)
(XEN) HVM: Hardware Assisted Paging (HAP) detected
(XEN) Brought up 2 CPUs
(XEN) d1v0 debug: BUG_ON not hit; DEBUG build
(XEN) Xen WARN at p2m-pt.c:565
(XEN) ****************************************
(XEN) Panic on CPU 0:
(XEN) Xen BUG at page_alloc.c:1421
(XEN) Assertion 'p2m_is_ram(t)' failed at arch/x86/mm/p2m.c:123
(XEN) Freed 656kB init memory
"""
    assert dmesg_problems(text) == [
        "(XEN) Xen WARN at p2m-pt.c:565",
        "(XEN) Panic on CPU 0:",
        "(XEN) Xen BUG at page_alloc.c:1421",
        "(XEN) Assertion 'p2m_is_ram(t)' failed at arch/x86/mm/p2m.c:123",
    ]


def test_dmesg_clean() -> None:
    assert dmesg_problems("(XEN) Brought up 2 CPUs\n(XEN) Scheduling granularity: cpu\n") == []


# ------------------------------------------------------------------ Xl over a fake Remote


class FakeRemote:
    """Answers commands from a table; records what was run and with which timeout."""

    def __init__(self, answers: dict[str, tuple[int, str, str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, float | None]] = []

    def run(self, command: str, timeout: float | None = None, **_: object) -> CommandResult:
        self.calls.append((command, timeout))
        rc, out, err = self.answers.get(command, (127, "", f"sh: unexpected command {command}"))
        return CommandResult(command, rc, out, err, "dom0", 0.01)


CREATE_ERR = """\
Parsing config from /etc/xen/nx guest.cfg
libxl: error: libxl_create.c:1231:do_domain_create: Domain 7:cannot make domain: -3
libxl: error: libxl_domain.c:1183:libxl__destroy_domid: Domain 7:Non-existant domain
"""


def test_xl_create_failure_carries_stderr_verbatim() -> None:
    remote = FakeRemote({"xl create '/etc/xen/nx guest.cfg'": (3, "", CREATE_ERR)})
    xl = Xl(remote)  # type: ignore[arg-type]
    with pytest.raises(XlError) as info:
        xl.create("/etc/xen/nx guest.cfg", timeout=42)
    assert CREATE_ERR.strip() in str(info.value)
    assert "`xl create '/etc/xen/nx guest.cfg'` failed (exit 3)" in str(info.value)
    assert info.value.result.rc == 3
    assert remote.calls == [("xl create '/etc/xen/nx guest.cfg'", 42)]


def test_xl_error_falls_back_to_stdout() -> None:
    remote = FakeRemote({"xl destroy g": (1, "only on stdout\n", "")})
    with pytest.raises(XlError, match="only on stdout"):
        Xl(remote).destroy("g")  # type: ignore[arg-type]


def test_xl_create_success_returns_result() -> None:
    remote = FakeRemote({"xl create /etc/xen/g.cfg": (0, "", "Parsing config from /etc/xen/g.cfg\n")})
    result = Xl(remote).create("/etc/xen/g.cfg")  # type: ignore[arg-type]
    assert result.rc == 0 and "Parsing config" in result.stderr
    assert remote.calls == [("xl create /etc/xen/g.cfg", 300.0)]


def test_xl_info_list_domain_domid() -> None:
    remote = FakeRemote({
        "xl info": (0, XL_INFO, ""),
        "xl list": (0, XL_LIST, ""),
        "xl domid nx-guest-pv": (0, "5\n", ""),
        "xl dmesg -c": (0, "(XEN) Panic on CPU 1:\n", ""),
    })
    xl = Xl(remote)  # type: ignore[arg-type]
    assert xl.info().xen_version == "4.17.5"
    assert [d.domid for d in xl.list()] == [0, 3, 5, 4]
    guest = xl.domain("nx-guest-hvm")
    assert guest is not None and guest.crashed
    assert xl.domain("nope") is None
    assert xl.domid("nx-guest-pv") == 5
    assert dmesg_problems(xl.dmesg(clear=True)) == ["(XEN) Panic on CPU 1:"]


def test_xl_save_restore_quote_paths() -> None:
    remote = FakeRemote({
        "xl -vvv save g '/var/lib/nx/g save'": (0, "", ""),
        "xl -vvv restore '/var/lib/nx/g save'": (0, "", ""),
    })
    xl = Xl(remote)  # type: ignore[arg-type]
    xl.save("g", "/var/lib/nx/g save", timeout=5)
    xl.restore("/var/lib/nx/g save", timeout=6)
    assert remote.calls == [("xl -vvv save g '/var/lib/nx/g save'", 5),
                            ("xl -vvv restore '/var/lib/nx/g save'", 6)]


def test_xl_debug_keys_failure() -> None:
    remote = FakeRemote({})
    with pytest.raises(XlError, match="unexpected command xl debug-keys q"):
        Xl(remote).debug_keys("q")  # type: ignore[arg-type]


class SequenceRemote(FakeRemote):
    """`xl list` answers from a list, one per call (the domains before and after)."""

    def __init__(self, answers, lists: list[str]) -> None:
        super().__init__(answers)
        self.lists = lists

    def run(self, command, timeout=None, **_):
        if command == "xl list":
            self.calls.append((command, timeout))
            return CommandResult(command, 0, self.lists.pop(0), "", "dom0", 0.01)
        return super().run(command, timeout)


ONLY_DOM0 = XL_LIST.splitlines()[0] + "\n" + XL_LIST.splitlines()[1] + "\n"


def test_destroy_all_guests_destroys_them_at_once() -> None:
    """By domid, in parallel; a domain already dying ("(null)", d4) is left to finish."""
    parallel = "xl destroy 3 & xl destroy 5 & wait"
    remote = SequenceRemote({parallel: (0, "", "")}, [XL_LIST, ONLY_DOM0])
    xl = Xl(remote)  # type: ignore[arg-type]
    assert xl.destroy_all_guests(timeout=7) == ["nx-guest-hvm", "nx-guest-pv"]
    assert remote.calls[1] == (parallel, 7)


def test_destroy_all_guests_names_the_survivors() -> None:
    parallel = "xl destroy 3 & xl destroy 5 & wait"
    remote = SequenceRemote({parallel: (0, "", "libxl: error: hvm device model\n")}, [XL_LIST, XL_LIST])
    with pytest.raises(XlError, match="still there after xl destroy: nx-guest-hvm, nx-guest-pv"):
        Xl(remote).destroy_all_guests()  # type: ignore[arg-type]


def test_destroy_all_guests_with_none_runs_nothing() -> None:
    remote = SequenceRemote({}, [ONLY_DOM0])
    assert Xl(remote).destroy_all_guests() == []  # type: ignore[arg-type]
    assert remote.calls == [("xl list", None)]


def test_guests_paused_pauses_running_guests_and_unpauses_them_even_on_error() -> None:
    """Only running guests (not the crashed or dying ones) are paused, and unpaused after."""
    remote = FakeRemote({"xl list": (0, XL_LIST, ""), "xl pause nx-guest-pv": (0, "", ""),
                         "xl unpause nx-guest-pv": (0, "", "")})
    xl = Xl(remote)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="boom"), xl.guests_paused() as paused:
        assert paused == ["nx-guest-pv"]
        assert remote.calls[-1][0] == "xl pause nx-guest-pv"
        raise RuntimeError("boom")
    assert remote.calls[-1][0] == "xl unpause nx-guest-pv"
