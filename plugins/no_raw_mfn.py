"""There is no supported interface that maps a raw MFN of an HVM/PVH guest.

The check learns real MFNs of the guest's pages honestly, then tries every
mapping path dom0 userspace has with those MFNs, and asserts none of them
yields the page's content:

- The pages attacked are the guest's granted pages: the only pages of an HVM/PVH
  guest whose true MFN Xen itself prints (the grant-table dump, `xl debug-keys g`,
  names the MFN of each active grant's gfn). Their MFNs are learned two ways:
  * the M2P table, mapped from DOMID_XEN as libxenguest does: every MFN whose
    M2P entry is the gfn is a candidate, and every candidate is attacked. The
    proof covers exactly the attacked pages: the M2P answer must be complete
    (the whole table below max_page scanned) and not truncated for those gfns
    (more matches than max_candidates), and each gfn's candidates must contain
    the MFN Xen printed for it. A granted page that is all zeros is left out
    (a leak could not be told from any other zero page), saying so;
  * the grant dump itself: the guest's granted page with its MFN and gfn.
- Paths tried with each MFN (PATHS): MMAPBATCH_V2, MMAPBATCH (v1) and MMAP
  against the guest's domid; MMAPBATCH_V2 through DOMID_IO, DOMID_XEN,
  DOMID_COW and dom0's own id; /dev/mem at the machine address; an fd
  restricted (IOCTL_PRIVCMD_RESTRICT) to the guest, and one restricted to
  another domain.
- A positive control per path, on the same host in the same check: each path
  is given a frame Xen's rules let it map (the guest's own frame, an M2P frame
  for DOMID_XEN, the BIOS ROM frame 0xf0 for DOMID_IO). A path that maps
  nothing there (DOMID_COW, dom0's own id and the fd restricted to another
  domain are refused before the frame is looked at) is reported as such in the
  output, the `raw_mfn_paths` property and the run's findings, and its refusal
  is not counted as proof.
- /dev/mem is not an MFN path, and its refusals are not counted as proof either.
  Linux, not Xen, decides it: read_mem() refuses an address beyond dom0's own
  memory (valid_phys_addr_range: EFAULT) and, with STRICT_DEVMEM, any System RAM
  above 1 MiB (arch/x86/mm/init.c devmem_is_allowed: EPERM) before Xen is asked;
  and the address is dom0's own physical one (a PV dom0's pseudo-physical
  frame, a PVH dom0's gfn), which is an MFN only where dom0's p2m is the
  identity (non-RAM). Its control reads the BIOS ROM frame 0xf0 (below 1 MiB, not
  RAM: allowed) and shows only that the device reads there; DOMID_IO must read the
  same bytes at the same frame. Each /dev/mem attempt on a target is attributed
  to the rule that refused it, read from dom0's /proc/iomem and the errno (the
  `devmem_refusals` property): what it proves is that dom0's Linux does not hand
  that address out, nothing about Xen. A read that yields the page is still a leak.
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

from harness import dom0_layout as layout
from harness.agent.client import devmem_request, map_request, restrict_request
from harness.plugins import check

from ._privcmd_table import DOMID_COW, DOMID_IO, DOMID_XEN, NONEXISTENT_DOMID

ZERO_PAGE_SHA = hashlib.sha256(bytes(4096)).hexdigest()
GRANT_LINE = re.compile(r"\[0x[0-9a-f]+\]\s+\d+\s+0x([0-9a-f]+)\s+0x[0-9a-f]+\s+\d+\s+0x([0-9a-f]+)\s+0x")
# Below 1 MiB and not RAM (the BIOS ROM): Linux's STRICT_DEVMEM lets /dev/mem read it
# (arch/x86/mm/init.c devmem_is_allowed), and Xen hands the first MiB to DOMID_IO
# (xen/arch/x86/mm.c arch_init_memory: share_xen_page_with_guest(.., dom_io, ..)).
LOW_IO_FRAME = 0xF0
DEVMEM = layout.DEVMEM  # a path to a frame, and its label
SYSTEM_RAM = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) : System RAM\s*$")
PATHS = ("mmapbatch_v2", "mmapbatch_v1", "mmap", "DOMID_IO", "DOMID_XEN", "DOMID_COW",
         "dom0_itself", DEVMEM, "restricted_fd_own", "restricted_fd_other")
# Paths a gate refuses before it looks at the frame: whatever frame is asked, they map
# nothing, so their refusal of an MFN proves nothing (reported, never counted).
GATED = {
    "DOMID_COW": "no such domain to map from (X get_pg_owner / p2m_add_foreign: -ESRCH)",
    "dom0_itself": "a domain cannot name itself as the foreign domain (X get_pg_owner; "
                   "rcu_lock_remote_domain_by_id: -EPERM)",
    "restricted_fd_other": "the fd is restricted to another domain (L privcmd_ioctl_mmap_batch: "
                           "-EPERM before any frame)",
}
# Paths whose refusal proves nothing about Xen even where their control maps.
NOT_PROOF = {
    **GATED,
    DEVMEM: f"Linux decides {DEVMEM}: read_mem refuses RAM above 1 MiB (STRICT_DEVMEM: EPERM) and "
            "addresses beyond dom0's memory (EFAULT) before Xen is asked; the address is dom0's "
            "own physical one, an MFN only where dom0's p2m is the identity",
}
# Per dom0 mode, the paths whose positive control must map (the sources say they can):
# without them the check's refusals would prove nothing, so the check fails. Any other
# path that maps nothing is reported, not failed: a PVH dom0's privcmd, for one, answers
# IOCTL_PRIVCMD_MMAP with -ENOSYS (L privcmd_ioctl_mmap: auto-translated).
MUST_MAP = {
    # DOMID_IO read what /dev/mem read at the BIOS ROM frame on Xen 4.17.5 / Linux 6.1 (bookworm);
    # /dev/mem must read there for DOMID_IO's content to be checked.
    "pv": ("mmapbatch_v2", "mmapbatch_v1", "mmap", "restricted_fd_own", "DOMID_XEN", "DOMID_IO", DEVMEM),
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
    if path == DEVMEM:
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


def leaks(agent, domid: int, targets: list[tuple[int, int, str]]) -> tuple[list[str], list[str], list]:
    """Try every path for each (gfn, mfn, expected sha); return (leaks, log lines, and the
    (mfn, answer) of each /dev/mem attempt)."""
    calls, labels = [], []
    for gfn, mfn, sha in targets:
        for name, call in raw_mfn_calls(domid, mfn):
            calls.append(call)
            labels.append((gfn, mfn, sha, name))
    answers = agent.batch(calls)
    found, log = detect(labels, answers)
    devmem = [(label[1], a) for label, a in zip(labels, answers, strict=True) if label[3] == DEVMEM]
    return found, log, devmem


def system_ram(iomem: str) -> list[tuple[int, int]]:
    """(first, last) byte of each "System RAM" range of /proc/iomem (read as root)."""
    return [(int(m.group(1), 16), int(m.group(2), 16))
            for m in map(SYSTEM_RAM.match, iomem.splitlines()) if m]


def devmem_layer(address: int, answer: dict, ram: list[tuple[int, int]]) -> str:
    """Which rule of Linux's read_mem (drivers/char/mem.c) refused ``address``, as far as
    dom0's /proc/iomem and the errno show it; or what happened when no rule explains it."""
    within = next(((lo, hi) for lo, hi in ram if lo <= address <= hi), None)
    err = answer.get("errno_name")
    if err == "EPERM":  # only page_is_allowed() -> devmem_is_allowed() answers EPERM in read_mem
        where = (f"System RAM {within[0]:#x}-{within[1]:#x} in dom0's {layout.PROC_IOMEM}" if within
                 else f"not System RAM in dom0's {layout.PROC_IOMEM} (an exclusive region: IO_STRICT_DEVMEM)")
        return f"{address:#x}: Linux STRICT_DEVMEM (devmem_is_allowed: EPERM), {where}; Xen not asked"
    if err == "EFAULT" and ram and address > max(hi for _, hi in ram):
        return (f"{address:#x}: Linux read_mem (valid_phys_addr_range: EFAULT), beyond dom0's memory "
                f"(its last System RAM byte is {max(hi for _, hi in ram):#x}); Xen not asked")
    if answer.get("complete"):
        sha = str(answer.get("sha256"))[:12]
        return f"{address:#x}: read, sha {sha} (dom0's own physical address there, not the MFN)"
    return (f"{address:#x}: refused ({refusal(answer)}) by no rule this check can name "
            f"({'inside' if within else 'outside'} dom0's System RAM): the layer is not established")


def devmem_refusals(devmem: list, iomem: str) -> list[str]:
    """One line per /dev/mem attempt on a target MFN: the rule that refused it."""
    ram = system_ram(iomem)
    return [devmem_layer(mfn * 4096, answer, ram) for mfn, answer in devmem]


@dataclass(frozen=True)
class PathStatus:
    """What one path's positive control did: the frame it was given and what came back."""

    path: str
    frame: int
    maps: bool
    detail: str  # "content verified", "mapped sha ...", or the refusal

    @property
    def proves(self) -> bool:
        """A refusal by this path means something only if the path can map at all, and
        only if Xen is the one that refuses (not so for /dev/mem)."""
        return self.maps and self.path not in NOT_PROOF

    def line(self) -> str:
        why = f"; {NOT_PROOF[self.path]}" if self.path in NOT_PROOF and not self.proves else ""
        word = "maps" if self.maps else "maps nothing"
        return f"{self.path:19} frame {self.frame:#x}: {word} ({self.detail}){why}"


Plan = list[tuple[str, int, int, str | None]]  # (path, domid, frame, expected sha or None)


def allowed_frames(domid: int, frame: int, sha: str, m2p_extent: int) -> Plan:
    """Per path (path, domid, frame, expected sha or None): a frame Xen's rules let it map.

    The guest's own paths get a frame of that guest (a PV guest's MFN, an HVM/PVH gfn);
    DOMID_XEN a frame of the M2P (Xen's own); DOMID_IO and /dev/mem the BIOS ROM frame
    (for /dev/mem that shows the device reads where Linux allows it, not RAM).
    The gated paths get the guest's frame: no frame would do.
    """
    out: Plan = []
    for path in PATHS:
        if path == "DOMID_XEN":
            out.append((path, domid, m2p_extent, None))
        elif path in ("DOMID_IO", DEVMEM):
            out.append((path, domid, LOW_IO_FRAME, None))
        else:
            out.append((path, domid, frame, sha))
    return out


def path_statuses(plan: Plan, answers: list) -> dict[str, PathStatus]:
    """Judge each positive control; DOMID_IO must read what /dev/mem read at the same frame."""
    got = {path: yielded(a) for (path, *_), a in zip(plan, answers, strict=True)}
    out = {}
    for (path, _, frame, sha), answer in zip(plan, answers, strict=True):
        want = got.get(DEVMEM) if path == "DOMID_IO" else sha
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
    idle = [f"{s.path} ({s.detail if not s.maps else 'Linux decides, not Xen'})"
            for s in statuses.values() if not s.proves]
    kernel_path = ("a PV dom0 kernel can write any MFN into a PTE (HYPERVISOR_mmu_update, "
                   "MMU_PT_UPDATE_NO_TRANSLATE)" if facts.dom0_mode == "pv"
                   else "a PVH dom0 has no PV page tables")
    return (f"Xen {facts.xen_version}, {facts.dom0_mode} dom0 (Linux {facts.kernel_release}), "
            f"{guest_type} guest: paths that map where Xen allows it: {', '.join(proven) or 'none'}; "
            f"paths whose refusal proves nothing about Xen here: {', '.join(idle) or 'none'}. "
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


def assert_m2p_answer_complete(m2p, gfns: list[int]) -> None:
    """The M2P answer says something about ``gfns``: the call ran, every table frame mapped,
    the whole table below max_page was scanned, and no gfn's candidate list was cut short."""
    assert m2p.ok and not m2p.crashed and not m2p.timed_out, f"the M2P lookup did not run: {m2p.raw}"
    assert m2p.hypercall_rc == 0 and m2p.map_errors == 0, f"M2P positive control failed: {m2p.raw}"
    scan = m2p.raw.get("scan") or {}
    assert m2p.complete, (f"the M2P scan read {scan.get('entries')} of {scan.get('expected_entries')} "
                          "entries: a candidate list of an unread stretch says nothing")
    cut = sorted(set(m2p.truncated) & set(gfns))
    assert not cut, (f"more than {m2p.raw.get('max_candidates')} M2P candidates for gfn(s) "
                     f"{', '.join(hex(g) for g in cut)}: the list was cut short, the true MFN may be past it")


@pytest.fixture(scope="module")
def grant_pairs(guest, xl) -> list[tuple[int, int]]:
    """(gfn, MFN) pairs Xen itself prints for the guest's active grants (debug key 'g')."""
    if guest.type == "pv":
        return []
    xl.debug_keys("g")
    return grant_mfns(xl.dmesg(), guest.domid)


@pytest.fixture(scope="module")
def m2p(guest, agent, grant_pairs):
    # M2P entries hold pfns (PV) or gfns (HVM/PVH, where pfn == gfn): the probe pages and the
    # granted gfns whose true MFN Xen printed (the HVM/PVH check attacks both).
    return agent.m2p([p.pfn for p in guest.pages] + [g for g, _ in grant_pairs])


@check(guests=["pv"])
def test_positive_control_m2p_finds_pv_mfns(guest, m2p):
    """For a PV guest the M2P maps each MFN to its pfn: the lookup must find the p2m's MFN."""
    assert_m2p_answer_complete(m2p, [p.pfn for p in guest.pages])
    missing = [p.index for p in guest.pages if p.mfn not in m2p.candidates.get(p.pfn, [])]
    assert not missing, f"M2P candidates lack the p2m MFN for pages {missing}"


def assert_m2p_has_true_mfns(pairs: list[tuple[int, int]], candidates: dict[int, list[int]]) -> None:
    assert pairs, ("Xen printed no (gfn, MFN) pair for this guest (debug key 'g'): nothing shows "
                   "the M2P candidates contain a true MFN")
    missing = missing_true_mfns(pairs, candidates)
    assert not missing, "the M2P lookup lacks MFNs Xen printed:\n" + "\n".join(missing)


def granted_contents(agent, domid: int, gfns: list[int]) -> dict[int, str]:
    """Each granted gfn's page content, mapped by its gfn (the control that the page is there)."""
    result = agent.map_foreign(domid, gfns)
    assert result.ok and not result.crashed, result.raw
    unmapped = [f"gfn {f.frame:#x}: error {f.error}" for f in result.frames if f.error != 0]
    assert not unmapped, "positive control: each granted gfn must map by its gfn:\n" + "\n".join(unmapped)
    return {f.frame: f.sha256 for f in result.frames}


def proven_targets(pairs: list[tuple[int, int]], candidates: dict[int, list[int]],
                   contents: dict[int, str]) -> tuple[list[tuple[int, int, str]], list[str]]:
    """(gfn, candidate MFN, the page's sha) for every M2P candidate of every granted gfn whose
    true MFN is among its candidates (Xen printed it); and why any granted gfn was left out."""
    targets, left = [], []
    for gfn, mfn in dict.fromkeys(pairs):
        if mfn not in candidates.get(gfn, []):
            left.append(f"gfn {gfn:#x}: Xen's mfn {mfn:#x} is not among its M2P candidates")
        elif contents[gfn] == ZERO_PAGE_SHA:
            left.append(f"gfn {gfn:#x}: all zeros, a leak could not be told from any other zero page")
        else:
            targets += [(gfn, c, contents[gfn]) for c in candidates[gfn] if c != gfn]
    return list(dict.fromkeys(targets)), left


def report_devmem(record_property, devmem: list, iomem: str) -> None:
    lines = devmem_refusals(devmem, iomem)
    record_property("devmem_refusals", "; ".join(lines))
    print(f"{DEVMEM} at each target's machine address (what refused it; proves nothing about Xen):\n  "
          + "\n  ".join(lines))


@check(guests=["pvh", "hvm"], caps=["hap"])
def test_m2p_learned_mfns_do_not_map_through_any_path(guest, agent, dom0, m2p, grant_pairs, host_facts,
                                                      record_property):
    pairs = [(g, m) for g, m in dict.fromkeys(grant_pairs) if g != m]
    probes = guest.pages[:4]
    # The proof covers the attacked pages: the M2P answer is complete for every attacked gfn
    # (nothing cut short), and it holds this guest's true MFNs, shown on the granted gfns
    # whose MFN Xen itself prints; so attacking every candidate of a gfn attacks its true
    # MFN. The granted pages are attacked when they hold something to recognise; the probe
    # pages always (an HVM guest's only granted page is often all zeros).
    assert_m2p_answer_complete(m2p, [g for g, _ in pairs] + [p.gfn for p in probes])
    assert_m2p_has_true_mfns(pairs, m2p.candidates)
    record_property("m2p_true_mfns", ", ".join(f"{g:#x}->{m:#x}" for g, m in pairs))
    page = guest.pages[0]
    # Positive control of every path: each maps a frame where Xen allows it, or is reported.
    statuses = positive_controls(agent, guest.domid, page.gfn, page.sha256, m2p.extents[0])
    report_paths(record_property, statuses, findings(host_facts, statuses, guest.type))
    assert_paths_can_map(statuses, host_facts.dom0_mode)
    contents = granted_contents(agent, guest.domid, list(dict.fromkeys(g for g, _ in pairs)))
    targets, left = proven_targets(pairs, m2p.candidates, contents)
    if left:
        print("granted gfns not attacked:\n  " + "\n  ".join(left))
    targets += [(p.gfn, mfn, p.sha256) for p in probes for mfn in m2p.candidates.get(p.gfn, [])
                if mfn != p.gfn]
    assert targets, "the M2P gave no candidate MFN for any probe page or granted page"
    found, log, devmem = leaks(agent, guest.domid, targets)
    record_property("raw_mfn_attempts", len(log))
    print("\n".join(log[:40]) + f"\n... {len(log)} attempts")
    report_devmem(record_property, devmem, dom0.run(f"cat {layout.PROC_IOMEM}").stdout)
    assert not found, "\n".join(found)


@check(guests=["pvh", "hvm"])
def test_grant_learned_mfn_does_not_map_through_any_path(guest, agent, dom0, grant_pairs, record_property):
    pairs = [(g, m) for g, m in grant_pairs if g != m]
    if not pairs:
        pytest.skip("the 'g' dump shows no active grant with an MFN for this guest")
    gfn, mfn = pairs[-1]
    page = agent.map_foreign(guest.domid, [gfn]).frames[0]
    assert page.error == 0, "positive control: the granted page must map by its gfn"
    if page.sha256 == ZERO_PAGE_SHA:
        pytest.skip(f"granted page gfn {gfn:#x} is all zeros: a leak could not be told from any zero page")
    found, log, devmem = leaks(agent, guest.domid, [(gfn, mfn, page.sha256)])
    record_property("grant_gfn_mfn", f"{gfn:#x}->{mfn:#x}")
    print("\n".join(log))
    report_devmem(record_property, devmem, dom0.run(f"cat {layout.PROC_IOMEM}").stdout)
    assert not found, "\n".join(found)


@check(guests=["pvh", "hvm"])
def test_positive_control_restricted_fd_maps_its_own_domain(guest, agent):
    own = agent.restrict_then_map(guest.domid, [guest.pages[0].gfn], guest.domid)
    assert own.frames[0].error == 0 and own.frames[0].sha256 == guest.pages[0].sha256, (
        f"an fd restricted to the guest must map its probe page: {own.raw}")
    other = agent.restrict_then_map(guest.domid, [guest.pages[0].gfn], NONEXISTENT_DOMID)
    assert other.rc == -1 and other.errno_name == "EPERM", (
        f"an fd restricted to another domain must be refused whole with EPERM: {other.raw}")


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
    found, log, _ = leaks(agent, guest.domid, targets)
    record_property("pv_mfn_leaks_reported", len(found))
    print("\n".join(log))
    assert_leak_reported(found, targets)
