"""The one source of truth for what IOCTL_PRIVCMD_MMAPBATCH_V2 answers, per frame.

A row says: for this dom0 mode and guest type, frames of this class give this
per-frame result (0 = mapped, or a negative errno) with the ioctl itself
returning ``rc``. Frames are computed from the live guest (its probe pages,
its memory size, its p2m), never hard-coded addresses of one run.

Sources (line numbers as read in Linux 6.1.192 / Xen 4.17.0; the functions
are the same in Linux 6.12 and Xen 4.20):
- L: linux drivers/xen/privcmd.c   X: xen/arch/x86/mm.c   T: tools/libs/guest/xg_dom_x86.c
- L privcmd_ioctl_mmap_batch() 457-593: per-frame errors are written back as -errno (v2,
  mmap_return_error 382-412); the ioctl returns 0 unless every error is -ENOENT (583-584).
- L 494-495: ``if (m.num <= 0) return -EINVAL`` -> an empty batch fails the whole ioctl.
- X get_pg_owner() (4.17 ~4029): unknown domid -> -ESRCH for every frame (the domain lookup
  happens per mmu_update batch); DOMID_COW and dom0's own id are refused the same way.
- X mod_l1_entry() 2163-2195: for a translated (HVM/PVH) guest the frame is a gfn looked up
  with get_page_from_gfn(); no RAM page there (beyond memory, MMIO like the VGA hole, an
  unpopulated special page) -> -EINVAL.
- X get_page_from_l1e() 882-905: for a PV guest the frame is an MFN; a frame that is not
  RAM takes the MMIO path and the guest has no iomem permission -> -EPERM.
- X get_page_from_l1e() 976-992 + could_not_pin 1039-1046: RAM owned by another domain
  (or free) cannot be pinned for this one -> -EBUSY. DOMID_IO/DOMID_XEN as the owner of
  a guest's RAM frame fail the same way.
- T: HVM/PVH special pages end at 0xff000: 8 special pages (console, xenstore, paging,
  access, sharing, ident PT, bufioreq, ioreq) at 0xfeff8-0xfefff, and below them 8 ioreq
  server pages 0xfeff0-0xfeff7 that are populated only when the guest has a device model
  (HVM), so a PVH guest answers -EINVAL there.

The dom0 mode is a dimension of its own. A PV dom0 maps a foreign frame by building a PTE
and asking Xen to write it (mmu_update); a PVH dom0 is auto-translated, and privcmd maps
the frame into its own physmap instead. Sources for a PVH dom0 (read in Linux 6.12 /
Xen 4.20):
- L include/xen/xen-ops.h xen_remap_domain_gfn_array(): ``if (xen_feature(
  XENFEAT_auto_translated_physmap)) return xen_xlate_remap_gfn_array(...)``.
- L drivers/xen/xlate_mmu.c remap_pte_fn(): one XENMEM_add_to_physmap_range with
  ``.space = XENMAPSPACE_gmfn_foreign``; each frame goes to Xen as a 64-bit idx
  (setup_hparams: ``h_idxs[..] = *info->fgfn``) and its error is Xen's ``errs[i]``.
- X xen/arch/x86/mm/p2m.c p2m_add_foreign() (called from xenmem_add_to_physmap_one for
  XENMAPSPACE_gmfn_foreign): ``rcu_lock_remote_domain_by_id()`` -> -ESRCH for no such
  domain (DOMID_COW is none) and -EPERM for the caller itself (xen/common/domain.c:
  ``if ( *d == current->domain ) ... return -EPERM``); then
  ``page = get_page_from_gfn(fdom, fgfn, ...); if ( !page ) rc = -EINVAL``.
- X xen/arch/x86/include/asm/p2m.h get_page_from_gfn(): for a PV (non-translated) guest
  the frame is an MFN and ``return mfn_valid(..) && get_page(page, d) ? page : NULL``:
  a frame that is not RAM the guest owns (MMIO, beyond host RAM, another domain's RAM)
  is -EINVAL, where a PV dom0 gets -EPERM or -EBUSY from get_page_from_l1e.
Observed on Xen 4.20.4 + Linux 6.12.117 (trixie) with PV and PVH guests: every row below
held under both dom0 modes; the HVM rows under a PVH dom0 follow the same source but have
not been run yet (NEVER_RUN), and are reported, not asserted, there.

Rows added later (DOMID_XEN/IO/SELF with a guest's MFN, a guest's MFN as a gfn, the LAPIC
frame, reserved domids) cite Xen by tag; a row's ``observed`` lists the dom0 modes a run
has observed it under. A row not observed under a dom0 mode states the source's
prediction in ``why`` and the check reports what it got instead of asserting it.
- X4.17 = RELEASE-4.17.0, X4.20 = RELEASE-4.20.0.
- X xen/common/page_alloc.c get_pg_owner() (X4.17 2665-2693, X4.20 2881-2909): DOMID_IO and
  DOMID_XEN give dom_io/dom_xen; any other id goes to rcu_lock_domain_by_any_id(), which
  resolves DOMID_SELF to the caller (dom0) and looks every other id up in domain_hash.
- X xen/common/domain.c domain_create() (X4.17 653 "DOMID_{XEN,IO,etc} (other than IDLE) are
  sufficiently constructed" + 656 "if ( !is_idle_domain(d) )"; X4.20 772 "DOMID_{XEN,IO,IDLE,
  etc} are sufficiently constructed"): system domains never enter domain_hash, so every id
  from DOMID_FIRST_RESERVED (0x7FF0) up to DOMID_MASK (0x7FFF, DOMID_IDLE) other than
  SELF/IO/XEN is "Unknown domain" -> -ESRCH (xen/include/public/xen.h X4.17 562-602).
- X xen/arch/x86/mm.c get_page_from_l1e() (X4.17 976-992, X4.20 975-991): a guest's RAM page
  asked with pg_owner dom0 (DOMID_SELF: pg_owner == l1e_owner), dom_xen or dom_io
  (xsm_priv_mapping: neither is a control domain) goes to could_not_pin -> -EBUSY.
- X xen/arch/x86/mm/p2m.c p2m_get_page_from_gfn() (X4.17 381, X4.20 375 "Error path: not a
  suitable GFN at all"): a gfn that is not RAM in the guest's p2m, such as the LAPIC page
  0xfee00 (emulated by Xen, no RAM behind it) -> NULL -> mod_l1_entry -EINVAL
  (X4.17 2194-2195, X4.20 2213-2214).
- X p2m_add_foreign() (X4.17 p2m.c 2355-2378, X4.20 p2m.c 1871-1894), for the PVH dom0
  predictions: DOMID_XEN -> dom_xen then get_page_from_gfn(dom_xen, mfn) -> -EINVAL; any other
  id -> rcu_lock_remote_domain_by_id() (X4.17 domain.c 892-897), which does not resolve
  DOMID_SELF -> -ESRCH.
Observed under a PV dom0 (2026-12-06, tox -e nested-xen -- plugins/privcmd_mmapbatch.py
--nx-config configs/bookworm-trixie.yaml, 30 passed) on Xen 4.17.5 + Linux 6.1.0-50 (bookworm)
and Xen 4.20.5 + Linux 6.12.117 (trixie), PV, PVH and HVM guests: every added row held, the
same on both versions (no row needs a version split). DOMID_XEN/IO/SELF with the guest's
MFN: -EBUSY; the PVH/HVM guest's MFN (0xb8851..0xbffba, from the grant dump) as a gfn:
-EINVAL; gfn 0xfee00: -EINVAL; domids 0x7ff4, 0x7ff5, 0x7ff6, 0x7ffe, 0x7fff, 0x8000: -ESRCH.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

EINVAL, EPERM, EBUSY, ESRCH = -errno.EINVAL, -errno.EPERM, -errno.EBUSY, -errno.ESRCH

NONEXISTENT_DOMID = 0x7FEF  # below DOMID_FIRST_RESERVED, never handed out by these runs
DOMID_IO, DOMID_XEN, DOMID_COW = 0x7FF1, 0x7FF2, 0x7FF3
VGA_HOLE = (0xA0, 0xBF)
SPECIAL_END = 0xFF000
IOREQ_SERVER_PAGES = range(SPECIAL_END - 16, SPECIAL_END - 8)
SPECIAL_PAGES = range(SPECIAL_END - 8, SPECIAL_END)
LARGE_BATCH = 16384
DOMID_SELF = 0x7FF0  # DOMID_FIRST_RESERVED
LAPIC_FRAME = 0xFEE00  # APIC_DEFAULT_PHYS_BASE >> 12
# DOMID_INVALID, the unnamed reserved ids, DOMID_IDLE == DOMID_MASK, and one past the mask.
RESERVED_DOMIDS = (0x7FF4, 0x7FF5, 0x7FF6, 0x7FFE, 0x7FFF, 0x8000)
NOT_OBSERVED = "not observed"
# (dom0 mode, guest type) that no run has observed at all: every row is a prediction there.
NEVER_RUN = frozenset({("pvh", "hvm")})


@dataclass(frozen=True)
class Frames:
    """What a class asks: a domid (None = the guest's) and the frames."""

    frames: list[int]
    domid: int | None = None


@dataclass(frozen=True)
class Row:
    cls: str
    guests: tuple[str, ...]
    frames: Callable[..., Frames]
    expect: int | list[int] | Callable[..., list[int]]
    rc: int = 0
    why: str = ""
    dom0: tuple[str, ...] = ("pv", "pvh")  # the dom0 modes this row holds for
    observed: tuple[str, ...] = ("pv", "pvh")  # the dom0 modes a run has observed it under
    needs: str = ""  # a context key the frames need ("guest_mfn"); without it the row is not asked

    def expected(self, guest, asked: Frames) -> list[int]:
        if callable(self.expect):
            return self.expect(guest, asked)
        if isinstance(self.expect, list):
            return list(self.expect)
        return [self.expect] * len(asked.frames)


def _pages(guest) -> int:
    return guest.spec.memory_mb * 256


def _foreign_ram(guest, p2m_all: dict[int, int]) -> list[int]:
    """Two RAM MFNs the PV guest does not own (dom0's or free), near its own frames."""
    own = set(p2m_all.values())
    start = min(own)
    picks = [m for m in range(start - 4096, start) if m > 0x1000 and m not in own][-2:]
    return picks


def _large_translated(guest, asked: Frames) -> list[int]:
    lo, hi = VGA_HOLE
    if guest.type == "hvm":
        return [EINVAL if lo <= f <= hi else 0 for f in asked.frames]
    return [0] * len(asked.frames)


T = ("pvh", "hvm")
PV_DOM0, PVH_DOM0 = ("pv",), ("pvh",)


def _non_ram_low(g, ctx) -> Frames:
    return Frames([0, VGA_HOLE[0], 0xF0])


def _beyond_host_ram(g, ctx) -> Frames:
    return Frames([0x10000000])


def _foreign(g, ctx) -> Frames:
    return Frames(_foreign_ram(g, ctx["p2m"]))


def _mixed_pv(g, ctx) -> Frames:
    return Frames([g.pages[0].mfn, _foreign_ram(g, ctx["p2m"])[0], g.pages[1].mfn])


def _dom0_itself(g, ctx) -> Frames:
    return Frames([g.pages[0].gfn], 0)


def translated_result(guest, frame: int) -> int:
    """What get_page_from_gfn finds at gfn ``frame`` of a PVH/HVM guest: the layout the
    translated rows above observe (RAM below the memory size but HVM's VGA hole, the
    special pages, HVM's ioreq server pages), -EINVAL anywhere else."""
    if frame in SPECIAL_PAGES:
        return 0
    if frame in IOREQ_SERVER_PAGES:
        return 0 if guest.type == "hvm" else EINVAL
    lo, hi = VGA_HOLE
    if frame >= _pages(guest) or (guest.type == "hvm" and lo <= frame <= hi):
        return EINVAL
    return 0


def _mfn_as_gfn(guest, asked: Frames) -> list[int]:
    return [translated_result(guest, f) for f in asked.frames]


def _guest_mfn_via(domid: int | None) -> Callable[..., Frames]:
    """The MFN of a page the guest owns (ctx["guest_mfn"] = (gfn, mfn)), asked of ``domid``."""
    return lambda g, ctx: Frames([ctx["guest_mfn"][1]], domid)


def _reserved(domid: int) -> Callable[..., Frames]:
    return lambda g, ctx: Frames([g.pages[0].gfn], domid)


def is_observed(row: Row, guest_type: str, dom0_mode: str) -> bool:
    """Has a run observed this row for this guest type under this dom0 mode?"""
    return dom0_mode in row.observed and (dom0_mode, guest_type) not in NEVER_RUN


ALL = ("pv", "pvh", "hvm")
_UNSEEN = f"{NOT_OBSERVED} under a PVH dom0; the source predicts it:"

ROWS: list[Row] = [
    # ------------------------------------------------------- translated guests: frames are gfns
    Row("valid", T, lambda g, ctx: Frames([g.pages[0].gfn]), 0, why="a probe page"),
    Row("first", T, lambda g, ctx: Frames([0]), 0, why="gfn 0 is RAM"),
    Row("last", T, lambda g, ctx: Frames([_pages(g) - 1]), 0, why="last gfn of guest memory"),
    Row("one_past_end", T, lambda g, ctx: Frames([_pages(g)]), EINVAL, why="X mod_l1_entry: no page"),
    Row("far_beyond", T, lambda g, ctx: Frames([0x10000000]), EINVAL, why="X mod_l1_entry: no page"),
    Row("vga_hole", ("hvm",), lambda g, ctx: Frames(list(range(VGA_HOLE[0], VGA_HOLE[1] + 1))),
        EINVAL, why="X mod_l1_entry: MMIO (device model), not RAM"),
    Row("vga_range_ram", ("pvh",), lambda g, ctx: Frames([VGA_HOLE[0], VGA_HOLE[1]]), 0,
        why="PVH has no VGA hole: RAM"),
    Row("ioreq_server_pages", ("hvm",), lambda g, ctx: Frames(list(IOREQ_SERVER_PAGES)), 0,
        why="T: populated when there is a device model"),
    Row("ioreq_server_pages", ("pvh",), lambda g, ctx: Frames(list(IOREQ_SERVER_PAGES)), EINVAL,
        why="T: no device model, never populated"),
    Row("special_pages", T, lambda g, ctx: Frames(list(SPECIAL_PAGES)), 0,
        why="T: console, xenstore, ... pages are populated RAM"),
    Row("mixed", T, lambda g, ctx: Frames([g.pages[0].gfn, _pages(g), g.pages[1].gfn]),
        [0, EINVAL, 0], why="valid frames still map beside a bad one"),
    Row("large_batch", T, lambda g, ctx: Frames(list(range(LARGE_BATCH))), _large_translated,
        why="every RAM gfn below 64 MiB maps; HVM's VGA hole does not"),
    # ------------------------------------------------------- PV guests: frames are MFNs
    Row("valid", ("pv",), lambda g, ctx: Frames([g.pages[0].mfn]), 0, why="a probe page's MFN"),
    Row("first", ("pv",), lambda g, ctx: Frames([ctx["p2m"][0]]), 0, why="MFN of pfn 0"),
    Row("last", ("pv",), lambda g, ctx: Frames([ctx["p2m"][_pages(g) - 1]]), 0,
        why="MFN of the last pfn"),
    Row("non_ram_low", ("pv",), _non_ram_low, EPERM, dom0=PV_DOM0,
        why="X get_page_from_l1e: not RAM -> MMIO path, no iomem permission"),
    Row("non_ram_low", ("pv",), _non_ram_low, EINVAL, dom0=PVH_DOM0,
        why="X get_page_from_gfn (PV guest): not a page the guest owns -> p2m_add_foreign -EINVAL"),
    Row("beyond_host_ram", ("pv",), _beyond_host_ram, EPERM, dom0=PV_DOM0,
        why="X get_page_from_l1e: no such MFN -> MMIO path, no iomem permission"),
    Row("beyond_host_ram", ("pv",), _beyond_host_ram, EINVAL, dom0=PVH_DOM0,
        why="X get_page_from_gfn (PV guest): !mfn_valid -> p2m_add_foreign -EINVAL"),
    Row("foreign_ram", ("pv",), _foreign, EBUSY, dom0=PV_DOM0,
        why="X could_not_pin: RAM owned by another domain"),
    Row("foreign_ram", ("pv",), _foreign, EINVAL, dom0=PVH_DOM0,
        why="X get_page_from_gfn (PV guest): get_page(page, guest) fails -> p2m_add_foreign -EINVAL"),
    Row("mixed", ("pv",), _mixed_pv, [0, EBUSY, 0], dom0=PV_DOM0,
        why="valid frames still map beside a bad one"),
    Row("mixed", ("pv",), _mixed_pv, [0, EINVAL, 0], dom0=PVH_DOM0,
        why="valid frames still map beside a bad one"),
    Row("large_batch", ("pv",),
        lambda g, ctx: Frames([ctx["p2m"][p] for p in range(LARGE_BATCH)]), 0,
        why="the guest's own MFNs for pfns below 64 MiB all map"),
    # ------------------------------------------------------- every guest type
    Row("nonexistent_domid", ("pv", *T), lambda g, ctx: Frames([g.pages[0].gfn], NONEXISTENT_DOMID),
        ESRCH, why="X get_pg_owner: no such domain"),
    Row("dom_cow", ("pv", *T), lambda g, ctx: Frames([g.pages[0].gfn], DOMID_COW), ESRCH,
        why="X get_pg_owner: DOMID_COW is not a page owner for mapping"),
    Row("dom0_itself", ("pv", *T), _dom0_itself, ESRCH, dom0=PV_DOM0,
        why="X get_pg_owner: 'Cannot specify itself'"),
    Row("dom0_itself", ("pv", *T), _dom0_itself, EPERM, dom0=PVH_DOM0,
        why="X p2m_add_foreign: rcu_lock_remote_domain_by_id: *d == current->domain -> -EPERM"),
    Row("empty_batch", ("pv", *T), lambda g, ctx: Frames([]), [], rc=-errno.EINVAL,
        why="L 494-495: num <= 0"),
    # ------------------------------------------------------- a page the guest owns, by its MFN,
    # asked of Xen's own owners and of dom0 (PV: the probe page; PVH/HVM: Xen's grant dump)
    Row("domid_xen_guest_mfn", ALL, _guest_mfn_via(DOMID_XEN), EBUSY, dom0=PV_DOM0, observed=PV_DOM0,
        needs="guest_mfn", why="X get_page_from_l1e: owner is the guest, not dom_xen; xsm_priv_mapping"
        "(dom_xen) refuses -> could_not_pin"),
    Row("domid_xen_guest_mfn", ALL, _guest_mfn_via(DOMID_XEN), EINVAL, dom0=PVH_DOM0, observed=(),
        needs="guest_mfn", why=f"X {_UNSEEN} p2m_add_foreign: get_page_from_gfn(dom_xen, mfn) fails"),
    Row("domid_io_guest_mfn", ALL, _guest_mfn_via(DOMID_IO), EBUSY, dom0=PV_DOM0, observed=PV_DOM0,
        needs="guest_mfn", why="X get_page_from_l1e: RAM owned by the guest, not dom_io (no MMIO path); "
        "xsm_priv_mapping(dom_io) refuses -> could_not_pin"),
    Row("domid_io_guest_mfn", ALL, _guest_mfn_via(DOMID_IO), ESRCH, dom0=PVH_DOM0, observed=(),
        needs="guest_mfn", why=f"X {_UNSEEN} rcu_lock_remote_domain_by_id: dom_io is not in domain_hash"),
    Row("domid_self_guest_mfn", ALL, _guest_mfn_via(DOMID_SELF), EBUSY, dom0=PV_DOM0, observed=PV_DOM0,
        needs="guest_mfn", why="X get_pg_owner: DOMID_SELF -> dom0; get_page_from_l1e: pg_owner == "
        "l1e_owner -> could_not_pin"),
    Row("domid_self_guest_mfn", ALL, _guest_mfn_via(DOMID_SELF), ESRCH, dom0=PVH_DOM0, observed=(),
        needs="guest_mfn", why=f"X {_UNSEEN} rcu_lock_remote_domain_by_id does not resolve DOMID_SELF"),
    Row("guest_mfn_as_gfn", T, _guest_mfn_via(None), _mfn_as_gfn, observed=PV_DOM0, needs="guest_mfn",
        why="X mod_l1_entry: get_page_from_gfn(guest, mfn as a gfn): RAM there maps another page, "
        "else -EINVAL (PVH dom0, not observed: p2m_add_foreign, the same lookup)"),
    Row("lapic", T, lambda g, ctx: Frames([LAPIC_FRAME]), EINVAL, observed=PV_DOM0,
        why="X p2m_get_page_from_gfn: the emulated LAPIC page is not RAM -> NULL -> mod_l1_entry "
        "-EINVAL (PVH dom0, not observed: p2m_add_foreign -EINVAL)"),
    *[Row(f"reserved_domid_{d:#x}", ALL, _reserved(d), ESRCH, observed=PV_DOM0,
          why="X get_pg_owner -> rcu_lock_domain_by_any_id: no reserved id is in domain_hash "
          "(domain_create) -> 'Unknown domain' (PVH dom0, not observed: rcu_lock_remote_domain_by_id -ESRCH)")
      for d in RESERVED_DOMIDS],
]


def rows_for(guest_type: str, dom0_mode: str) -> list[Row]:
    return [r for r in ROWS if guest_type in r.guests and dom0_mode in r.dom0]


def row_for(cls: str, guest_type: str, dom0_mode: str) -> Row | None:
    """The row of one class for this guest type under this dom0 mode, if the table has one."""
    return next((r for r in rows_for(guest_type, dom0_mode) if r.cls == cls), None)


def differing(guest_type: str) -> list[tuple[Row, Row]]:
    """(PV-dom0 row, PVH-dom0 row) for every class whose expectation depends on the dom0 mode."""
    out = []
    for pv in rows_for(guest_type, "pv"):
        pvh = row_for(pv.cls, guest_type, "pvh")
        if pvh is not None and pvh is not pv:
            out.append((pv, pvh))
    return out
