"""gfn -> mfn translation is transparent to dom0.

A dom0 process mapping an HVM/PVH guest's memory passes gfns and Xen walks the
nested page tables (HAP) for it: it must see exactly what the guest's probe
wrote there. A PV guest's frames are MFNs, learned from its p2m. After
`xl save` + `xl restore` the guest's memory lives in new machine frames: the
same gfns still show the same content for HVM/PVH, while for PV the old MFNs
no longer do and the new ones from the p2m do.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from harness.dom0_layout import SAVE_DIR
from harness.guest_logs import Side, check_dir, log_evidence
from harness.plugins import check
from harness.timeouts import QUICK_COMMAND_S, SMALL_COMMAND_S
from harness.xen import XlError, follow_domid


def differences(pages, frames) -> list[str]:
    """Probe pages whose mapped frame does not carry the probe's SHA-256 (one line each).

    ``frames`` are the agent's per-frame results, in the order of ``pages``.
    """
    bad = []
    for page, res in zip(pages, frames, strict=True):
        if res.error != 0 or res.sha256 != page.sha256:
            got = f"error {res.error}" if res.error else f"sha {res.sha256[:16]}"
            bad.append(f"page {page.index:3} frame {res.frame:#10x}: expected {page.sha256[:16]}, got {got}")
    return bad


def content_mismatches(guest, agent, frames: list[int], domid: int | None = None) -> list[str]:
    """Probe pages whose frame does not map to the probe's SHA-256 (one line each)."""
    result = agent.map_foreign(guest.domid if domid is None else domid, frames)
    assert not result.crashed and result.ok, result.raw
    return differences(guest.pages, result.frames)


@check()
def test_probe_pages_map_by_frame(guest, agent):
    bad = content_mismatches(guest, agent, [p.gfn for p in guest.pages])
    assert not bad, f"{guest.type}: {len(bad)} of {len(guest.pages)} pages differ:\n" + "\n".join(bad)


def assert_shift_caught(pages, frames) -> None:
    """The control's verdict: every shifted frame MAPPED, and the real comparison
    (:func:`differences`) reports each one as other content. A frame that failed
    to map is no evidence that the comparison looks at content."""
    unmapped = [f"frame {r.frame:#x}: error {r.error}" for r in frames if r.error != 0]
    assert not unmapped, "shifted frames must map, or the control proves nothing:\n" + "\n".join(unmapped)
    bad = differences(pages, frames)
    assert len(bad) == len(pages), (f"only {len(bad)} of {len(pages)} shifted frames were reported: "
                                    "mapping page i+1's frame for page i must not match")


@check()
def test_negative_control_shifted_frames_are_caught(guest, agent):
    frames = [p.gfn for p in guest.pages]
    result = agent.map_foreign(guest.domid, frames[1:] + frames[:1])
    assert not result.crashed and result.ok, result.raw
    assert_shift_caught(guest.pages, result.frames)


def save_and_restore(guest, xl) -> dict:
    """`xl save` then `xl restore` the guest; refresh its domid; return the timings."""
    path = f"{SAVE_DIR}/{guest.name}.chkpt"
    guest.remote.run_expect(f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])}", timeout=QUICK_COMMAND_S)
    saved = xl.save(guest.name, path)
    old = guest.domid
    try:
        restored = xl.restore(path)
    except XlError as exc:
        # Saved, the old domain is gone: the guest is what the restore created, which a
        # PVH guest's triple fault right after resume can have killed; judge that domain.
        follow_domid(guest, exc.result.stdout + exc.result.stderr)
        raise
    finally:
        guest.remote.run(f"rm -f {shlex.quote(path)}", timeout=SMALL_COMMAND_S)
    follow_domid(guest, restored.stdout + restored.stderr)
    if guest.domid == old:  # the log did not name it
        guest.domid = xl.domid(guest.name)
    assert guest.domid != old, "restore must create a new domain"
    return {"save_s": round(saved.seconds, 2), "restore_s": round(restored.seconds, 2)}


def restored(guest, xl, node, artifacts: Path) -> dict:
    """:func:`save_and_restore`, and the restored guest running. On failure the guest's
    own dom0 logs are its evidence (harness/guest_logs.py) and the device model's last
    lines are added to the failure's text (libxl says only "device model spawn failed")."""
    try:
        timings = save_and_restore(guest, xl)
        dom = xl.domain(guest.name)
        assert dom is not None and dom.running, "the restored guest is not running"
        return timings
    except (XlError, AssertionError) as exc:
        said = log_evidence(node, [Side(getattr(xl.remote, "label", "dom0"), xl.remote)], [guest.name],
                            check_dir(artifacts, node.nodeid))
        if not said:
            raise
        raise AssertionError(f"{exc}\n\n{said}") from exc


@check()
def test_translation_survives_save_restore(own_guest, agent, xl, record_property, request, artifacts_dir):
    guest = own_guest
    before = {p.index: p.gfn for p in guest.pages}
    old_mfns = {p.index: p.mfn for p in guest.pages}
    record_property("save_restore", restored(guest, xl, request.node, artifacts_dir))
    if guest.type != "pv":
        bad = content_mismatches(guest, agent, [before[p.index] for p in guest.pages])
        assert not bad, "same gfns after restore must show the same content:\n" + "\n".join(bad)
        return
    # PV: the frames are machine frames; learn the new ones from the new p2m.
    guest.resolve_mfns(agent.p2m)
    bad = content_mismatches(guest, agent, [p.mfn for p in guest.pages])
    assert not bad, "the new MFNs from the p2m must show the probe's content:\n" + "\n".join(bad)
    moved = [p for p in guest.pages if p.mfn != old_mfns[p.index]]
    record_property("pv_mfns_moved", f"{len(moved)}/{len(guest.pages)}")
    assert moved, "no probe page changed MFN across save/restore: the old-MFN claim is untested"
    stale = agent.map_foreign(guest.domid, [old_mfns[p.index] for p in moved])
    leaks = [f"old mfn {r.frame:#x} still shows page {p.index}"
             for p, r in zip(moved, stale.frames, strict=True)
             if r.error == 0 and r.sha256 == p.sha256]
    assert not leaks, "\n".join(leaks)
