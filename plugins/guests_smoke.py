"""Each guest type boots, its probe reports every page, `xl list` shows it
running, and it is destroyed cleanly. The probe's page hashes are checked
against an independent Python model of the pattern, and a negative control
shows a corrupted report is rejected."""

from __future__ import annotations

import hashlib

from harness.plugins import check
from harness.probe_report import expected_page_bytes, parse_probe_log


@check()
def test_probe_reported_every_page(guest, record_property):
    report = guest.report
    assert report is not None
    assert len(guest.pages) == len(report.pages) > 0
    assert [p.index for p in guest.pages] == list(range(len(guest.pages)))
    assert len({p.pfn for p in guest.pages}) == len(guest.pages), "two pages share a frame"
    record_property("create_to_probe_ready_s", guest.timings["ready"])


@check()
def test_probe_hashes_match_the_pattern(guest):
    for page in guest.pages:
        expected = hashlib.sha256(expected_page_bytes(guest.report.nonce, page.index)).hexdigest()
        assert page.sha256 == expected, f"page {page.index}: probe says {page.sha256}"


@check()
def test_negative_control_corrupted_report_is_rejected(guest):
    text = guest.console()
    victim = guest.pages[0].sha256
    corrupted = text.replace(victim, victim[::-1], 1)
    assert parse_probe_log(text).report is not None
    assert parse_probe_log(corrupted).report is None


@check(guests=["pv"])
def test_pv_frames_resolved_to_mfns(guest):
    assert all(p.mfn is not None for p in guest.pages)
    assert len({p.mfn for p in guest.pages}) == len(guest.pages)


@check()
def test_xl_list_shows_it_running(guest, xl):
    dom = xl.domain(guest.name)
    assert dom is not None and dom.domid == guest.domid
    assert dom.running and not dom.crashed, dom


@check()
def test_own_guest_boots_and_is_destroyed_cleanly(own_guest, xl):
    assert own_guest.report is not None
    own_guest.destroy()
    assert xl.domain(own_guest.name) is None
