"""There is no supported interface that maps a raw MFN of an HVM/PVH guest.

The check learns real MFNs of the guest's pages honestly, then tries every
mapping path dom0 userspace has with those MFNs, and asserts none of them
yields the page's content:

- MFNs learned two ways, both recorded in the output:
  * the M2P table, mapped from DOMID_XEN as libxenguest does: every MFN whose
    M2P entry is the probe page's gfn is a candidate. That the candidates hold
    the TRUE MFN is checked against Xen's own printout: the grant-table dump
    (`xl debug-keys g`) names the MFN of each active grant's gfn, and the M2P
    lookup of those gfns must contain those MFNs;
  * the grant dump itself: the guest's granted page with its MFN and gfn.
- Paths tried with each MFN (PATHS): MMAPBATCH_V2, MMAPBATCH (v1) and MMAP
  against the guest's domid; MMAPBATCH_V2 through DOMID_IO, DOMID_XEN,
  DOMID_COW and dom0's own id; /dev/mem at the machine address; an fd
  restricted (IOCTL_PRIVCMD_RESTRICT) to the guest, and one restricted to
  another domain.
- A positive control per path, on the same host in the same check: each path
  is given a frame Xen's rules let it map (the guest's own frame, an M2P frame
  for DOMID_XEN, the BIOS ROM frame 0xf0 for DOMID_IO and /dev/mem). A path
  that maps nothing there (DOMID_COW, dom0's own id and the fd restricted to
  another domain are refused before the frame is looked at) is reported as
  such in the output, the `raw_mfn_paths` property and the run's findings,
  and its refusal is not counted as proof.
- The negative control runs the same detector over the same paths on a PV
  guest, whose frame numbers ARE MFNs: it must report each page as leaked.

Scope: the claim is about privcmd / libxenforeignmemory and /dev/mem from dom0
userspace, on the host that ran (its Xen version and dom0 mode are in the
finding). A PV dom0 *kernel* can still write any MFN into a PTE
(MMU_PT_UPDATE_NO_TRANSLATE), and XEN_DOMCTL_memory_mapping is a toolstack
path; neither is probed.
"""

from __future__ import annotations

import errno
import hashlib
import re
from dataclasses import dataclass

import pytest

from harness.agent.client import devmem_request, map_request, restrict_request
from harness.plugins import check

from ._privcmd_table import DOMID_COW, DOMID_IO, DOMID_XEN, NONEXISTENT_DOMID

ZERO_PAGE_SHA = hashlib.sha256(bytes(4096)).hexdigest()
GRANT_LINE = re.compile(r"\[0x[0-9a-f]+\]\s+\d+\s+0x([0-9a-f]+)\s+0x[0-9a-f]+\s+\d+\s+0x([0-9a-f]+)\s+0x")
# Below 1 MiB and not RAM (the BIOS ROM): Linux's STRICT_DEVMEM lets /dev/mem read it
# (arch/x86/mm/init.c devmem_is_allowed), and Xen hands the first MiB to DOMID_IO
# (xen/arch/x86/mm.c arch_init_memory: share_xen_page_with_guest(.., dom_io, ..)).
LOW_IO_FRAME = 0xF0
PATHS = ("mmapbatch_v2", "mmapbatch_v1", "mmap", "DOMID_IO", "DOMID_XEN", "DOMID_COW",
         "dom0_itself", "/dev/mem", "restricted_fd_own", "restricted_fd_other")
# Paths a gate refuses before it looks at the frame: whatever frame is asked, they map
# nothing, so their refusal of an MFN proves nothing (reported, never counted).
GATED = {
    "DOMID_COW": "no such domain to map from (X get_pg_owner / p2m_add_foreign: -ESRCH)",
    "dom0_itself": "a domain cannot name itself as the foreign domain (X get_pg_owner; "
                   "rcu_lock_remote_domain_by_id: -EPERM)",
    "restricted_fd_other": "the fd is restricted to another domain (L privcmd_ioctl_mmap_batch: "
                           "-EPERM before any frame)",
}
# Per dom0 mode, the paths whose positive control must map (the sources say they can):
# without them the check's refusals would prove nothing, so the check fails. Any other
# path that maps nothing is reported, not failed: a PVH dom0's privcmd, for one, answers
# IOCTL_PRIVCMD_MMAP with -ENOSYS (L privcmd_ioctl_mmap: auto-translated).
MUST_MAP = {
    # DOMID_IO read what /dev/mem read at the BIOS ROM frame on Xen 4.17.5 / Linux 6.1 (bookworm).
    "pv": ("mmapbatch_v2", "mmapbatch_v1", "mmap", "restricted_fd_own", "DOMID_XEN", "DOMID_IO", "/dev/mem"),
    "pvh": ("mmapbatch_v2", "restricted_fd_own"),
}


def grant_mfns(dmesg: str, domid: int) -> list[tuple[int, int]]:
    """(gfn, mfn) pairs of active grants of ``domid`` from a 'g' debug-key dump."""
    pairs, current = [], None
    for line in dmesg.splitlines():
        header = re.search(r"grant-table for remote d(\d+)", line)
        if header:
            current = int(header.group(1))
            continue
        match = GRANT_LINE.search(line)
        if match and current == domid:
            pairs.append((int(match.group(2), 16), int(match.group(1), 16)))
    return pairs


def path_call(path: str, domid: int, frame: int) -> dict:
    """The agent batch call that asks ``path`` for ``frame`` of ``domid``."""
    if path == "/dev/mem":
        return devmem_request(frame * 4096, 4096)
    if path.startswith("restricted_fd"):
        return restrict_request(domid, [frame], domid if path.endswith("own") else NONEXISTENT_DOMID)
    owner = {"DOMID_IO": DOMID_IO, "DOMID_XEN": DOMID_XEN, "DOMID_COW": DOMID_COW, "dom0_itself": 0}
    call = {"mmapbatch_v1": "mmapbatch", "mmap": "mmap"}.get(path, "mmapbatch_v2")
    return map_request(owner.get(path, domid), [frame], call=call)


def raw_mfn_calls(domid: int, mfn: int) -> list[tuple[str, dict]]:
    """Every userspace path that could take a raw MFN, as agent batch calls."""
    return [(path, path_call(path, domid, mfn)) for path in PATHS]


def yielded(answer) -> str | None:
    """The SHA-256 a path produced for its one page, or None when it was refused."""
    if isinstance(answer, dict):  # devmem
        return answer.get("sha256") if answer.get("complete") else None
    if not answer.ok or answer.crashed or not answer.frames:
        return None
    frame = answer.frames[0]
    return frame.sha256 if frame.error in (0, None) else None


def refusal(answer) -> str:
    """How a path said no: the errno name, or the agent's error."""
    if isinstance(answer, dict):
        return str(answer.get("errno_name") or answer.get("error") or "short read")
    if not answer.ok or answer.crashed or not answer.frames:
        return str(answer.errno_name or answer.error or answer.crashed or "no frame")
    err = answer.frames[0].error
    if isinstance(err, int) and err < 0:
        return errno.errorcode.get(-err, str(err))
    return str(answer.errno_name or answer.error or f"per-frame result {err}")  # the ioctl failed whole


def detect(labels: list[tuple[int, int, str, str]], answers: list) -> tuple[list[str], list[str]]:
    """The leak detector: (gfn, mfn, expected sha, path) per answer -> (leaks, log lines)."""
    found, log = [], []
    for (gfn, mfn, sha, name), answer in zip(labels, answers, strict=True):
        got = yielded(answer)
        log.append(f"gfn {gfn:#x} mfn {mfn:#x} via {name}: {'refused' if got is None else 'sha ' + got[:12]}")
        if got is not None and got == sha:
            found.append(f"mfn {mfn:#x} via {name} yielded gfn {gfn:#x}'s content")
    return found, log


def leaks(agent, domid: int, targets: list[tuple[int, int, str]]) -> tuple[list[str], list[str]]:
    """Try every path for each (gfn, mfn, expected sha); return (leaks, log lines)."""
    calls, labels = [], []
    for gfn, mfn, sha in targets:
        for name, call in raw_mfn_calls(domid, mfn):
            calls.append(call)
            labels.append((gfn, mfn, sha, name))
    return detect(labels, agent.batch(calls))


@dataclass(frozen=True)
class PathStatus:
    """What one path's positive control did: the frame it was given and what came back."""

    path: str
    frame: int
    maps: bool
    detail: str  # "content verified", "mapped sha ...", or the refusal

    @property
    def proves(self) -> bool:
        """A refusal by this path means something only if the path can map at all."""
        return self.maps

    def line(self) -> str:
        gate = f"; {GATED[self.path]}" if self.path in GATED and not self.maps else ""
        word = "maps" if self.maps else "maps nothing"
        return f"{self.path:19} frame {self.frame:#x}: {word} ({self.detail}){gate}"


Plan = list[tuple[str, int, int, str | None]]  # (path, domid, frame, expected sha or None)


def allowed_frames(domid: int, frame: int, sha: str, m2p_extent: int) -> Plan:
    """Per path (path, domid, frame, expected sha or None): a frame Xen's rules let it map.

    The guest's own paths get a frame of that guest (a PV guest's MFN, an HVM/PVH gfn);
    DOMID_XEN a frame of the M2P (Xen's own); DOMID_IO and /dev/mem the BIOS ROM frame.
    The gated paths get the guest's frame: no frame would do.
    """
    out: Plan = []
    for path in PATHS:
        if path == "DOMID_XEN":
            out.append((path, domid, m2p_extent, None))
        elif path in ("DOMID_IO", "/dev/mem"):
            out.append((path, domid, LOW_IO_FRAME, None))
        else:
            out.append((path, domid, frame, sha))
    return out


def path_statuses(plan: Plan, answers: list) -> dict[str, PathStatus]:
    """Judge each positive control; DOMID_IO must read what /dev/mem read at the same frame."""
    got = {path: yielded(a) for (path, *_), a in zip(plan, answers, strict=True)}
    out = {}
    for (path, _, frame, sha), answer in zip(plan, answers, strict=True):
        want = got.get("/dev/mem") if path == "DOMID_IO" else sha
        mine = got[path]
        if mine is None:
            out[path] = PathStatus(path, frame, False, f"refused: {refusal(answer)}")
        elif want is not None and mine != want:
            out[path] = PathStatus(path, frame, False, f"mapped sha {mine[:12]}, expected {want[:12]}")
        else:
            detail = "content verified" if want is not None else f"mapped sha {mine[:12]}"
            out[path] = PathStatus(path, frame, True, detail)
    return out


def positive_controls(agent, domid: int, frame: int, sha: str, m2p_extent: int) -> dict[str, PathStatus]:
    plan = allowed_frames(domid, frame, sha, m2p_extent)
    return path_statuses(plan, agent.batch([path_call(p, d, f) for p, d, f, _ in plan]))


def findings(facts, statuses: dict[str, PathStatus], guest_type: str) -> str:
    """What this host showed, with its versions: which paths map, which map nothing."""
    proven = [s.path for s in statuses.values() if s.proves]
    idle = [f"{s.path} ({s.detail})" for s in statuses.values() if not s.proves]
    kernel_path = ("a PV dom0 kernel can write any MFN into a PTE (HYPERVISOR_mmu_update, "
                   "MMU_PT_UPDATE_NO_TRANSLATE)" if facts.dom0_mode == "pv"
                   else "a PVH dom0 has no PV page tables")
    return (f"Xen {facts.xen_version}, {facts.dom0_mode} dom0 (Linux {facts.kernel_release}), "
            f"{guest_type} guest: paths that map where Xen allows it: {', '.join(proven) or 'none'}; "
            f"paths that map nothing here, whose refusal proves nothing: {', '.join(idle) or 'none'}. "
            f"Not probed (kernel or toolstack only): {kernel_path}; XEN_DOMCTL_memory_mapping.")


def report_paths(record_property, statuses: dict[str, PathStatus], text: str) -> None:
    by_path = {s.path: "maps" if s.maps else "maps nothing" for s in statuses.values()}
    record_property("raw_mfn_paths", by_path)
    record_property("finding", text)
    print("positive controls, one per path:\n  " + "\n  ".join(s.line() for s in statuses.values()))
    print(text)


def assert_paths_can_map(statuses: dict[str, PathStatus], dom0_mode: str) -> None:
    broken = [statuses[p].line() for p in MUST_MAP[dom0_mode] if not statuses[p].maps]
    assert not broken, "positive controls failed, so refusals prove nothing:\n" + "\n".join(broken)


def missing_true_mfns(pairs: list[tuple[int, int]], candidates: dict[int, list[int]]) -> list[str]:
    """Xen-printed (gfn, MFN) pairs whose MFN the M2P lookup did not find for that gfn."""
    return [f"gfn {g:#x}: Xen says mfn {m:#x}, M2P candidates {[hex(c) for c in candidates.get(g, [])]}"
            for g, m in pairs if m not in candidates.get(g, [])]


@pytest.fixture(scope="module")
def grant_pairs(guest, xl) -> list[tuple[int, int]]:
    """(gfn, MFN) pairs Xen itself prints for the guest's active grants (debug key 'g')."""
    if guest.type == "pv":
        return []
    xl.debug_keys("g")
    return grant_mfns(xl.dmesg(), guest.domid)


@pytest.fixture(scope="module")
def m2p(guest, agent, grant_pairs):
    # M2P entries hold pfns (PV) or gfns (HVM/PVH): look up the probe pages by pfn,
    # and the granted gfns whose true MFN Xen printed.
    return agent.m2p([p.pfn for p in guest.pages] + [g for g, _ in grant_pairs])


@check(guests=["pv"])
def test_positive_control_m2p_finds_pv_mfns(guest, m2p):
    """For a PV guest the M2P maps each MFN to its pfn: the lookup must find the p2m's MFN."""
    assert m2p.hypercall_rc == 0 and m2p.map_errors == 0, m2p.raw
    missing = [p.index for p in guest.pages if p.mfn not in m2p.candidates.get(p.pfn, [])]
    assert not missing, f"M2P candidates lack the p2m MFN for pages {missing}"


def assert_m2p_has_true_mfns(pairs: list[tuple[int, int]], candidates: dict[int, list[int]]) -> None:
    assert pairs, ("Xen printed no (gfn, MFN) pair for this guest (debug key 'g'): nothing shows "
                   "the M2P candidates contain a true MFN")
    missing = missing_true_mfns(pairs, candidates)
    assert not missing, "the M2P lookup lacks MFNs Xen printed:\n" + "\n".join(missing)


@check(guests=["pvh", "hvm"], caps=["hap"])
def test_m2p_learned_mfns_do_not_map_through_any_path(guest, agent, m2p, grant_pairs, host_facts,
                                                      record_property):
    assert m2p.hypercall_rc == 0 and m2p.map_errors == 0, f"M2P positive control failed: {m2p.raw}"
    # Positive control of the lookup: the MFNs Xen prints for granted gfns are among the candidates.
    assert_m2p_has_true_mfns(grant_pairs, m2p.candidates)
    record_property("m2p_true_mfns", ", ".join(f"{g:#x}->{m:#x}" for g, m in dict.fromkeys(grant_pairs)))
    pages = guest.pages[:4]
    # Positive control of every path: each maps a frame where Xen allows it, or is reported.
    statuses = positive_controls(agent, guest.domid, pages[0].gfn, pages[0].sha256, m2p.extents[0])
    report_paths(record_property, statuses, findings(host_facts, statuses, guest.type))
    assert_paths_can_map(statuses, host_facts.dom0_mode)
    targets = [(p.gfn, mfn, p.sha256) for p in pages for mfn in m2p.candidates.get(p.gfn, [])
               if mfn != p.gfn]
    assert targets, "the M2P gave no candidate MFN for any probe page"
    found, log = leaks(agent, guest.domid, targets)
    record_property("raw_mfn_attempts", len(log))
    print("\n".join(log[:40]) + f"\n... {len(log)} attempts")
    assert not found, "\n".join(found)


@check(guests=["pvh", "hvm"])
def test_grant_learned_mfn_does_not_map_through_any_path(guest, agent, grant_pairs, record_property):
    pairs = [(g, m) for g, m in grant_pairs if g != m]
    if not pairs:
        pytest.skip("the 'g' dump shows no active grant with an MFN for this guest")
    gfn, mfn = pairs[-1]
    page = agent.map_foreign(guest.domid, [gfn]).frames[0]
    assert page.error == 0, "positive control: the granted page must map by its gfn"
    if page.sha256 == ZERO_PAGE_SHA:
        pytest.skip(f"granted page gfn {gfn:#x} is all zeros: a leak could not be told from any zero page")
    found, log = leaks(agent, guest.domid, [(gfn, mfn, page.sha256)])
    record_property("grant_gfn_mfn", f"{gfn:#x}->{mfn:#x}")
    print("\n".join(log))
    assert not found, "\n".join(found)


@check(guests=["pvh", "hvm"])
def test_positive_control_restricted_fd_maps_its_own_domain(guest, agent):
    own = agent.restrict_then_map(guest.domid, [guest.pages[0].gfn], guest.domid)
    assert own.frames[0].error == 0 and own.frames[0].sha256 == guest.pages[0].sha256
    other = agent.restrict_then_map(guest.domid, [guest.pages[0].gfn], NONEXISTENT_DOMID)
    assert other.rc == -1 and other.errno_name == "EPERM", other.raw


# The paths that take a PV guest's MFN as its frame number: each must report the leak.
PV_FRAME_PATHS = ("mmapbatch_v2", "mmapbatch_v1", "mmap", "restricted_fd_own")


def assert_leak_reported(found: list[str], targets: list[tuple[int, int, str]]) -> None:
    """Every PV-frame path must have reported every target's page as leaked."""
    missed = [f"mfn {mfn:#x} via {path}" for _, mfn, _ in targets for path in PV_FRAME_PATHS
              if f"mfn {mfn:#x} via {path} yielded" not in "\n".join(found)]
    assert not missed, "the leak detector did not report:\n" + "\n".join(missed)


@check(guests=["pv"])
def test_negative_control_a_leak_would_be_caught(guest, agent, record_property):
    """A PV guest's frame number IS its MFN: the same detector, given real MFNs of real
    pages through the same paths, must report each page as leaked."""
    targets = [(p.pfn, p.mfn, p.sha256) for p in guest.pages[:2]]
    found, log = leaks(agent, guest.domid, targets)
    record_property("pv_mfn_leaks_reported", len(found))
    print("\n".join(log))
    assert_leak_reported(found, targets)
