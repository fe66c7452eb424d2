"""Paging as an axis (issue 30): the run config's `guests: paging:`, the host's paging
fact, each translated guest's mode, and known issues scoped to a paging mode."""

from __future__ import annotations

import pytest

from harness.config import ConfigError, GuestsConfig, RunConfig, load_run_config


def _config(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_run_config(path)


# ------------------------------------------------------------------ run config


def test_guests_paging_defaults_to_hap(tmp_path):
    assert RunConfig().guests.paging == "hap"
    assert _config(tmp_path, "guests: {}\n").guests == GuestsConfig()


def test_guests_paging_shadow_is_read(tmp_path):
    assert _config(tmp_path, "guests:\n  paging: shadow\n").guests.paging == "shadow"


@pytest.mark.parametrize(("text", "message"), [
    ("guests:\n  paging: ept\n", "guests.paging"),
    ("guests:\n  paging: [hap]\n", "guests.paging: expected str"),
    ("guests:\n  pagin: shadow\n", "guests: unknown key(s) pagin"),
    ("guests: shadow\n", "guests: expected dict"),
])
def test_bad_guests_paging_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match="hap, shadow" if "ept" in text else None) as err:
        _config(tmp_path, text)
    assert message in str(err.value)


# ------------------------------------------------------------------ what Xen offers, what a domain runs on

XL_INFO = """host                   : nx
virt_caps              : {caps}
xen_commandline        : {cmdline}
xen_major              : 4
xen_minor              : 17
"""


@pytest.mark.parametrize(("caps", "cmdline", "paging"), [
    ("pv hvm hvm_directio pv_directio hap shadow", "placeholder dom0_mem=1024M", "hap"),
    ("pv hvm hvm_directio pv_directio shadow", "placeholder", "shadow"),  # an L1 CPU without +npt
    # Xen drops hap from virt_caps itself; the command line is read as well
    ("pv hvm hap shadow", "placeholder hap=0 dom0_mem=1024M", "shadow"),
    ("pv hvm hap shadow", "no-hap", "shadow"),
    ("pv hvm hap shadow", "hap=1 dom0=pvh", "hap"),
    ("pv hvm hap shadow", "nohap=0", "hap"),  # another option's name is not hap's
    ("pv", "placeholder", ""),  # no HVM: neither
])
def test_what_xen_offers_translated_guests(caps, cmdline, paging):
    from harness.xen import parse_xl_info

    assert parse_xl_info(XL_INFO.format(caps=caps, cmdline=cmdline)).paging == paging


def xl_list_long(kind: str, hap: str) -> str:
    import json

    return json.dumps([{"domid": 3, "config": {"c_info": {"type": kind, "hap": hap, "name": "g"},
                                               "b_info": {"max_vcpus": 1}}}])


@pytest.mark.parametrize(("text", "paging"), [
    (xl_list_long("pvh", "True"), "hap"),
    (xl_list_long("hvm", "False"), "shadow"),
    (xl_list_long("pv", "False"), ""),  # a PV guest has neither
    (xl_list_long("hvm", "<default>"), ""),  # libxl did not say
    ("", ""),
    ("not json", ""),
])
def test_a_domains_paging_from_xl_list_long(text, paging):
    from harness.xen import domain_paging

    assert domain_paging(text) == paging


def test_xl_paging_asks_xl_list_long_of_that_domain():
    from harness.remote import CommandResult
    from harness.xen import Xl

    class Remote:
        def run(self, cmd, timeout=None):
            self.cmd = cmd
            return CommandResult(cmd, 0, xl_list_long("pvh", "False"), "", "dom0", 0.0)

    remote = Remote()
    assert Xl(remote).paging(7) == "shadow" and remote.cmd == "xl list -l 7"


@pytest.mark.parametrize(("offered", "asked", "paging"), [
    ("hap", "hap", "hap"), ("hap", "shadow", "shadow"),
    ("shadow", "hap", "shadow"),  # libxl's default on a Xen without HAP
    ("shadow", "shadow", "shadow"), ("", "shadow", ""),
])
def test_the_guests_paging_on_a_host(offered, asked, paging):
    from harness.host import guest_paging

    assert guest_paging(offered, asked) == paging


class FactsRemote:
    """dom0 answering the commands XenHost.facts() runs."""

    def __init__(self, caps: str) -> None:
        self.caps = caps

    def run(self, cmd, timeout=None):
        from harness.remote import CommandResult

        out = XL_INFO.format(caps=self.caps, cmdline="placeholder") if cmd == "xl info" else ""
        return CommandResult(cmd, 0, out, "", "dom0", 0.0)

    def check_output(self, cmd, timeout=None):
        return "6.1.0-50-amd64\nPV\n" if cmd.startswith("uname") else "debian\n\n"


def facts_host(caps: str = "pv hvm hap shadow", asked: str = "hap"):
    from types import SimpleNamespace

    from harness.host import XenHost

    spec = SimpleNamespace(accel=SimpleNamespace(accel="tcg"), qemu_binary="/nonexistent/qemu", iommu=False)
    host = XenHost("h", SimpleNamespace(spec=spec), FactsRemote(caps), None, None)
    host.guest_paging = asked
    return host


def test_the_host_facts_say_what_the_runs_guests_run_on():
    assert facts_host().facts().paging == "hap"
    assert facts_host(asked="shadow").facts().paging == "shadow"
    assert facts_host(caps="pv hvm shadow").facts().paging == "shadow"
    facts = facts_host(asked="shadow").facts()
    assert facts.as_dict()["paging"] == "shadow" and "hap" in facts.as_dict()["virt_caps"]


# ------------------------------------------------------------------ the guests


def test_a_shadow_guest_config_says_hap_0():
    from harness.guests import GuestSpec

    for kind in ("pvh", "hvm"):
        assert "hap = 0\n" in GuestSpec(type=kind, name="g", paging="shadow").xl_config()
        assert "hap" not in GuestSpec(type=kind, name="g", paging="hap").xl_config()
        assert "hap" not in GuestSpec(type=kind, name="g").xl_config()  # Xen's default
    assert "hap" not in GuestSpec(type="pv", name="g", paging="shadow").xl_config()  # PV has neither


def test_an_unknown_guest_paging_is_refused():
    from harness.guests import GuestSpec

    with pytest.raises(ValueError, match="paging 'ept'.*hap or shadow"):
        GuestSpec(type="pvh", name="g", paging="ept")


def test_an_owned_guest_gets_the_runs_paging_unless_its_spec_names_one(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from harness import guests

    created = []

    def start(xl, spec, timeout, image=""):
        created.append(spec)
        return SimpleNamespace(resolve_mfns=lambda p2m: None, destroy=lambda: None, name=spec.name,
                               console=lambda: "")

    monkeypatch.setattr(guests, "start_guest", start)
    host = SimpleNamespace(xl=None, name="h", guest_paging="shadow")
    agent = SimpleNamespace(p2m=None)
    with guests.owned_guest(host, guests.GuestSpec(type="hvm", name="a"), agent, tmp_path, 5):
        pass
    with guests.owned_guest(host, guests.GuestSpec(type="hvm", name="b", paging="hap"), agent, tmp_path, 5):
        pass
    assert [s.paging for s in created] == ["shadow", "hap"]


def test_the_shared_guests_get_the_runs_paging_and_the_facts_say_so():
    from types import SimpleNamespace

    from harness.config import GuestsConfig
    from harness.guests import attach_pool

    host = facts_host()
    assert host.facts().paging == "hap"
    host.remote.as_runner = lambda: None
    host.guest_pool = None
    host.image = SimpleNamespace(name="bookworm")
    cfg = RunConfig(snapshot_guests=(), guests=GuestsConfig(paging="shadow"))
    pool = attach_pool(host, cfg, create=False)
    assert pool.paging == "shadow" and host.guest_paging == "shadow"
    assert host.facts().paging == "shadow"  # read again for the new mode, not the cached one


# ------------------------------------------------------------------ known issues scoped to a paging mode


def _issues(tmp_path, scope):
    from harness.known_issues import load_known_issues

    path = tmp_path / "known.yaml"
    path.write_text("- check: guest-death\n  evidence: [dmesg]\n  signature: 'd\\d+v\\d+ Triple fault'\n"
                    f"  reason: emulated NPT\n{scope}")
    return load_known_issues(path)


def _facts(paging):
    from types import SimpleNamespace

    return SimpleNamespace(xen_version="4.17.5", kernel_release="6.1.0", dom0_mode="pv", accel="tcg",
                           paging=paging)


def test_a_paging_scoped_entry_matches_only_guests_on_that_mode(tmp_path):
    from harness.known_issues import GUEST_DEATH, emulator_fault, match

    hap_only = _issues(tmp_path, "  paging: hap\n")
    death = {"dmesg": "(XEN) d3v0 Triple fault - invoking HVM shutdown action 1"}
    assert emulator_fault(hap_only, "pvh", _facts("hap"), death) is not None
    assert emulator_fault(hap_only, "pvh", _facts("shadow"), death) is None
    assert match(hap_only, GUEST_DEATH, "hvm", _facts("shadow")) is None
    assert match(hap_only, GUEST_DEATH, "pv", _facts("hap")) is None  # a PV guest runs on neither
    assert match(hap_only, GUEST_DEATH, "hvm", _facts("")) is None  # unknown: no match
    assert match(hap_only, GUEST_DEATH, None, _facts("hap")) is not None  # no guest: the host's mode
    both = _issues(tmp_path, "  paging: [hap, shadow]\n")
    assert match(both, GUEST_DEATH, "hvm", _facts("shadow")) is not None
    unscoped = _issues(tmp_path, "")
    assert match(unscoped, GUEST_DEATH, "pv", _facts("")) is not None  # as before
    assert "paging hap" in hap_only[0].label()


@pytest.mark.parametrize("scope", ["  paging: ept\n", "  paging: []\n", "  paging: [hap, npt]\n"])
def test_a_bad_paging_scope_is_a_clear_error(tmp_path, scope):
    with pytest.raises(ConfigError, match="paging: .*give hap or shadow"):
        _issues(tmp_path, scope)


# ------------------------------------------------------------------ results.json, summary.md, report.html


def test_each_checks_guest_paging_reaches_results_summary_and_report(tmp_path):
    from harness.html_report import results_section
    from harness.results import Results, host_properties, markdown, write_json

    facts = facts_host(asked="shadow").facts()
    results = Results()
    for kind in ("pv", "pvh", "hvm", None):
        guest = [("guest_type", kind)] if kind else []
        report = pytest.TestReport(f"plugins/t.py::test_x[{kind}]", ("plugins/t.py", 0, "x"), {}, "passed",
                                   None, "call", user_properties=[("plugin", "t"), ("check", "test_x"),
                                                                  ("image", "bookworm"), *guest,
                                                                  *host_properties(facts)])
        results.add(report)
    assert [r.paging for r in results.results] == ["", "shadow", "shadow", ""]
    assert "| PVH/HVM paging |" in markdown(results.results)
    assert "| shadow |" in markdown(results.results)
    write_json(results.results, tmp_path / "results.json")
    page = results_section(tmp_path)
    assert "<th>paging</th>" in page and "<td>shadow</td>" in page
