"""`nested-xen bench guests` (issue 30): its statistics and table, its cells and batches, the
results file it appends to and resumes from, and a run against a fake dom0 (the SSH/xl
boundary only: guests are created and judged by harness/guests.py's own code)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import bench_guests
from harness import dom0_layout as layout
from harness.accel import AccelChoice
from harness.bench_stats import (
    BenchError,
    BenchFile,
    Boot,
    Cell,
    batches,
    cells,
    interleave,
    markdown,
    parse_axis,
    percentile,
    summarize,
    table_rows,
    wilson,
)
from harness.config import RunConfig, Timeouts
from harness.host import HostFacts
from harness.probe_report import ProbePage, format_probe_line, page_digest
from harness.remote import CommandResult, RemoteError
from harness.xen import Domain

# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize(("hits", "n", "low", "high"), [
    (0, 10, 0.0, 0.2775),  # no death in 10 boots: the rate may still be 28 %
    (2, 10, 0.0567, 0.5098),
    (10, 10, 0.7225, 1.0),
    (1, 3, 0.0615, 0.7923),
])
def test_wilson_interval(hits, n, low, high):
    lo, hi = wilson(hits, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_wilson_of_nothing_is_everything():
    assert wilson(0, 0) == (0.0, 1.0)


def test_percentile_interpolates_between_ranks():
    assert percentile(list(range(1, 11)), 0.9) == pytest.approx(9.1)
    assert percentile([5.0], 0.9) == 5.0
    assert percentile([30.0, 10.0, 20.0], 0.5) == 20.0
    assert percentile([], 0.9) is None


def boot(kind="pvh", outcome="ready", ready=30.0, paging="hap", thread="multi", at_once=1, **kw):
    return Boot("bookworm", "7.2.15", thread, paging, at_once, kind, outcome,
                ready_s=ready if outcome == "ready" else None, xen="4.17.5", **kw)


def test_summary_per_cell_and_type():
    boots = ([boot(ready=r) for r in (30.0, 40.0, 50.0, 60.0)] + [boot(outcome="early-death")]
             + [boot(outcome="timeout")] + [boot(kind="hvm", ready=100.0, paging="shadow", at_once=3)])
    pvh, hvm = summarize(boots)
    assert (pvh.boots, pvh.ready, pvh.deaths, pvh.others) == (6, 4, 1, 1)
    assert pvh.median_s == 45.0 and pvh.p90_s == pytest.approx(57.0)
    assert pvh.interval == wilson(1, 6)
    assert hvm.cell == Cell("multi", "shadow", 3) and hvm.deaths == 0
    assert table_rows([pvh])[0] == ("7.2.15", "bookworm", "hap", "multi", "1", "pvh", "6", "4", "45.0",
                                    "57.0", "1/6", "3%-56%", "1")


def test_the_table_names_pv_rows_by_their_cell_and_flags_a_paging_mismatch():
    text = markdown([boot(kind="pv", paging="shadow"),
                     boot(kind="pvh", paging="shadow", paging_seen="shadow")])
    assert "| 7.2.15 | bookworm | (shadow) | multi | 1 | pv | 1 | 1 | 30.0 | 30.0 | 0/1 |" in text
    assert "Wilson 95% interval" in text and "Xen 4.17.5" in text
    assert "another paging mode than asked" not in text
    assert "another paging mode than asked" in markdown([boot(paging="shadow", paging_seen="hap")])
    assert markdown([]) == "No guest boot recorded yet.\n"


# ------------------------------------------------------------------ cells and batches


def test_the_cells_are_every_combination_grouped_by_thread_mode():
    found = cells()
    assert len(found) == 8 and len(set(found)) == 8
    assert [c.thread for c in found] == ["multi"] * 4 + ["single"] * 4
    assert cells(("shadow",), ("single",), (3,)) == [Cell("single", "shadow", 3)]


@pytest.mark.parametrize(("text", "allowed", "value"), [
    ("hap,shadow", ("hap", "shadow"), ("hap", "shadow")),
    (" shadow ", ("hap", "shadow"), ("shadow",)),
    ("3,1", (1, 3), (3, 1)),
])
def test_an_axis_is_parsed(text, allowed, value):
    assert parse_axis(text, allowed, "--x") == value


@pytest.mark.parametrize(("text", "allowed"), [
    ("ept", ("hap", "shadow")), ("", ("hap", "shadow")), ("hap,hap", ("hap", "shadow")),
    ("2", (1, 3)), ("one", (1, 3)),
])
def test_a_bad_axis_is_a_clear_error(text, allowed):
    with pytest.raises(BenchError, match=r"--x: .*give one or more of"):
        parse_axis(text, allowed, "--x")


def test_batches_take_the_types_in_turn():
    assert batches({"pv": 2, "pvh": 2, "hvm": 2}, 3) == [["pv", "pvh", "hvm"]] * 2
    assert batches({"hvm": 1, "pv": 1}, 1) == [["pv"], ["hvm"]]
    assert batches({"pvh": 1, "hvm": 3}, 3) == [["pvh", "hvm", "hvm"], ["hvm"]]
    assert batches({}, 3) == []
    assert interleave([[["a"], ["b"]], [["c"]]]) == [(0, ["a"]), (1, ["c"]), (0, ["b"])]


def test_settings_from_the_command_line(tmp_path):
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    bench_guests.add_arguments(p)
    cfg = RunConfig(artifacts_dir=tmp_path)
    settings = bench_guests.settings_from_args(p.parse_args([]), cfg)
    assert settings.json_path == tmp_path / "bench-guests.json" and settings.boots == 10
    assert settings.markdown_path == tmp_path / "bench-guests.md"
    narrow = bench_guests.settings_from_args(p.parse_args(["--paging", "shadow", "--at-once", "3",
                                                           "--boots", "2", "--json", "x.json"]), cfg)
    assert (narrow.paging, narrow.at_once, narrow.boots, narrow.json_path) == (("shadow",), (3,), 2,
                                                                               Path("x.json"))
    with pytest.raises(BenchError, match="--boots: 0"):
        bench_guests.settings_from_args(p.parse_args(["--boots", "0"]), cfg)


def test_the_l1_qemu_runs_tcg_single_or_multi_threaded():
    tcg = AccelChoice("tcg", "qemu64,+svm,+npt", "test")
    assert bench_guests.with_threads(tcg, "single").qemu_args() == ["-accel", "tcg,thread=single",
                                                                   "-cpu", "qemu64,+svm,+npt"]
    assert bench_guests.with_threads(tcg, "multi").qemu_args()[1] == "tcg,thread=multi"
    kvm = AccelChoice("kvm", "host", "test")
    assert bench_guests.with_threads(kvm, "single") is kvm


# ------------------------------------------------------------------ the results file


def test_the_results_file_is_written_at_each_boot_and_read_back(tmp_path):
    store = BenchFile(tmp_path / "b.json")
    store.add(boot())
    assert len(json.loads((tmp_path / "b.json").read_text())["boots"]) == 1
    store.add(boot(outcome="early-death", signature="guest-death [pvh] /x/ in dmesg",
                   evidence={"dmesg": "(XEN) d3v0 Triple fault"}))
    again = BenchFile.load(tmp_path / "b.json")
    assert again.boots == store.boots
    setup = ("bookworm", "7.2.15")
    assert again.done(setup, Cell("multi", "hap", 1), "pvh") == 2
    assert again.done(("bookworm", "10.0.2"), Cell("multi", "hap", 1), "pvh") == 0  # another QEMU: its own
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("text", ["{", '{"format": 99, "boots": []}', "[]",
                                  '{"format": 1, "boots": [{"x": 1}]}'])
def test_a_file_that_is_not_a_results_file_is_refused(tmp_path, text):
    (tmp_path / "b.json").write_text(text)
    with pytest.raises(BenchError, match="not a bench-guests results file"):
        BenchFile.load(tmp_path / "b.json")


def test_the_plan_boots_only_what_the_file_lacks(tmp_path):
    store = BenchFile(tmp_path / "b.json", [boot(kind=k) for k in ("pv", "pvh", "pvh")])
    settings = bench_guests.Settings(boots=2, paging=("hap",), at_once=(1,))
    work = bench_guests.plan(store, ("bookworm", "7.2.15"), cells(("hap",), ("multi",), (1,)), settings)
    assert [b for _, b in work] == [["pv"], ["hvm"], ["hvm"]]


# ------------------------------------------------------------------ against a fake dom0


def report_text() -> str:
    pages = [ProbePage(i, 100 + i, f"{i:064x}") for i in range(2)]
    lines = [format_probe_line({"ev": "hello", "v": 1, "nonce": "ab" * 16, "pages": 2, "page_size": 4096,
                                "tick_ms": 0})]
    lines += [format_probe_line({"ev": "page", "i": p.index, "pfn": p.pfn, "sha256": p.sha256})
              for p in pages]
    lines.append(format_probe_line({"ev": "ready", "pages": 2, "digest": page_digest(pages)}))
    return "\n".join(lines) + "\n"


class FakeDom0:
    """dom0 over SSH as guests.py and the bench use it: the xl config written, `xl create`,
    `xl list`, `xl dmesg`, `xl list -l`, the guests' console files. ``fates``: per guest type,
    what each creation does: ready, triple (gone, its own triple fault), hang (never reports)."""

    def __init__(self, fates: dict[str, list[str]], lose_after: int | None = None) -> None:
        self.fates = {k: list(v) for k, v in fates.items()}
        self.configs: dict[str, str] = {}
        self.consoles: dict[str, str] = {}
        self.alive: dict[str, Domain] = {}
        self.dmesg_text, self.last_domid, self.lose_after = "", 0, lose_after
        self.doomed: set[int] = set()
        self.created: list[tuple[str, str]] = []
        self.remote = self

    # -- SSH
    def put_text(self, text, path, mode=None):
        self.configs[Path(path).stem] = text

    def run_expect(self, cmd, **_):
        return CommandResult(cmd, 0, "", "", "dom0", 0.0)

    def run(self, cmd, timeout=None, **_):
        out = self.consoles.get(shlex.split(cmd)[1], "") if cmd.startswith("cat ") else ""
        return CommandResult(cmd, 0, out, "", "dom0", 0.0)

    # -- xl
    def create(self, path, paused=False):
        name = Path(path).stem
        config = self.configs[name]
        kind = next(v.strip('" ') for k, _, v in (ln.partition("=") for ln in config.splitlines())
                    if k.strip() == "type")
        if self.lose_after is not None and len(self.created) >= self.lose_after:
            raise RemoteError("[dom0] transport failed during `xl create`")
        self.created.append((kind, config))
        self.last_domid += 1
        fate = self.fates[kind].pop(0)
        self.consoles[layout.console_log(kind, name)] = report_text() if fate == "ready" else ""
        self.alive[name] = Domain(name, self.last_domid, 256, 1, "-b----")
        if fate == "triple":
            self.dmesg_text += f"(XEN) d{self.last_domid}v0 Triple fault - invoking HVM shutdown action 1\n"
            self.doomed.add(self.last_domid)

    def domid(self, name):
        return self.alive[name].domid

    def unpause(self, domid):
        if domid in self.doomed:  # dies once it runs; on_reboot=destroy removes it
            self.alive = {n: d for n, d in self.alive.items() if d.domid != domid}

    def domain(self, name):
        return self.alive.get(name)

    def list(self):
        return list(self.alive.values())

    def dmesg(self, clear=False):
        return self.dmesg_text

    def destroy(self, name):
        self.alive.pop(name, None)

    def destroy_all_guests(self):
        names = list(self.alive)
        self.alive.clear()
        return names

    def paging(self, domid):
        name = next(n for n, d in self.alive.items() if d.domid == domid)
        return "shadow" if "hap = 0" in self.configs[name] else "hap"


FACTS = HostFacts(xen_version="4.17.5", kernel_release="6.1.0", dom0_mode="pv",
                  virt_caps=frozenset({"hvm", "hap", "shadow"}), xen_caps=frozenset(), accel="tcg",
                  qemu_version="7.2.15", paging="hap")


class FakeProvisioner:
    def __init__(self, dom0: FakeDom0, facts: HostFacts = FACTS) -> None:
        self.dom0, self.facts, self.hosts = dom0, facts, []
        self.accel = AccelChoice("tcg", "qemu64,+svm,+npt", "test")

    def image(self, name):
        return SimpleNamespace(name=name), SimpleNamespace(name=name)

    def host(self, name, label, run_dir):
        self.hosts.append((label, self.accel.qemu_args()[1]))
        return SimpleNamespace(name=label, xl=self.dom0, facts=lambda: self.facts, stop=lambda: None)


@pytest.fixture
def fake_l1(monkeypatch):
    made = []
    monkeypatch.setattr(bench_guests, "provisioner_for", lambda cfg, progress: made[-1])
    monkeypatch.setattr(bench_guests, "qemu_for", lambda recipe, cfg, accel: "/fake/qemu-system-x86_64")
    monkeypatch.setattr(bench_guests, "qemu_version_label", lambda binary: "7.2.15")
    monkeypatch.setattr(bench_guests, "qemu_version", lambda binary: "QEMU emulator version 7.2.15")

    def use(dom0: FakeDom0, facts: HostFacts = FACTS) -> FakeProvisioner:
        made.append(FakeProvisioner(dom0, facts))
        return made[-1]

    return use


def many(fate: str = "ready", n: int = 20) -> dict[str, list[str]]:
    return {k: [fate] * n for k in ("pv", "pvh", "hvm")}


def test_a_shadow_cell_creates_its_guests_with_hap_0_and_reads_what_they_ran_on(tmp_path, fake_l1):
    dom0 = FakeDom0(many())
    prov = fake_l1(dom0)
    settings = bench_guests.Settings(boots=1, paging=("hap", "shadow"), threads=("single",), at_once=(3,),
                                     json_path=tmp_path / "b.json")
    store = bench_guests.run_bench(RunConfig(artifacts_dir=tmp_path), settings, progress=lambda line: None,
                                   issues=[])
    assert prov.hosts == [("bench-guests-single", "tcg,thread=single")]
    assert prov.accel.qemu_args()[1] == "tcg,thread=multi"  # put back after the run
    shadow = [cfg for kind, cfg in dom0.created if "hap = 0" in cfg]
    assert len(shadow) == 2 and all('type = "pv"' not in cfg for cfg in shadow)
    seen = {(b.paging, b.type): b.paging_seen for b in store.boots}
    assert seen == {("hap", "pv"): "", ("hap", "pvh"): "hap", ("hap", "hvm"): "hap",
                    ("shadow", "pv"): "", ("shadow", "pvh"): "shadow", ("shadow", "hvm"): "shadow"}
    assert all(b.outcome == "ready" and b.ready_s is not None and b.xen == "4.17.5" for b in store.boots)
    assert len({b.batch for b in store.boots}) == 2  # one batch of three per cell
    assert (tmp_path / "b.md").read_text() == markdown(store.boots)


def test_an_early_death_is_judged_as_the_harness_does(tmp_path, fake_l1):
    from harness.known_issues import load_known_issues

    (tmp_path / "k.yaml").write_text("- check: guest-death\n  evidence: [dmesg]\n  guests: [pvh]\n"
                                     "  paging: hap\n  signature: 'd\\d+v\\d+ Triple fault'\n  reason: NPT\n")
    issues = load_known_issues(tmp_path / "k.yaml")
    fake_l1(FakeDom0({"pv": ["ready"] * 2, "pvh": ["triple"] * 2, "hvm": ["hang"] * 2}))
    settings = bench_guests.Settings(boots=1, paging=("hap", "shadow"), threads=("multi",), at_once=(1,),
                                     json_path=tmp_path / "b.json")
    cfg = RunConfig(artifacts_dir=tmp_path, timeouts=Timeouts(guest_ready=0.01))
    bench_guests.run_bench(cfg, settings, progress=lambda line: None, issues=issues)
    store = BenchFile.load(tmp_path / "b.json")
    by = {(b.paging, b.type): b for b in store.boots}
    assert by[("hap", "pv")].outcome == "ready"
    death = by[("hap", "pvh")]
    assert death.outcome == "early-death" and "Triple fault" in death.evidence["dmesg"]
    assert death.signature is not None and "paging hap" in death.signature  # a known emulator fault
    assert by[("shadow", "pvh")].outcome == "early-death"
    assert by[("shadow", "pvh")].signature is None  # the entry is scoped to HAP: not this one
    assert by[("hap", "hvm")].outcome == "timeout"
    assert "| hap | multi | 1 | pvh | 1 | 0 | - | - | 1/1 |" in (tmp_path / "b.md").read_text()


def test_a_run_stopped_midway_keeps_its_boots_and_the_next_boots_only_the_rest(tmp_path, fake_l1):
    settings = bench_guests.Settings(boots=2, paging=("hap", "shadow"), threads=("multi",), at_once=(1, 3),
                                     json_path=tmp_path / "b.json")
    cfg = RunConfig(artifacts_dir=tmp_path)
    first = FakeDom0(many(), lose_after=7)
    fake_l1(first)
    with pytest.raises(RemoteError):
        bench_guests.run_bench(cfg, settings, progress=lambda line: None, issues=[])
    kept = BenchFile.load(tmp_path / "b.json").boots
    assert 0 < len(kept) <= 7  # every batch that finished, each boot written as it ended
    second = FakeDom0(many())
    fake_l1(second)
    store = bench_guests.run_bench(cfg, settings, progress=lambda line: None, issues=[])
    assert len(second.created) == 4 * 2 * 3 - len(kept)
    assert len(store.boots) == 24 and store.boots[:len(kept)] == kept
    for cell in cells(("hap", "shadow"), ("multi",), (1, 3)):
        for kind in ("pv", "pvh", "hvm"):
            assert store.done(("bookworm", "7.2.15"), cell, kind) == 2
    third = FakeDom0(many())
    fake_l1(third)
    bench_guests.run_bench(cfg, settings, progress=lambda line: None, issues=[])
    assert third.created == []  # nothing left to do


def test_a_hap_cell_on_a_xen_without_hap_is_refused(tmp_path, fake_l1):
    import dataclasses

    fake_l1(FakeDom0(many()), dataclasses.replace(FACTS, virt_caps=frozenset({"hvm", "shadow"})))
    settings = bench_guests.Settings(boots=1, paging=("hap",), threads=("multi",), at_once=(1,),
                                     json_path=tmp_path / "b.json")
    with pytest.raises(BenchError, match="offers no HAP.*--paging shadow"):
        bench_guests.run_bench(RunConfig(artifacts_dir=tmp_path), settings, progress=lambda line: None,
                               issues=[])
    assert (tmp_path / "b.md").read_text() == "No guest boot recorded yet.\n"


def bench_parser() -> argparse.ArgumentParser:
    """cli.py's `bench` parser as it stands, with the bench guests options added to it."""
    from harness import options

    p = argparse.ArgumentParser(prog="nested-xen bench")
    p.add_argument("what", choices=["boot", "guests"])
    options.add_arguments(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cold-image", action="store_true")
    p.add_argument("--json", metavar="FILE")
    bench_guests.add_arguments(p)  # no option of its own clashes with the run options
    return p


def test_table_only_prints_and_writes_the_table_of_the_file(tmp_path, capsys):
    BenchFile(tmp_path / "b.json", [boot(), boot(outcome="early-death")]).write()
    args = bench_parser().parse_args(["guests", "--table-only", "--json", str(tmp_path / "b.json")])
    assert bench_guests.cmd_bench_guests(args) == 0
    out = capsys.readouterr().out
    assert "| 7.2.15 | bookworm | hap | multi | 1 | pvh | 2 | 1 | 30.0 | 30.0 | 1/2 |" in out
    assert (tmp_path / "b.md").read_text() in out


def test_bad_options_are_one_clear_error(tmp_path):
    from harness.config import ConfigError

    args = bench_parser().parse_args(["guests", "--at-once", "2", "--json", str(tmp_path / "b.json")])
    with pytest.raises(ConfigError, match="--at-once: '2'; give one or more of 1, 3"):
        bench_guests.cmd_bench_guests(args)
