"""harness/xen_compat.py: the direction comes from the booted versions, the rule for each
direction, and every citation checked against the Xen sources it names (the bare mirror);
the plugin's cases and its pre-boot device-model decision."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import xen_compat as xc
from harness.config import HostRecipe
from harness.cross_version import CrossPair
from harness.fixtures.pair import LinkedPair, no_device_model
from harness.inputs import Inputs

MIRROR = Path("/work/.mirror/xen-project+xen/repo")
ALL = sorted({c for rule in (xc.FORWARD_RULE, xc.BACKWARD_RULE) for c in rule.citations},
             key=lambda c: (c.tag, c.path, c.first))


def test_direction_is_the_versions_not_the_order() -> None:
    assert xc.direction("4.17.5", "4.22.0") == xc.FORWARD
    assert xc.direction("4.22.0", "4.17.5") == xc.BACKWARD
    assert xc.direction("4.22.1-pre", "4.22.0") == xc.BACKWARD
    with pytest.raises(xc.SameXen, match="both hosts run Xen 4.17.5: not a cross-version pair"):
        xc.direction("4.17.5", "4.17.5")


def test_forward_is_supported_and_backward_not_promised() -> None:
    assert xc.rule_for("4.17.5", "4.22.0") is xc.FORWARD_RULE and xc.FORWARD_RULE.promise == xc.SUPPORTED
    assert xc.rule_for("4.22.0", "4.17.5") is xc.BACKWARD_RULE and xc.BACKWARD_RULE.promise == xc.NOT_PROMISED
    assert "Mandatory record %#x (%s) not handled" in {c.phrase for c in xc.BACKWARD_RULE.citations}


def test_forward_is_not_promised_when_the_receiver_cannot_read_the_senders_stream(monkeypatch) -> None:
    monkeypatch.setitem(xc.FORMATS, "4.30", xc.StreamFormat(4, (3, 4), 2))
    rule = xc.rule_for("4.30.0", "4.22.0")  # backward anyway
    assert rule is xc.BACKWARD_RULE
    monkeypatch.setitem(xc.FORMATS, "4.16", xc.StreamFormat(1, (1, 1), 2))
    rule = xc.rule_for("4.16.0", "4.22.0")
    assert rule.promise == xc.NOT_PROMISED and "writes v1" in rule.statement


@pytest.mark.skipif(not MIRROR.is_dir() or not shutil.which("git"), reason=f"no Xen mirror at {MIRROR}")
@pytest.mark.parametrize("citation", ALL, ids=lambda c: f"{c.tag}:{c.path}:{c.first}")
def test_each_citation_is_in_the_xen_sources_where_it_says(citation: xc.Citation) -> None:
    text = subprocess.run(["git", "-C", str(MIRROR), "show", f"{citation.tag}:{citation.path}"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    held = "\n".join(text[citation.first - 1:citation.last])
    assert citation.phrase in held, f"{citation.where()} holds:\n{held}"


@pytest.mark.skipif(not MIRROR.is_dir() or not shutil.which("git"), reason=f"no Xen mirror at {MIRROR}")
@pytest.mark.parametrize("minor", range(17, 23))
def test_the_stream_format_table_is_each_releases(minor: int) -> None:
    def show(path: str) -> str:
        return subprocess.run(["git", "-C", str(MIRROR), "show", f"RELEASE-4.{minor}.0:{path}"],
                              capture_output=True, text=True, check=True).stdout

    fmt = xc.FORMATS[f"4.{minor}"]
    assert f".version = htonl({fmt.libxc_writes})" in show("tools/libs/guest/xg_sr_save.c")
    low, high = fmt.libxc_reads
    assert f"ihdr.version < {low} || ihdr.version > {high}" in show("tools/libs/guest/xg_sr_restore.c")
    assert f"RESTORE_STREAM_VERSION       0x{fmt.libxl:08x}U" in show(xc.LIBXL_FORMAT)


def test_a_negative_control_a_wrong_line_is_caught() -> None:
    wrong = xc.Citation("RELEASE-4.17.0", xc.LIBXC_SPEC, 1, 3, "Tools shall support restoring from version")
    if not MIRROR.is_dir():
        pytest.skip(f"no Xen mirror at {MIRROR}")
    text = subprocess.run(["git", "-C", str(MIRROR), "show", f"{wrong.tag}:{wrong.path}"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert wrong.phrase not in "\n".join(text[wrong.first - 1:wrong.last])


# ------------------------------------------------------------------ the plugin's cases


def test_cases_are_pair_guest_type_and_both_directions() -> None:
    from plugins.cross_version import cases

    pair = CrossPair("bookworm", "bookworm-own-dist", ("pv", "pvh"))
    ids = [c.id for c in cases((pair,))]
    assert ids == ["bookworm--bookworm-own-dist-pv-forward", "bookworm--bookworm-own-dist-pv-backward",
                   "bookworm--bookworm-own-dist-pvh-forward", "bookworm--bookworm-own-dist-pvh-backward"]
    control = cases((CrossPair("a", "b", ("hvm", "pvh")),), control=True)
    assert [(c.guest_type, c.direction) for c in control] == [("pvh", xc.FORWARD)]


def recipe(tmp_path: Path, **inputs) -> HostRecipe:
    return HostRecipe(name="r", suite="bookworm", packages=("xen-system-amd64",), path=tmp_path / "r.yaml",
                      inputs=Inputs(**inputs))


def test_no_device_model_is_read_from_the_recipe_before_any_boot(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    (dist / "boot").mkdir(parents=True)
    assert "has no qemu-system-i386" in no_device_model(recipe(tmp_path, xen_dist=str(dist)))
    (dist / "usr/local/lib/xen/bin").mkdir(parents=True)
    (dist / "usr/local/lib/xen/bin/qemu-system-i386").write_text("")
    assert no_device_model(recipe(tmp_path, xen_dist=str(dist))) is None
    assert no_device_model(recipe(tmp_path, device_model=str(tmp_path / "q"))) is None
    assert "qemu-system-xen is not among its packages" in no_device_model(recipe(tmp_path))
    debian = HostRecipe(name="d", suite="bookworm", packages=("qemu-system-xen",), path=tmp_path / "d.yaml")
    assert no_device_model(debian) is None


def test_the_own_dist_on_this_machine_has_no_device_model() -> None:
    dist = Path("/tmp/nx/bxcache/builds/xen-4.22.0")
    if not dist.is_dir():
        pytest.skip(f"no dist tree at {dist}")
    assert "has no qemu-system-i386" in no_device_model(
        HostRecipe(name="own", suite="bookworm", packages=(), path=dist, inputs=Inputs(xen_dist=str(dist))))


def host(name: str, version: str) -> SimpleNamespace:
    return SimpleNamespace(name=name, facts=lambda: SimpleNamespace(xen_version=version))


@pytest.mark.parametrize("order", [("bookworm", "own"), ("own", "bookworm")])
def test_old_and_new_are_the_booted_versions_whatever_the_config_order(order) -> None:
    hosts = {"bookworm": host("b", "4.17.5"), "own": host("o", "4.22.0")}
    old, new = LinkedPair(CrossPair(*order), hosts).by_age()
    assert (old.name, new.name) == ("b", "o")
