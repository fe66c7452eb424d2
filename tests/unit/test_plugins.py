"""Unit tests for harness.plugins: what a check declares and when it is skipped."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from harness.plugins import (
    DOM0_MODES,
    GUEST_TYPES,
    MARKER,
    CheckSpec,
    PluginError,
    check,
    make_spec,
    spec_of,
    version_of,
)


def host(xen: str = "4.17.5", kernel: str = "6.1.0-50-amd64", dom0: str = "pv",
         caps: tuple[str, ...] = ("pv", "hvm", "hap", "shadow")) -> SimpleNamespace:
    return SimpleNamespace(xen_version=xen, kernel_release=kernel, dom0_mode=dom0,
                           virt_caps=frozenset(caps))


# ------------------------------------------------------------------ make_spec


def test_make_spec_defaults() -> None:
    spec = make_spec("plugins/test_x.py::test_y")
    assert spec == CheckSpec()
    assert spec.guests == GUEST_TYPES and spec.dom0 == DOM0_MODES
    assert spec.xen is None and spec.kernel is None and spec.caps == () and not spec.fresh_host


def test_make_spec_values() -> None:
    spec = make_spec("c", guests=["hvm", "pvh"], xen=">=4.17,<4.21", kernel=">=6.1",
                     caps=["hap"], dom0="pvh", fresh_host=True)
    assert spec.guests == ("hvm", "pvh")
    assert spec.xen == SpecifierSet(">=4.17,<4.21")
    assert spec.kernel == SpecifierSet(">=6.1")
    assert spec.caps == ("hap",) and spec.dom0 == ("pvh",) and spec.fresh_host


def test_single_guest_string() -> None:
    assert make_spec("c", guests="hvm").guests == ("hvm",)


def test_bad_guest_type_names_check() -> None:
    with pytest.raises(PluginError) as info:
        make_spec("test_gfn_round_trip", guests=["pv", "kvm"])
    msg = str(info.value)
    assert msg.startswith("test_gfn_round_trip: guests=")
    assert "'kvm'" in msg and "choose from pv, pvh, hvm" in msg


def test_empty_guest_list_is_an_error() -> None:
    with pytest.raises(PluginError, match="test_a: guests=\\[\\]: choose from"):
        make_spec("test_a", guests=[])


def test_bad_dom0_names_check() -> None:
    with pytest.raises(PluginError, match="test_b: dom0=\\['hvm'\\]: choose from pv, pvh"):
        make_spec("test_b", dom0=["hvm"])


@pytest.mark.parametrize("field", ["xen", "kernel"])
def test_bad_specifier_names_check(field: str) -> None:
    with pytest.raises(PluginError) as info:
        make_spec("test_c", **{field: "=>4.17"})
    msg = str(info.value)
    assert msg.startswith(f"test_c: {field}='=>4.17' is not a version specifier")
    assert "e.g." in msg


def test_check_decorator_marks_function() -> None:
    @check(guests=["hvm"], xen=">=4.17")
    def test_thing() -> None:
        pass

    (mark,) = [m for m in test_thing.pytestmark if m.name == MARKER]
    assert mark.kwargs["spec"] == make_spec("x", guests=["hvm"], xen=">=4.17")


def test_check_decorator_error_names_function() -> None:
    with pytest.raises(PluginError, match="test_broken: guests="):
        @check(guests=["xen"])
        def test_broken() -> None:
            pass


def test_spec_of_unmarked_item_is_default() -> None:
    item = SimpleNamespace(get_closest_marker=lambda name: None)
    assert spec_of(item) == CheckSpec()  # type: ignore[arg-type]


def test_spec_of_marked_item() -> None:
    spec = make_spec("x", guests=["pv"])
    marker = pytest.mark.nx_check(spec=spec).mark
    item = SimpleNamespace(get_closest_marker=lambda name: marker if name == MARKER else None)
    assert spec_of(item) is spec  # type: ignore[arg-type]


# ------------------------------------------------------------------ skip_reason


def test_satisfied_spec_is_not_skipped() -> None:
    spec = make_spec("c", xen=">=4.17", kernel=">=6.1", caps=["hap"], dom0=["pv"])
    assert spec.skip_reason(host()) is None


def test_kernel_too_old() -> None:
    reason = make_spec("c", kernel=">=6.12").skip_reason(host(kernel="6.1.0-50-amd64"))
    assert reason == "needs dom0 kernel >=6.12, host runs 6.1.0-50-amd64"


def test_kernel_new_enough_with_debian_suffix() -> None:
    assert make_spec("c", kernel=">=6.12").skip_reason(host(kernel="6.12.9+deb13-amd64")) is None


def test_xen_out_of_range() -> None:
    spec = make_spec("c", xen=">=4.18,<4.21")
    assert spec.skip_reason(host(xen="4.17.5")) == f"needs Xen {spec.xen}, host runs 4.17.5"
    assert spec.skip_reason(host(xen="4.21.0")) is not None
    assert spec.skip_reason(host(xen="4.20.1")) is None


def test_xen_prerelease_counts() -> None:
    # A development Xen ("4.21-unstable" -> 4.21) is compared, not rejected as a pre-release.
    assert make_spec("c", xen=">=4.21").skip_reason(host(xen="4.21-unstable")) is None


def test_caps_missing_lists_only_missing() -> None:
    reason = make_spec("c", caps=["hap", "iommu_hap_pt_share", "gnttab-v2"]).skip_reason(host())
    assert reason is not None
    assert reason.startswith("needs Xen capabilities iommu_hap_pt_share, gnttab-v2;")
    assert "host has hap, hvm, pv, shadow" in reason


def test_guest_caps_apply_to_their_guest_type_only() -> None:
    spec = make_spec("c", guest_caps={"pv": ["shadow"]})
    no_shadow = host(caps=("hap", "hvm", "pv"))
    assert spec.skip_reason(no_shadow, "pv") == (
        "needs Xen capabilities shadow for a pv guest; host has hap, hvm, pv")
    assert spec.skip_reason(no_shadow, "pvh") is None
    assert spec.skip_reason(host(), "pv") is None  # the default host has shadow
    with pytest.raises(PluginError, match="guest_caps"):
        make_spec("c", guest_caps={"xen": ["shadow"]})


def test_dom0_mode() -> None:
    reason = make_spec("c", dom0=["pvh"]).skip_reason(host(dom0="pv"))
    assert reason == "needs a pvh dom0, host has pv"
    assert make_spec("c", dom0=["pv", "pvh"]).skip_reason(host(dom0="pvh")) is None


def test_first_failing_reason_is_xen() -> None:
    spec = make_spec("c", xen=">=5", kernel=">=7", caps=["nope"], dom0=["pvh"])
    assert spec.skip_reason(host()).startswith("needs Xen >=5")  # type: ignore[union-attr]


# ------------------------------------------------------------------ version_of


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6.1.0-50-amd64", "6.1.0"),
        ("6.12.9+deb13-amd64", "6.12.9"),
        ("4.17.5", "4.17.5"),
        ("4.21-unstable", "4.21"),
        ("  4.17.5-pre\n", "4.17.5"),
        ("6", "6"),
    ],
)
def test_version_of(text: str, expected: str) -> None:
    assert version_of(text) == Version(expected)


def test_version_of_compares_numerically() -> None:
    assert version_of("6.12.0-1-amd64") > version_of("6.1.0-50-amd64")


@pytest.mark.parametrize("text", ["", "unknown", "v4.17", "-1"])
def test_version_of_rejects(text: str) -> None:
    with pytest.raises(PluginError, match="cannot read a version"):
        version_of(text)
