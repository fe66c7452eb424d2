"""Guest faults: xl's refusal verbatim, a probe that never answers, a crash."""

from __future__ import annotations

import time

import pytest

from harness.guests import GuestCrashed, GuestError, GuestSpec, GuestTimeout, start_guest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def host(e2e_provisioner, artifacts_dir):
    host = e2e_provisioner.host("bookworm", "guest-faults", artifacts_dir / "guest-faults")
    yield host
    host.stop()


def _gone(host, name: str) -> bool:
    return host.xl.domain(name) is None


def test_xl_create_refusal_reaches_the_report_verbatim(host):
    spec = GuestSpec(type="pvh", name="nx-fault-nomem", memory_mb=64 * 1024)
    with pytest.raises(GuestError) as err:
        start_guest(host.xl, spec, timeout=60)
    message = str(err.value)
    assert "xl create of nx-fault-nomem (pvh) was refused" in message
    # xl's own words about memory, not a paraphrase.
    assert "memory" in message.lower() or "libxl" in message, message
    assert _gone(host, spec.name)


def test_probe_that_never_answers_fails_after_its_deadline(host):
    # rdinit=/bin/sh: the kernel starts a shell instead of /init, so no probe runs.
    spec = GuestSpec(type="pv", name="nx-fault-silent", extra_args="rdinit=/bin/sh")
    started = time.monotonic()
    with pytest.raises(GuestTimeout) as err:
        start_guest(host.xl, spec, timeout=25)
    assert time.monotonic() - started < 60
    assert "did not report within 25 s" in str(err.value)
    assert "last console lines" in str(err.value)
    assert _gone(host, spec.name), "a guest that timed out must be destroyed"


def test_crashed_guest_is_detected_not_waited_on(host):
    # init=/bin/false with rdinit unset: PID 1 exits -> kernel panic -> on_crash=preserve.
    spec = GuestSpec(type="pv", name="nx-fault-crash", extra_args="rdinit=/bin/false")
    started = time.monotonic()
    with pytest.raises(GuestCrashed) as err:
        start_guest(host.xl, spec, timeout=240)
    assert time.monotonic() - started < 200
    assert "crashed" in str(err.value) or "gone" in str(err.value)
    assert _gone(host, spec.name)


def test_bad_probe_option_is_reported_as_probe_error(host):
    spec = GuestSpec(type="pv", name="nx-fault-badopt", extra_args="nxprobe.bogus=1")
    with pytest.raises(GuestError, match="probe reported an error"):
        start_guest(host.xl, spec, timeout=120)
    assert _gone(host, spec.name)


def test_guest_gone_between_checks_is_created_again(host, monkeypatch):
    """A module's own guest that died between two checks is replaced in place before the
    next one (Guest.replace_if_dead), and the replacement's pages are what dom0 maps."""
    from harness import incidents
    from harness.agent.client import Agent

    monkeypatch.setattr(incidents, "INCIDENTS", [])
    agent = Agent(host.remote.as_runner())
    guest = start_guest(host.xl, GuestSpec(type="pv", name="nx-fault-revive"), timeout=240)
    try:
        guest.resolve_mfns(agent.p2m)
        old_domid, old_hashes = guest.domid, [p.sha256 for p in guest.pages]
        host.xl.destroy(guest.name)
        assert guest.replace_if_dead(agent.p2m, 240, why="before the next check") is True
        assert guest.domid != old_domid and host.xl.domain(guest.name).domid == guest.domid
        [event] = incidents.INCIDENTS
        assert event.phase == "between-checks" and event.domid == old_domid
        assert "gone from `xl list`, found before the next check" in event.detail
        # The replacement is a new boot of the probe (a new random nonce, so new page
        # contents); Xen may well hand it the same frames the dead domain freed (seen here).
        assert [p.sha256 for p in guest.pages] != old_hashes
        mapped = agent.map_foreign(guest.domid, [p.gfn for p in guest.pages])
        assert mapped.ok and [f.sha256 for f in mapped.frames] == [p.sha256 for p in guest.pages]
        assert guest.replace_if_dead(agent.p2m, 240, why="again") is False
    finally:
        guest.destroy()
    assert _gone(host, guest.name)
