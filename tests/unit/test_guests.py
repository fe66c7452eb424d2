"""GuestSpec -> xl config rendering, and Guest lifecycle against a fake xl/SSH boundary."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness import incidents
from harness.guests import Guest, GuestCrashed, GuestError, GuestSpec, GuestTimeout, died_in_early_boot
from harness.probe_report import format_probe_line, page_digest
from harness.remote import CommandResult


@pytest.fixture(autouse=True)
def _no_incidents():
    incidents.clear()
    yield
    incidents.clear()


def parse(cfg: str) -> dict[str, str]:
    return {k.strip(): v.strip().strip('"') for k, _, v in (line.partition("=") for line in cfg.splitlines())}


@pytest.mark.parametrize("kind", ["pv", "pvh", "hvm"])
def test_xl_config_has_type_memory_kernel_and_probe_args(kind):
    spec = GuestSpec(type=kind, name=f"g-{kind}", memory_mb=512, vcpus=2, probe_pages=8, tick_ms=20)
    cfg = parse(spec.xl_config())
    assert cfg["type"] == kind and cfg["memory"] == "512" and cfg["maxmem"] == "512"
    assert cfg["vcpus"] == "2" and cfg["on_crash"] == "preserve"
    assert cfg["kernel"].endswith("/guest/vmlinuz") and cfg["ramdisk"].endswith("/guest/initramfs.gz")
    assert "nxprobe.pages=8" in cfg["cmdline"] and "nxprobe.tick_ms=20" in cfg["cmdline"]
    assert "panic=-1" in cfg["cmdline"]


def test_hvm_console_is_a_serial_file_and_pv_uses_hvc0():
    hvm = GuestSpec(type="hvm", name="h")
    cfg = parse(hvm.xl_config())
    assert cfg["serial"] == f"file:{hvm.console_log}" and "console=ttyS0" in cfg["cmdline"]
    assert cfg["vga"] == "none"
    pv = GuestSpec(type="pv", name="p")
    assert "console=hvc0" in pv.cmdline() and "serial" not in parse(pv.xl_config())
    assert pv.console_log.endswith("guest-p.log")


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="pv, pvh or hvm"):
        GuestSpec(type="kvm", name="x")


class FakeRemote:
    def __init__(self, console: str = "", domains: str = "") -> None:
        self.console, self.domains = console, domains

    def run(self, cmd: str, timeout: float | None = None, **_: object) -> CommandResult:
        out = self.console if cmd.startswith("cat ") else ""
        return CommandResult(cmd, 0, out, "", "dom0", 0.0)


class FakeXl:
    def __init__(self, remote: FakeRemote, domain=None, dmesg: str = "") -> None:
        self.remote, self._domain, self._dmesg = remote, domain, dmesg

    def domain(self, name):
        return self._domain

    def list(self):
        return [self._domain] if self._domain is not None else []

    def dmesg(self):
        return self._dmesg

    def unpause(self, domid):
        pass


def report_text(pages: int = 2) -> str:
    from harness.probe_report import ProbePage

    nonce = "ab" * 16
    lines = [format_probe_line({"ev": "hello", "v": 1, "nonce": nonce, "pages": pages,
                                "page_size": 4096, "tick_ms": 0})]
    plist = [ProbePage(i, 100 + i, f"{i:064x}") for i in range(pages)]
    lines += [format_probe_line({"ev": "page", "i": p.index, "pfn": p.pfn, "sha256": p.sha256})
              for p in plist]
    lines.append(format_probe_line({"ev": "ready", "pages": pages, "digest": page_digest(plist)}))
    return "kernel noise\n" + "\n".join(lines) + "\n"


def running():
    from harness.xen import Domain

    return Domain("g", 5, 256, 1, "-b----")


def test_wait_ready_parses_the_report():
    guest = Guest(GuestSpec(type="pvh", name="g"), FakeXl(FakeRemote(report_text()), running()))
    report = guest.wait_ready(timeout=5)
    assert [p.pfn for p in guest.pages] == [100, 101] and report.nonce == "ab" * 16


def test_vanished_guest_fails_fast_with_console_and_xen_lines():
    triple = "(XEN) d7v0 Triple fault - invoking HVM shutdown action 1\n"
    xl = FakeXl(FakeRemote("booting...\n"), None, dmesg=triple)
    guest = Guest(GuestSpec(type="pvh", name="g"), xl, domid=7)
    with pytest.raises(GuestCrashed) as err:
        guest.wait_ready(timeout=30)
    assert "gone from `xl list`" in str(err.value) and "booting..." in str(err.value)
    assert "Triple fault" in str(err.value)
    assert died_in_early_boot(err.value)


def test_another_domains_triple_fault_does_not_count():
    """Issue 16: a vanished guest without lines of its own was taken for an early-boot
    death on another domain's triple fault. Only d7's own lines are its evidence."""
    other = "(XEN) d3v0 Triple fault - invoking HVM shutdown action 1\n(XEN) d17v0 Triple fault\n"
    xl = FakeXl(FakeRemote("booting...\n"), None, dmesg=other)
    guest = Guest(GuestSpec(type="pvh", name="g"), xl, domid=7)
    with pytest.raises(GuestCrashed) as err:
        guest.wait_ready(timeout=30)
    assert "Triple fault" not in str(err.value) and "no line about d7" in str(err.value)
    assert err.value.evidence["dmesg"] == ""
    assert not died_in_early_boot(err.value)
    assert incidents.domain_lines(other + "(XEN) d7v1 Triple fault\n", 7) == ["(XEN) d7v1 Triple fault"]
    others = "(XEN) Dom7 ready\n(XEN) d77v0 x\n(XEN) Dom71 y\n"
    assert incidents.domain_lines(others, 7) == ["(XEN) Dom7 ready"]


def test_probe_error_line_is_reported():
    text = format_probe_line({"ev": "error", "msg": "mlock failed"}) + "\n"
    guest = Guest(GuestSpec(type="pv", name="g"), FakeXl(FakeRemote(text), running()))
    with pytest.raises(GuestError, match="mlock failed"):
        guest.wait_ready(timeout=5)


def test_silent_guest_times_out_with_the_console_tail():
    guest = Guest(GuestSpec(type="pv", name="g"), FakeXl(FakeRemote("only this\n"), running()))
    with pytest.raises(GuestTimeout, match="only this"):
        guest.wait_ready(timeout=0.01)


class CreatingRemote(FakeRemote):
    def put_text(self, text, path, mode=None):
        self.config = text

    def run_expect(self, cmd, codes=(0,), **_):
        return self.run(cmd)


class CreatingXl(FakeXl):
    """The first ``failures`` guests vanish (before printing anything, with
    ``first_console`` empty); the next one boots."""

    def __init__(self, first_console: str, failures: int = 1) -> None:
        super().__init__(CreatingRemote(first_console), None)
        self.created, self.failures = 0, failures

    def create(self, path, paused=False):
        assert paused, "guests are created paused, so their domid is known first"
        self.created += 1
        if self.created > self.failures:
            self.remote.console, self._domain = report_text(), running()

    def domid(self, name):
        return 5

    def destroy(self, name):
        pass


TRIPLE = "(XEN) d5v0 Triple fault - invoking HVM shutdown action 1\n"


@pytest.fixture
def classified(tmp_path):
    """The pytest plugin's classifier (harness/pytest_plugin.py _classify) with one TCG
    guest-death entry: a death is an emulator fault only on its own domain's lines."""
    from harness.known_issues import emulator_fault, load_known_issues

    (tmp_path / "k.yaml").write_text("- check: guest-death\n  signature: 'd\\d+v\\d+ Triple fault'\n"
                                     "  evidence: [dmesg]\n  accel: [tcg]\n  reason: TCG nested SVM\n")
    issues = load_known_issues(tmp_path / "k.yaml")
    facts = SimpleNamespace(xen_version="4.17.5", kernel_release="6.1.0", dom0_mode="pv", accel="tcg")

    def classify(incident):
        incident.accel = facts.accel
        fault = emulator_fault(issues, incident.guest_type, facts, incident.evidence)
        return fault.label() if fault is not None else None

    incidents.set_classifier(classify)
    yield facts
    incidents.set_classifier(None)


def test_early_boot_death_is_retried_once_and_recorded(classified):
    from harness import guests

    xl = CreatingXl(first_console="")
    xl._dmesg = TRIPLE
    guest = guests.start_guest(xl, GuestSpec(type="pvh", name="g"), timeout=5)
    assert xl.created == 2 and guest.report is not None
    [incident] = incidents.INCIDENTS
    assert (incident.guest_type, incident.phase, incident.action) == ("pvh", "early-boot", "recreated")


def test_an_early_boot_death_without_a_signature_is_not_retried(classified):
    """Route 5 of issue 26: a guest that dies silently at boot (no triple fault of its own
    domid) is a failure at once; so is one with the signature under KVM."""
    from harness import guests

    xl = CreatingXl(first_console="")
    with pytest.raises(GuestCrashed):
        guests.start_guest(xl, GuestSpec(type="pvh", name="g"), timeout=5)
    assert xl.created == 1 and [i.action for i in incidents.INCIDENTS] == ["failed"]
    incidents.clear()
    classified.accel = "kvm"
    xl = CreatingXl(first_console="")
    xl._dmesg = TRIPLE
    with pytest.raises(GuestCrashed):
        guests.start_guest(xl, GuestSpec(type="pvh", name="g"), timeout=5)
    assert xl.created == 1 and [i.action for i in incidents.INCIDENTS] == ["failed"]


def test_a_guest_that_printed_something_is_not_retried(monkeypatch):
    from harness import guests

    xl = CreatingXl(first_console="Linux version 6.1\n")
    with pytest.raises(GuestCrashed):
        guests.start_guest(xl, GuestSpec(type="pvh", name="g"), timeout=5)
    assert xl.created == 1 and incidents.INCIDENTS == []


def test_shared_guest_is_created_again_until_it_boots(classified):
    """A shared guest (every check of its type reads it) died in early boot twice in a
    row here: the pool creates it again up to SHARED_EARLY_CRASH_RETRIES times."""
    from harness import guests

    xl = CreatingXl(first_console="", failures=guests.SHARED_EARLY_CRASH_RETRIES)
    xl._dmesg = TRIPLE
    pool = guests.GuestPool(xl, lambda domid, pfns: {}, timeout=5)
    pool.adopt_or_create(("pvh",))
    assert xl.created == guests.SHARED_EARLY_CRASH_RETRIES + 1
    assert pool.guests["pvh"].report is not None
    assert len(incidents.INCIDENTS) == guests.SHARED_EARLY_CRASH_RETRIES
    incidents.clear()

    # One more early death than that is not an endless loop, and not the host's end:
    # the pool comes up without it (each death an incident, the last one "failed"), so
    # checks that need no guest run; a check that asks for it gets it created again.
    xl = CreatingXl(first_console="", failures=guests.SHARED_EARLY_CRASH_RETRIES + 1)
    xl._dmesg = TRIPLE
    pool = guests.GuestPool(xl, lambda domid, pfns: {}, timeout=5)
    pool.adopt_or_create(("pvh",))
    assert "pvh" not in pool.guests and xl.created == guests.SHARED_EARLY_CRASH_RETRIES + 1
    assert [i.action for i in incidents.INCIDENTS][-1] == "failed"
    assert pool.get("pvh").report is not None and xl.created == guests.SHARED_EARLY_CRASH_RETRIES + 2


def test_a_shared_guest_that_crashes_after_printing_still_fails_the_host(monkeypatch):
    """Negative control: only early-boot deaths (silent, or its own triple fault) are
    left behind; a guest that printed and then crashed is an error, as before."""
    from harness import guests

    xl = CreatingXl(first_console="Linux version 6.12\n", failures=1)
    with pytest.raises(GuestCrashed):
        guests.GuestPool(xl, lambda domid, pfns: {}, timeout=5).adopt_or_create(("pvh",))


class VanishingXl(CreatingXl):
    """The first guest is gone before `xl domid` can find it (it died at once)."""

    def domid(self, name):
        from harness.xen import XlError

        if self.created <= self.failures:
            raise XlError(CommandResult(f"xl domid {name}", 1, "", "Can't get domid", "dom0", 0.0))
        return 5


def test_guest_gone_before_xl_domid_is_an_early_death_not_retried(classified):
    """Seen in a CI pre-check: a PVH guest died between `xl create` and `xl domid`. It is
    an incident (phase create), but with no domid there is no evidence of its own (no
    `xl dmesg` line can be tied to it), so no signature matches and it is not created
    again: a death nobody can explain fails (issue 26, route 5)."""
    from harness import guests

    xl = VanishingXl(first_console="")
    xl._dmesg = TRIPLE  # another domain's line is never evidence
    with pytest.raises(GuestCrashed):
        guests.start_guest(xl, GuestSpec(type="pvh", name="g"), timeout=5)
    assert xl.created == 1 and "right after `xl create -p`" in incidents.INCIDENTS[0].detail
    assert (incidents.INCIDENTS[0].phase, incidents.INCIDENTS[0].action) == ("create", "failed")


def test_guest_found_dead_between_checks_is_recorded_and_created_again(monkeypatch):
    """Seen in CI: the migration module's PVH guest was gone when its next check began.
    The check gets a live guest (same object, new domid and pages); the death is recorded."""

    xl = CreatingXl(first_console="", failures=0)
    xl._domain = None  # the old domain is gone
    triple = "(XEN) d3v0 Triple fault - invoking HVM shutdown action 1\n"
    xl._dmesg = triple
    old = Guest(GuestSpec(type="pvh", name="g"), xl, domid=3)
    assert old.replace_if_dead(lambda domid, pfns: {}, timeout=5, why="before test_x") is True
    assert xl.created == 1 and old.domid == 5 and [p.pfn for p in old.pages] == [100, 101]
    [event] = incidents.INCIDENTS
    assert event.phase == "between-checks" and "before test_x" in event.detail
    assert "d3v0 Triple fault" in event.evidence["dmesg"] and event.domid == 3

    # a live guest is left alone
    assert old.replace_if_dead(lambda domid, pfns: {}, timeout=5, why="before test_y") is False
    assert xl.created == 1 and len(incidents.INCIDENTS) == 1


def test_a_crashed_guest_is_destroyed_before_it_is_created_again(monkeypatch):
    from harness.xen import Domain

    xl = CreatingXl(first_console="", failures=0)
    xl._domain = Domain("g", 3, 256, 1, "-----c")
    destroyed = []
    xl.destroy = destroyed.append
    guest = Guest(GuestSpec(type="pv", name="g"), xl, domid=3)
    assert guest.replace_if_dead(lambda domid, pfns: {p: p + 1000 for p in pfns}, timeout=5, why="w")
    assert destroyed == ["g"] and guest.pages[0].mfn == 1100
    assert "crashed" in incidents.INCIDENTS[0].detail


class StallingRemote(FakeRemote):
    """dom0's sshd too slow to open a channel for the first ``stalls`` commands."""

    def __init__(self, console: str, stalls: int) -> None:
        super().__init__(console)
        self.stalls = stalls

    def run(self, cmd: str, timeout: float | None = None, **kwargs: object) -> CommandResult:
        from harness.remote import RemoteError

        if self.stalls > 0:
            self.stalls -= 1
            raise RemoteError("[dom0] transport failed during `cat`: Timeout opening channel.")
        return super().run(cmd, timeout, **kwargs)


def test_a_slow_dom0_while_a_guest_boots_is_waited_on(monkeypatch: pytest.MonkeyPatch):
    """CI, stop 23: one channel-open timeout while an HVM guest booted errored the check.
    Within the guest's deadline the wait goes on; past it, the transport error stands."""
    import harness.guests

    monkeypatch.setattr(harness.guests.time, "sleep", lambda s: None)
    slow = Guest(GuestSpec(type="hvm", name="g"), FakeXl(StallingRemote(report_text(), 2), running()))
    assert slow.wait_ready(timeout=30).nonce == "ab" * 16
    from harness.remote import RemoteError

    dead = Guest(GuestSpec(type="hvm", name="g"), FakeXl(StallingRemote(report_text(), 10**9), running()))
    with pytest.raises(RemoteError, match="Timeout opening channel"):
        dead.wait_ready(timeout=0.05)
