"""Migration across Xen versions (issue 29): the judgement of one migration, each branch
(harness/cross_version.py judge, pure), the run config's pairs, and the record's labels.

The toolstack texts are xl -vvv's lines as plugins/migration.py's logs keep them
(``<dom0 epoch> <line>``), captured from real runs and kept in tests/unit/data/cross_version/
(each file's ``#`` header says which run, which lines, what was dropped). A branch no real
run has produced uses a line put together by hand, marked "assembled" where it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cross_version as cv
from harness.config import ConfigError, load_run_config
from harness.cross_version import FAILED, MIGRATED, REFUSED, Observed, judge, toolstack_words
from harness.metrics import Record, describe
from harness.report import compare, summary_rows
from harness.xen import Domain
from harness.xen_compat import BACKWARD_RULE, FORWARD_RULE

GUEST = "nx-xv-pv"
DATA = Path(__file__).parent / "data" / "cross_version"


def captured(name: str) -> str:
    """A captured log without its ``#`` provenance header."""
    lines = (DATA / name).read_text().splitlines()
    return "".join(line + "\n" for line in lines if not line.startswith("#"))


# captured 2026-12-07, 4.17.5 -> 4.17.5 two hosts, pv: migrated (the cross-version pv forward
# run that migrated intact lost its log to the negative control's, which has the same name)
SUCCESS = captured("success-pv-same-version.log")
# captured 2026-12-08, 4.17.5 -> 4.22.0, pv forward, negative control: stream truncated at 1 MiB
TRUNCATED = captured("pv-forward-truncated-stream.log")
# captured 2026-12-08, 4.17.5 -> 4.22.0, pvh forward: the source guest triple-faulted at suspend
PVH_FORWARD = captured("pvh-forward-suspend-triple-fault.log")
# captured 2026-12-08, 4.22.0 -> 4.17.5, pvh backward: refused by the 4.17 receiver; the sender's
# xl migrate log (what judge() was given) and the receiver's own log
REFUSED_HVM_CONTEXT = captured("pvh-backward-refused.log")
REFUSED_RECEIVER = captured("pvh-backward-receiver.log")


def dom(domid: int, state: str = "-b----", name: str = GUEST) -> Domain:
    return Domain(name, domid, 256, 1, state)


DOM0 = Domain("Domain-0", 0, 1024, 2, "r-----")


def observed(**changes) -> Observed:
    base = dict(guest=GUEST, source_domid=5, rc=0, log=SUCCESS, source_after=[DOM0],
                destination_after=[DOM0, dom(9)], corrupted=[], dirty_ok=True)
    return Observed(**{**base, **changes})


def refused(**changes) -> Observed:
    return observed(**{"rc": 1, "log": REFUSED_HVM_CONTEXT, "source_after": [DOM0, dom(5)],
                       "destination_after": [DOM0], **changes})


def test_forward_intact_passes_as_migrated() -> None:
    j = judge(observed(), FORWARD_RULE)
    assert j.passed and j.outcome == MIGRATED and j.reasons == ()


def test_forward_refused_fails_citing_the_rule_with_the_toolstacks_words() -> None:
    j = judge(refused(log=TRUNCATED), FORWARD_RULE)
    assert not j.passed and j.outcome == FAILED
    message = j.message()
    assert "where Xen documents it as supported" in message
    assert "xen.git RELEASE-4.22.0:docs/specs/libxc-migration-stream.pandoc:100-104" in message
    assert ("xc: error: Failed to read 4202504 bytes of data for record (0x00000001, Page data)"
            in j.words)
    assert "1796690480" not in j.words  # the toolstack's words, without dom0's timestamps


def test_forward_with_the_source_guest_dead_at_suspend_fails_with_both_reasons() -> None:
    j = judge(refused(log=PVH_FORWARD, source_after=[DOM0]), FORWARD_RULE)
    assert not j.passed and j.outcome == FAILED
    assert j.reasons == ("the forward migration was refused (exit status 1), where Xen documents it "
                         "as supported", "the source guest d5 is gone from the source")
    assert "Domain 5:guest didn't acknowledge suspend, cancelling request" in j.words


@pytest.mark.parametrize("log", [REFUSED_HVM_CONTEXT, REFUSED_RECEIVER], ids=["xl-migrate", "receiver"])
def test_backward_refused_cleanly_passes_labelled_so(log: str) -> None:
    j = judge(refused(log=log), BACKWARD_RULE)
    assert j.passed and j.outcome == REFUSED, j.message()
    assert "xc: error: Unable to restore HVM context (22 = Invalid argument): Internal error" in j.words


def test_backward_refused_with_a_half_created_domain_fails() -> None:
    j = judge(refused(destination_after=[DOM0, dom(11, "--p---")]), BACKWARD_RULE)
    assert not j.passed and "left d11 nx-xv-pv (state --p---) half-created on the destination" in j.message()


@pytest.mark.parametrize("source_after, says", [
    ([DOM0], "the source guest d5 is gone from the source"),
    ([DOM0, dom(6)], "the source guest changed: was d5, now d6"),
    ([DOM0, dom(5, "--p---")], "the source guest d5 is not running (state --p---)"),
    ([DOM0, dom(5, "----c-")], "the source guest d5 is not running (state ----c-)"),
])
def test_backward_refused_with_the_source_guest_gone_or_changed_fails(source_after, says) -> None:
    j = judge(refused(source_after=source_after, corrupted=None), BACKWARD_RULE)
    assert not j.passed and says in j.message(), j.message()


def test_backward_refused_with_the_source_memory_changed_fails() -> None:
    j = judge(refused(corrupted=["page   3 gfn 0x1234: sha256 differs"]), BACKWARD_RULE)
    assert not j.passed and "1 probe page(s) changed on the source" in j.message()
    j = judge(refused(dirty_ok=False, dirty_message="1 of 4096 dirty pages did not arrive"), BACKWARD_RULE)
    assert not j.passed and "did not arrive" in j.message()


def test_a_refusal_without_a_word_is_not_clean() -> None:
    # assembled: no real run has failed without a word; these are the real refusal's lines that
    # say nothing went wrong
    quiet = "".join(line + "\n" for line in REFUSED_HVM_CONTEXT.splitlines() if "libxl: debug:" in line)
    assert quiet and toolstack_words(quiet) == ""
    j = judge(refused(log=quiet), BACKWARD_RULE)
    assert not j.passed and "without a word saying why" in j.message()


@pytest.mark.parametrize("rule", [FORWARD_RULE, BACKWARD_RULE])
def test_migrated_with_a_stale_dirty_page_fails(rule) -> None:
    stale = "1 of 4096 dirty pages did not arrive (dirty buffer: generation 9, ...):\n  page 17 gfn 0x9a11"
    j = judge(observed(dirty_ok=False, dirty_message=stale), rule)
    assert not j.passed and j.outcome == FAILED and "pages written during the copy are wrong" in j.message()


def test_migrated_but_corrupted_unchecked_or_on_both_hosts_fails() -> None:
    changed = judge(observed(corrupted=["page 0"]), FORWARD_RULE)
    assert "probe page(s) changed on the destination" in changed.message()
    assert "was not checked" in judge(observed(corrupted=None), BACKWARD_RULE).message()
    both = judge(observed(source_after=[DOM0, dom(5)]), FORWARD_RULE)
    assert not both.passed and "still on the source too" in both.message()
    gone = judge(observed(destination_after=[DOM0]), FORWARD_RULE)
    assert not gone.passed and "has no domain nx-xv-pv" in gone.message()
    # a source domain still being torn down after a success is no fault
    assert judge(observed(source_after=[DOM0, dom(5, "-b---d")]), FORWARD_RULE).passed


def test_toolstack_words_are_the_failing_lines() -> None:
    words = toolstack_words(TRUNCATED).splitlines()
    assert words[0] == "nxstream connect: truncated the stream after 1048576 bytes (--truncate-after)"
    assert words[1] == ("xc: error: Failed to read 4202504 bytes of data for record (0x00000001, "
                        "Page data) (0 = Success): Internal error")
    assert "migration target: Ready to receive domain." not in words
    assert "xc: info: Found x86 PV domain from Xen 4.17" not in words
    assert words[-1] == ("libxl: error: libxl_dom_suspend.c:666:domain_resume_done: Domain 7:"
                         "xc_domain_resume failed: Invalid argument")


# ------------------------------------------------------------------ the run config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_pairs_parse_and_default_to_none(tmp_path: Path) -> None:
    assert load_run_config(None).migration.cross_version == ()
    text = ("migration:\n  cross_version:\n"
            "    - {source: bookworm, destination: trixie, guest_types: [pvh]}\n"
            "    - {source: trixie, destination: bookworm}\n")
    cfg = load_run_config(write(tmp_path, text))
    assert cfg.migration.cross_version == (cv.CrossPair("bookworm", "trixie", ("pvh",)),
                                           cv.CrossPair("trixie", "bookworm", ("pv", "pvh")))


@pytest.mark.parametrize("pairs, says", [
    ("[{source: bookworm, destination: nosuch}]", "unknown host image 'nosuch'; available recipes in"),
    ("[{source: bookworm, destination: bookworm}]", "[0]: source and destination are both 'bookworm'"),
    ("[{source: bookworm, destination: trixie, guest_types: [pv, kvm]}]",
     "guest_types ['pv', 'kvm'] invalid"),
    ("[{source: bookworm, dest: trixie}]", "unknown key(s) dest; missing destination"),
    ("{source: bookworm, destination: trixie}", "expected a list of {source, destination, guest_types}"),
    ("[bookworm]", "[0]: expected a mapping"),
])
def test_bad_pairs_are_clear_errors(tmp_path: Path, pairs: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_run_config(write(tmp_path, f"migration:\n  cross_version: {pairs}\n"))
    assert "migration.cross_version" in str(exc.value) and says in str(exc.value), str(exc.value)


def test_the_shipped_config_pairs_bookworm_with_the_own_dist(monkeypatch) -> None:
    monkeypatch.setenv("XEN_DIST", "/nonexistent")  # the recipe names it; the config does not resolve it
    root = Path(__file__).resolve().parents[2]
    pairs = load_run_config(root / "configs" / "cross-version.yaml").migration.cross_version
    assert pairs == (cv.CrossPair("bookworm", "bookworm-own-dist", ("pv", "pvh")),)


# ------------------------------------------------------------------ labels


def cross_record(outcome: str = MIGRATED, ok: bool = True) -> Record:
    return Record(kind="cross_version_migrate", guest_type="pv", memory_mb=256, workload="dirty:40",
                  image="bookworm -> bookworm-own-dist", xen_version="4.17.5", ok=ok, total_s=40.0,
                  downtime_s=1.2, iterations=5, cross_version="cross-version 4.17.5 -> 4.22.0",
                  cross_outcome=outcome)


def test_the_record_and_the_summary_say_cross_version() -> None:
    rec = cross_record()
    assert "cross-version 4.17.5 -> 4.22.0 (migrated-intact)" in describe(rec)
    plain = Record(kind="two_host_migrate", image="bookworm")
    rows = summary_rows([rec, cross_record(REFUSED, ok=False), plain])
    images = [row[0] for row in rows]
    assert "bookworm -> bookworm-own-dist cross-version 4.17.5 -> 4.22.0 (migrated-intact)" in images
    assert "bookworm -> bookworm-own-dist cross-version 4.17.5 -> 4.22.0 (refused-cleanly)" in images
    assert "bookworm" in images  # a migration within one Xen keeps its plain image


def test_compare_keeps_cross_version_groups_apart_and_plain_names_unchanged() -> None:
    old = [Record(kind="two_host_migrate", guest_type="pv", total_s=10.0), cross_record()]
    new = [Record(kind="two_host_migrate", guest_type="pv", total_s=20.0),
           Record(**{**cross_record().__dict__, "total_s": 40.0})]
    assert compare(old, new) == ["two_host_migrate pv 0 idle: total_s 10.00 -> 20.00 (+100%, threshold 20%)"]


def test_the_html_results_table_labels_a_cross_version_check() -> None:
    from harness.html_report import image_label

    result = {"image": "bookworm -> bookworm-own-dist",
              "properties": {"cross_version": "cross-version 4.22.0 -> 4.17.5",
                             "cross_version_outcome": "refused-cleanly"}}
    assert image_label(result) == ("bookworm -> bookworm-own-dist cross-version 4.22.0 -> 4.17.5 "
                                   "(refused-cleanly)")
    assert image_label({"image": "bookworm", "properties": {}}) == "bookworm"


def test_the_plots_name_cross_version_migrations(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from harness import report

    seen = []
    real = plt.Axes.set_xticks

    def spy(self, ticks, labels=None, **kw):
        seen.extend(labels or [])
        return real(self, ticks, labels, **kw)

    plt.Axes.set_xticks = spy
    try:
        report.plots([cross_record()], tmp_path)
    finally:
        plt.Axes.set_xticks = real
    assert any("cross-version 4.17.5 -> 4.22.0" in name for name in seen), seen
