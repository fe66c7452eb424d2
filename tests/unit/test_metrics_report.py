"""Metrics records, tick gaps, toolstack parsing, the summary table and baseline comparison."""

from __future__ import annotations

import json

from harness.cli import main
from harness.metrics import MetricsSink, Record, largest_gap_s, load, parse_toolstack, tick_arrivals
from harness.report import compare, summary_table

WATCH = "\n".join([
    "1000000000\tguest-a.log\tNXTICK 1 5 6",
    "1020000000\tguest-a.log\tNXTICK 2 5 6",
    "garbage line without tabs",
    "1040000000\tguest-a.log\tkernel noise",
    "2540000000\tguest-a--incoming.log\tNXTICK 3 5 6",
    "2560000000\tguest-a--incoming.log\tNXTICK 4 5 6",
])

XL_LOG = "\n".join([
    "100.000000 libxl: debug: something",
    "101.500000 libxl: debug: libxl_dom_suspend.c:203: Domain 1:issuing PV suspend request via XenBus",
    "101.600000 libxl: debug: guest has suspended",
    "102.900000 migration target: Domain started successsfully.",
    "not-a-stamp line",
])


def test_tick_arrivals_and_largest_gap():
    arrivals = tick_arrivals(WATCH)
    assert [seq for _, seq in arrivals] == [1, 2, 3, 4]
    assert largest_gap_s(arrivals, 1_010_000_000, 2_550_000_000) == 1.52
    # no tick after the operation's end: the pause has no measured end
    assert largest_gap_s(arrivals, 1_010_000_000, 3_000_000_000) is None
    assert largest_gap_s(arrivals, 500_000_000, 2_550_000_000) is None


def test_parse_toolstack_suspend_to_start():
    parsed = parse_toolstack(XL_LOG)
    assert parsed["downtime_toolstack_s"] == 1.4
    assert parsed["iterations"] is None


def test_sink_roundtrip_and_table(tmp_path):
    sink = MetricsSink(tmp_path / "m.json")
    for i, total in enumerate([50.0, 60.0, 55.0]):
        sink.add(Record(kind="localhost_migrate", guest_type="pv", memory_mb=256, image="bookworm",
                        repeat=i, total_s=total, downtime_s=1.0 + i, memory_intact=True))
    records = load(tmp_path / "m.json")
    assert len(records) == 3
    table = summary_table(records)
    assert "localhost_migrate" in table and "55.00 [50.00-60.00]" in table and "yes" in table
    sink.add(Record(kind="localhost_migrate", guest_type="pv", memory_mb=256, image="bookworm",
                    repeat=3, total_s=999.0, downtime_s=0.01, ok=False))
    row = [line for line in summary_table(sink.records).splitlines() if "localhost_migrate" in line][0]
    assert " 3      1 " in row and "999" not in row, row


def test_compare_flags_regressions_beyond_threshold():
    old = [Record(kind="save_restore", guest_type="pvh", memory_mb=256, total_s=10.0, downtime_s=2.0)]
    new = [Record(kind="save_restore", guest_type="pvh", memory_mb=256, total_s=13.0, downtime_s=2.1)]
    found = compare(old, new, threshold=0.2)
    assert len(found) == 1 and "total_s 10.00 -> 13.00" in found[0]
    assert compare(old, old) == []


def test_cli_report_baseline_exit_status(tmp_path, capsys):
    def write(path, total):
        path.write_text(json.dumps({"version": 1, "records": [
            {"kind": "save_restore", "guest_type": "pv", "memory_mb": 256, "total_s": total}]}))
    write(tmp_path / "old.json", 10.0)
    write(tmp_path / "new.json", 20.0)
    assert main(["report", str(tmp_path / "new.json"), "--baseline", str(tmp_path / "old.json")]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "old.json"), "--baseline", str(tmp_path / "old.json")]) == 0


def test_log_span_uses_the_logs_own_dom0_stamps():
    from harness.metrics import log_span_ns

    assert log_span_ns(XL_LOG) == (100_000_000_000, 102_900_000_000)
    assert log_span_ns("no stamps here\n") is None


def test_finish_record_fills_both_migration_paths(tmp_path):
    """plugins/migration.py's one record filler (save/restore, localhost and two-host)."""
    from plugins.migration import finish_record

    ticks = [(99_000_000_000, 1), (101_500_000_000, 2), (103_100_000_000, 3)]
    calls = []
    rec = finish_record(Record(kind="two_host_migrate"), log=XL_LOG, rc=0, seconds=2.91, ticks=ticks,
                        log_path=tmp_path / "migration" / "g.log", dmesg=lambda: calls.append("dmesg"),
                        intact=lambda: [])
    assert rec.ok and rec.memory_intact and rec.total_s == 2.91
    assert rec.downtime_s == 2.5  # 99.0 -> 101.5, the largest gap overlapping 100.0-102.9
    assert rec.extra["ticks_seen"] == 3 and calls == []
    assert (tmp_path / "migration" / "g.log").read_text() == XL_LOG

    failed = finish_record(Record(kind="save_restore"), log=XL_LOG, rc=1, seconds=1.0, ticks=ticks,
                           log_path=tmp_path / "f.log", dmesg=lambda: "(XEN) d1v0 Triple fault",
                           intact=lambda: calls.append("intact") or [])
    assert not failed.ok and failed.downtime_s is None and failed.memory_intact is None
    assert failed.extra["dmesg"] == "(XEN) d1v0 Triple fault" and calls == []

    corrupt = finish_record(Record(kind="localhost_migrate"), log=XL_LOG, rc=0, seconds=1.0, ticks=ticks,
                            log_path=tmp_path / "c.log", dmesg=str, intact=lambda: ["page   0: hash"])
    assert corrupt.memory_intact is False and corrupt.extra["corrupted_pages"] == ["page   0: hash"]


def test_tcp_transport_logs_merge_on_the_senders_clock() -> None:
    """Over tcp the receiver's xl lines are in its own log, stamped by its own clock:
    shifted onto the sender's and merged in time order, the toolstack downtime reads
    from the sender's suspend to the receiver's start as it does over ssh."""
    from harness.metrics import parse_toolstack
    from plugins.migration import merge_logs

    sender = ("100.0 xl: migrating\n"
              "101.0 libxl: guest has suspended\n"
              "103.0 Migration successful.\n")
    receiver = ("1100.5 migration target: Ready to receive domain.\n"
                "1101.5 migration target: Domain started successsfully.\n")
    merged = merge_logs(sender, receiver, -1000.0)
    assert [line.split(" ", 1)[0] for line in merged.splitlines()] == [
        "100.000000", "100.500000", "101.000000", "101.500000", "103.000000"]
    assert parse_toolstack(merged)["downtime_toolstack_s"] == 0.5
    # unshifted, the receiver's start would come 1000 s late
    assert parse_toolstack(merge_logs(sender, receiver, 0.0))["downtime_toolstack_s"] == 1000.5
