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

from harness.imaging import REMOTE_PAYLOAD_DIR
from harness.plugins import check


def content_mismatches(guest, agent, frames: list[int], domid: int | None = None) -> list[str]:
    """Probe pages whose frame does not map to the probe's SHA-256 (one line each)."""
    result = agent.map_foreign(guest.domid if domid is None else domid, frames)
    assert not result.crashed and result.ok, result.raw
    bad = []
    for page, res in zip(guest.pages, result.frames, strict=True):
        if res.error != 0 or res.sha256 != page.sha256:
            got = f"error {res.error}" if res.error else f"sha {res.sha256[:16]}"
            bad.append(f"page {page.index:3} frame {res.frame:#10x}: expected {page.sha256[:16]}, got {got}")
    return bad


@check()
def test_probe_pages_map_by_frame(guest, agent):
    bad = content_mismatches(guest, agent, [p.gfn for p in guest.pages])
    assert not bad, f"{guest.type}: {len(bad)} of {len(guest.pages)} pages differ:\n" + "\n".join(bad)


@check()
def test_negative_control_shifted_frames_are_caught(guest, agent):
    frames = [p.gfn for p in guest.pages]
    shifted = frames[1:] + frames[:1]
    bad = content_mismatches(guest, agent, shifted)
    assert len(bad) == len(frames), "mapping page i+1's frame for page i must not match"


def save_and_restore(guest, xl) -> dict:
    """`xl save` then `xl restore` the guest; refresh its domid; return the timings."""
    path = f"{REMOTE_PAYLOAD_DIR}/save/{guest.name}.chkpt"
    guest.remote.run_expect(f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])}", timeout=30)
    saved = xl.save(guest.name, path)
    restored = xl.restore(path)
    guest.remote.run_expect(f"rm -f {shlex.quote(path)}", timeout=60)
    old = guest.domid
    guest.domid = xl.domid(guest.name)
    assert guest.domid != old, "restore must create a new domain"
    return {"save_s": round(saved.seconds, 2), "restore_s": round(restored.seconds, 2)}


@check()
def test_translation_survives_save_restore(own_guest, agent, xl, record_property):
    guest = own_guest
    before = {p.index: p.gfn for p in guest.pages}
    old_mfns = {p.index: p.mfn for p in guest.pages}
    timings = save_and_restore(guest, xl)
    record_property("save_restore", timings)
    dom = xl.domain(guest.name)
    assert dom is not None and dom.running, "the restored guest is not running"
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
