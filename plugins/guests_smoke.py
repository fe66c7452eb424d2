"""Each guest type boots, its probe reports every page it was asked for, `xl list`
shows it running, and it is destroyed cleanly. The probe's page hashes are checked
against an independent Python model of the pattern, and dom0 reads every reported
frame through the agent and sees the bytes the model says the probe wrote there (a
reading independent of the probe's report). Negative controls show a corrupted
report is rejected, and that a model of another nonce is told apart from the
frames' real content."""

from __future__ import annotations

import dataclasses
import hashlib

from harness.plugins import check
from harness.probe_report import expected_page_bytes, parse_probe_log

from .translation import differences


@check()
def test_probe_reported_every_page(guest, record_property):
    report = guest.report
    assert report is not None
    # Independent of the report: the number of pages the guest's command line asked for.
    assert len(guest.pages) == guest.spec.probe_pages > 0, (
        f"the probe reported {len(guest.pages)} pages, nxprobe.pages={guest.spec.probe_pages}")
    assert [p.index for p in guest.pages] == list(range(len(guest.pages)))
    assert len({p.pfn for p in guest.pages}) == len(guest.pages), "two pages share a frame"
    record_property("create_to_probe_ready_s", guest.timings["ready"])


def model_pages(guest, nonce: str | None = None) -> list:
    """The probe pages, each with the SHA-256 the Python model gives for its index and the
    guest's nonce (or ``nonce``), not the probe's own hash."""
    nonce = guest.report.nonce if nonce is None else nonce
    return [dataclasses.replace(p, sha256=hashlib.sha256(expected_page_bytes(nonce, p.index)).hexdigest())
            for p in guest.pages]


def mapped_frames(guest, agent) -> list:
    """dom0's reading of every probe page's frame (gfn; a PV guest's MFN), through the agent."""
    result = agent.map_foreign(guest.domid, [p.gfn for p in guest.pages])
    assert result.ok and not result.crashed and not result.timed_out, result.raw
    return result.frames


@check()
def test_probe_hashes_match_the_pattern(guest):
    for page in guest.pages:
        expected = hashlib.sha256(expected_page_bytes(guest.report.nonce, page.index)).hexdigest()
        assert page.sha256 == expected, f"page {page.index}: probe says {page.sha256}"


@check()
def test_dom0_reads_the_modelled_bytes_at_every_reported_frame(guest, agent):
    bad = differences(model_pages(guest), mapped_frames(guest, agent))
    assert not bad, (f"{guest.type}: {len(bad)} of {len(guest.pages)} reported frames do not hold "
                     "what the model says the probe wrote:\n" + "\n".join(bad))


def assert_other_model_caught(pages, frames) -> None:
    """The control's verdict: every frame mapped (a frame that did not is no evidence that
    the comparison looks at content), and the real comparison reports each as other content."""
    unmapped = [f"frame {r.frame:#x}: error {r.error}" for r in frames if r.error != 0]
    assert not unmapped, "the frames must map, or the control proves nothing:\n" + "\n".join(unmapped)
    bad = differences(pages, frames)
    assert len(bad) == len(pages), (f"only {len(bad)} of {len(pages)} frames were told apart from a "
                                    "model of another nonce")


def other_nonce(nonce: str) -> str:
    return f"{int(nonce, 16) ^ 1:032x}"


@check()
def test_negative_control_model_of_another_nonce_is_caught(guest, agent):
    """The same comparison, fed a fault: the model of a nonce one bit off."""
    wrong = model_pages(guest, other_nonce(guest.report.nonce))
    assert_other_model_caught(wrong, mapped_frames(guest, agent))


def assert_corruption_rejected(text: str, victim: str) -> None:
    """The real parser accepts the console as it is and rejects it with one page hash reversed."""
    assert parse_probe_log(text).report is not None, "the real console must parse"
    corrupted = text.replace(victim, victim[::-1], 1)
    assert corrupted != text, "the page hash is not in the console: nothing was corrupted"
    assert parse_probe_log(corrupted).report is None, "a console with a corrupted page hash was accepted"


@check()
def test_negative_control_corrupted_report_is_rejected(guest):
    assert_corruption_rejected(guest.console(), guest.pages[0].sha256)


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
