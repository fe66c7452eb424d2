"""Unit tests for harness.probe_report: the guest probe's console protocol."""

from __future__ import annotations

import hashlib

import pytest

from harness.probe_report import (
    PAGE_SIZE,
    ProbePage,
    Tick,
    crc32_hex,
    expected_page_bytes,
    format_probe_line,
    page_digest,
    parse_probe_log,
)

NONCE = "00112233445566778899aabbccddeeff"
NONCE2 = "ffeeddccbbaa99887766554433221100"


def page_sha(nonce: str, index: int) -> str:
    return hashlib.sha256(expected_page_bytes(nonce, index)).hexdigest()


def hello(nonce: str = NONCE, pages: int = 3, tick_ms: int = 0, v: int = 1) -> str:
    return format_probe_line(
        {"ev": "hello", "v": v, "nonce": nonce, "pages": pages, "page_size": PAGE_SIZE,
         "tick_ms": tick_ms, "dirty_mb": 0, "dirty_pct": 0}
    )  # fmt: skip


def page(index: int, nonce: str = NONCE, pfn_base: int = 0x1000) -> str:
    return format_probe_line(
        {"ev": "page", "i": index, "pfn": pfn_base + index, "sha256": page_sha(nonce, index)}
    )


def ready(nonce: str = NONCE, pages: int = 3, digest: str | None = None) -> str:
    if digest is None:
        digest = page_digest([ProbePage(i, 0, page_sha(nonce, i)) for i in range(pages)])
    return format_probe_line({"ev": "ready", "pages": pages, "digest": digest})


def cycle(nonce: str = NONCE, pages: int = 3, pfn_base: int = 0x1000) -> list[str]:
    return [
        hello(nonce, pages),
        *(page(i, nonce, pfn_base) for i in range(pages)),
        ready(nonce, pages),
    ]


def log(lines: list[str], newline: str = "\n") -> str:
    return newline.join(lines) + newline


def corrupt(line: str, old: str, new: str) -> str:
    """Change the JSON text but keep the original CRC."""
    assert old in line
    return line.replace(old, new, 1)


# ------------------------------------------------------------------ good logs


def test_complete_cycle_gives_verified_report() -> None:
    state = parse_probe_log(log(["NXPROBE-INIT up", *cycle()]))
    assert state.hello and state.hello_count == 1 and state.init_seen
    assert state.error is None and state.rejected == 0
    report = state.report
    assert report is not None and state.report_is_current
    assert report.nonce == NONCE and report.page_size == PAGE_SIZE and report.tick_ms == 0
    assert report.pfns == [0x1000, 0x1001, 0x1002]
    assert [p.index for p in report.pages] == [0, 1, 2]
    assert report.pages[1].sha256 == page_sha(NONCE, 1)


def test_kernel_noise_crlf_and_garbage_are_ignored() -> None:
    lines = cycle()
    noisy = [
        "[    0.000000] Linux version 6.1.0 (debian-kernel@lists.debian.org)",
        "\x1b[0m\x00\xff garbage \x07",
        lines[0],
        "NXPROBE-PAGE this is not a record",
        "[    1.234567] random: crng init done " + lines[1],  # prefix on the same line
        lines[2],
        "NXPROBE",
        lines[3] + "   ",
        lines[4],
        "login: ",
    ]
    state = parse_probe_log(log(noisy, newline="\r\r\n"))
    assert state.report is not None
    assert state.rejected == 0 and state.error is None


def test_undecodable_console_bytes_do_not_raise() -> None:
    raw = log(cycle()).encode() + b"NXPROBE {\xff\xfe} *00000000\n"
    text = raw.decode("utf-8", "surrogateescape") + "\ud800 NXPROBE {\ud800} *00000000"
    state = parse_probe_log(text)
    assert state.report is not None and state.rejected == 2


def test_page_lines_out_of_order_are_fine() -> None:
    lines = cycle()
    state = parse_probe_log(log([lines[0], lines[3], lines[1], lines[2], lines[4]]))
    assert state.report is not None
    assert [p.index for p in state.report.pages] == [0, 1, 2]


# ------------------------------------------------------------------ rejects


def test_crc_mismatch_is_rejected_and_report_withheld() -> None:
    lines = cycle()
    lines[2] = corrupt(lines[2], '"pfn":4097', '"pfn":4098')
    state = parse_probe_log(log(lines))
    assert state.rejected == 1
    assert state.report is None
    assert state.error is not None and "missing" in state.error and "[1]" in state.error


@pytest.mark.parametrize("text", ['{"ev":"page","i":0,}', "{}", '{"ev":1}', '{"ev":"x"'])
def test_broken_json_with_valid_crc_is_rejected(text: str) -> None:
    bad = f"NXPROBE {text} *{crc32_hex(text)}"
    state = parse_probe_log(log([*cycle()[:2], bad, *cycle()[2:]]))
    assert state.rejected == 1
    assert state.report is not None


def test_records_with_bad_fields_are_rejected() -> None:
    lines = cycle()
    bad = [
        format_probe_line({"ev": "page", "i": 7, "pfn": 1, "sha256": "0" * 64}),  # i >= pages
        format_probe_line({"ev": "page", "i": 0, "pfn": -1, "sha256": "0" * 64}),
        format_probe_line({"ev": "page", "i": True, "pfn": 1, "sha256": "0" * 64}),
        format_probe_line({"ev": "page", "i": 0, "pfn": 1, "sha256": "XYZ"}),
        format_probe_line({"ev": "hello", "nonce": "short"}),
        format_probe_line({"ev": "bogus"}),
    ]
    state = parse_probe_log(log([lines[0], *bad, *lines[1:]]))
    assert state.rejected == len(bad)
    assert state.report is not None


def test_partial_log_without_ready_has_no_report_and_no_error() -> None:
    lines = cycle()
    state = parse_probe_log(log(lines[:-1]) + lines[-1][:40])  # ready cut mid-line
    assert state.hello
    assert state.report is None
    assert state.error is None


def test_digest_mismatch_sets_error() -> None:
    lines = cycle()
    lines[-1] = ready(digest="ab" * 32)
    state = parse_probe_log(log(lines))
    assert state.report is None
    assert state.error is not None and "digest" in state.error


def test_ready_page_count_mismatch_sets_error() -> None:
    lines = cycle()
    lines[-1] = ready(pages=2)
    state = parse_probe_log(log(lines))
    assert state.report is None
    assert state.error is not None and "2 pages" in state.error


def test_error_event() -> None:
    lines = [hello(), format_probe_line({"ev": "error", "msg": "mlock probe pages: ENOMEM"})]
    state = parse_probe_log(log(lines))
    assert state.report is None
    assert state.error == "probe error: mlock probe pages: ENOMEM"


def test_unknown_protocol_version_sets_error() -> None:
    state = parse_probe_log(log([hello(v=3), *cycle()[1:]]))
    assert state.error is not None and "version 3" in state.error


def test_version_2_without_its_dirty_lines_is_no_report() -> None:
    state = parse_probe_log(log([hello(v=2), *cycle()[1:]]))
    assert state.report is None and state.error is not None and 'no "dirty" line' in state.error


# ------------------------------------------------------------------ interleaving


def test_printk_spliced_mid_line_with_newline_is_repaired() -> None:
    lines = cycle()
    target = lines[2]
    cut = target.index('"sha256"') + 12
    lines[2:3] = [
        target[:cut] + "[   12.345678] xen:balloon: Initialising balloon driver",
        target[cut:],
    ]
    state = parse_probe_log(log(lines))
    assert state.repaired == 1 and state.rejected == 0
    assert state.report is not None and state.report.pages[1].pfn == 0x1001


def test_printk_spliced_across_several_lines_is_repaired() -> None:
    lines = cycle()
    target = lines[1]
    cut = 30
    lines[1:2] = [
        target[:cut] + "[    3.1] usb 1-1: new device",
        "[    3.2] second message",
        target[cut:],
    ]
    state = parse_probe_log(log(lines))
    assert state.repaired == 1
    assert state.report is not None


def test_text_inserted_inside_a_line_is_rejected() -> None:
    lines = cycle()
    cut = 40
    lines[3] = lines[3][:cut] + "[ 9.9] oops" + lines[3][cut:]
    state = parse_probe_log(log(lines))
    assert state.rejected == 1 and state.repaired == 0
    assert state.report is None and state.error is not None


def test_two_records_on_one_line() -> None:
    lines = cycle()
    merged = [lines[0], lines[1] + lines[2], lines[3], lines[4]]
    state = parse_probe_log(log(merged))
    assert state.report is not None and state.rejected == 0


# ------------------------------------------------------------------ reboots


def test_reboot_last_complete_cycle_wins() -> None:
    state = parse_probe_log(log([*cycle(NONCE), "reboot: Restarting system", *cycle(NONCE2)]))
    assert state.hello_count == 2
    assert state.report is not None and state.report.nonce == NONCE2
    assert state.report_is_current


def test_reboot_with_incomplete_second_cycle_keeps_first_report() -> None:
    second = cycle(NONCE2)[:-2]
    state = parse_probe_log(log([*cycle(NONCE), *second]))
    assert state.report is not None and state.report.nonce == NONCE
    assert state.nonce == NONCE2
    assert not state.report_is_current


def test_page_lines_before_any_hello_are_ignored() -> None:
    lines = cycle()
    state = parse_probe_log(log(lines[1:]))
    assert not state.hello and state.report is None and state.rejected == 0


# ------------------------------------------------------------------ ticks


def test_ticks_are_parsed_and_malformed_ones_ignored() -> None:
    lines = [
        *cycle(),
        "NXTICK 0 1000 2000",
        "NXTICK 1 2000",  # cut short
        "NXTICK one 2 3",
        "NXTICK 2 3000 40[ 5.0] kernel text",
        "[ 5.1] prefix NXTICK 3 4000 5000",
        "NXTICK 4 5000 6000\r",
    ]
    state = parse_probe_log(log(lines))
    assert state.ticks == [Tick(0, 1000, 2000), Tick(3, 4000, 5000), Tick(4, 5000, 6000)]


def test_ticks_restart_with_a_new_hello() -> None:
    state = parse_probe_log(log([*cycle(), "NXTICK 0 1 2", hello(NONCE2), "NXTICK 0 3 4"]))
    assert state.ticks == [Tick(0, 3, 4)]


# ------------------------------------------------------------------ page content


def test_expected_page_bytes_layout() -> None:
    data = expected_page_bytes(NONCE, 5)
    assert len(data) == PAGE_SIZE
    marker = f"NXPROBE-PAGE nonce={NONCE} idx=5".encode()
    assert data[: len(marker)] == marker
    assert set(data[len(marker) : 64]) == {0}
    assert data != expected_page_bytes(NONCE, 6)
    assert data[64:] != expected_page_bytes(NONCE2, 5)[64:]
    assert expected_page_bytes(NONCE.upper(), 5) == data


def test_expected_page_bytes_is_pinned() -> None:
    """Guards the algorithm shared with probe.c (cached initramfs images use it)."""
    assert page_sha(NONCE, 0) == GOLDEN_PAGE0_SHA256


@pytest.mark.parametrize("nonce", ["00", "zz" * 16, NONCE + "00"])
def test_expected_page_bytes_rejects_bad_nonce(nonce: str) -> None:
    with pytest.raises(ValueError):
        expected_page_bytes(nonce, 0)


# Computed by probe.c (fill_page + sha256) for NONCE, page 0.
GOLDEN_PAGE0_SHA256 = "904d138a41d33611fd003bd404e9cde99c7b71ac9aa4fff015c309fa97c6bd83"
