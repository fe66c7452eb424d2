"""Paged-out frames: MMAPBATCH_V2 answers -ENOENT for a gfn Xen has paged out, and
the frame maps with the guest's content once paged back in.

Debian's xenpaging pages an HVM guest out to a file. Xen supports paging only
when built with CONFIG_MEM_PAGING (an UNSUPPORTED option Debian's 4.17 leaves out).
The check is skipped only when the booted Xen lacks it, and says how it knows:
- the booted hypervisor's own build config (`xenhypfs cat /buildinfo/config`,
  CONFIG_HYPFS_CONFIG), else the `/boot/xen-<version>*.config` its packages installed:
  no CONFIG_MEM_PAGING=y there is a skip before any guest is made;
- with no config to read, xenpaging's own words: a Xen without CONFIG_MEM_PAGING
  answers the paging vm_event op with ENOSYS (xen/common/vm_event.c vm_event_domctl:
  the XEN_DOMCTL_VM_EVENT_OP_PAGING case is compiled out, rc stays -ENOSYS), which
  xenpaging prints as "Error initialising shared page(38 = Function not implemented)".
Anything else that stops xenpaging (a config that says CONFIG_MEM_PAGING=y, another
errno, no xenpaging in dom0) is a failure, with xenpaging's log.

Paging needs a PV dom0: vm_event_domctl refuses XEN_VM_EVENT_ENABLE for paging with
-EOPNOTSUPP when the hardware domain is HVM ("hvm fixme: p2m_is_foreign types need
addressing", RELEASE-4.17.0 .. 4.20), so under a PVH dom0 the check is skipped by its
declaration (dom0=["pv"]), saying so.
"""

from __future__ import annotations

import errno
import re
import shlex
import time
from dataclasses import dataclass

import pytest

from harness import dom0_layout as layout
from harness import timeouts as t
from harness.plugins import check

# Where Xen installs its tools, newest first: Debian's /usr/lib/xen-<major.minor>/bin,
# an own build's libexec (tools/xenpaging installs to LIBEXEC_BIN), else on PATH.
TOOL_DIRS = (f"{layout.DEBIAN_XEN_LIB}/bin", f"{layout.OWN_XEN_LIB}/bin", f"{layout.XEN_LIB}/bin",
             f"{layout.OWN_XEN_LIBEXEC}/bin", f"{layout.XEN_LIBEXEC}/bin", layout.LOCAL_SBIN, layout.SBIN)
CONFIG_LINE = re.compile(r"^CONFIG_\w+=", re.M)
# xenpaging.c: PERROR("Error initialising shared page") -> "...page(<errno> = <strerror>)"
ENABLE_ERRNO = re.compile(r"Error initialising shared page\s*\((\d+) = ([^)]*)\)")


@dataclass(frozen=True)
class PagingBuild:
    """Whether the booted Xen was built with CONFIG_MEM_PAGING (None: no config read), and whence."""

    built: bool | None
    source: str


def find_tool(remote, name: str, xen_version: str) -> str | None:
    """The path of Xen tool ``name`` in dom0, or None."""
    mm = ".".join(xen_version.split(".")[:2])
    paths = " ".join(shlex.quote(f"{d.format(mm=mm)}/{name}") for d in TOOL_DIRS)
    found = remote.run(f"for f in {paths} {layout.DEBIAN_XEN_LIB_ANY}/bin/{name}; do [ -x \"$f\" ] && "
                       f"{{ echo \"$f\"; break; }}; done", timeout=t.QUICK_COMMAND_S).stdout.strip()
    return found or None


def read_build(remote, xen_version: str) -> PagingBuild:
    """The booted Xen's config from hypfs, else the one config file in /boot for its version."""
    hypfs = find_tool(remote, "xenhypfs", xen_version)
    if hypfs:
        config = remote.run(f"{hypfs} cat /buildinfo/config", timeout=t.QUICK_COMMAND_S).stdout
        built = paging_built_in(config)
        if built is not None:
            return PagingBuild(built, f"the booted Xen's own config ({hypfs} cat /buildinfo/config)")
    mm = ".".join(xen_version.split(".")[:2])
    files = remote.run(f"ls {layout.xen_boot_config(mm)} 2>/dev/null",
                       timeout=t.QUICK_COMMAND_S).stdout.split()
    answers = {f: paging_built_in(remote.run(f"cat {shlex.quote(f)}", timeout=t.QUICK_COMMAND_S).stdout)
               for f in files}
    known = {a for a in answers.values() if a is not None}
    if len(known) == 1:
        return PagingBuild(known.pop(), " and ".join(f for f, a in answers.items() if a is not None))
    why = "they disagree: " + ", ".join(files) if known else f"none in {layout.BOOT_DIR} for this version"
    return PagingBuild(None, f"no build config (hypfs: {'no answer' if hypfs else 'no xenhypfs'}; {why})")


def exit_skip_reason(log_text: str, build: PagingBuild) -> str | None:
    """Why an exited xenpaging means this Xen lacks paging (a skip), or None: a failure."""
    if build.built is not False:
        match = ENABLE_ERRNO.search(log_text)
        if build.built is None and match and int(match.group(1)) == errno.ENOSYS:
            return (f"this Xen answers {match.group(0)!r} to the paging vm_event op: built without "
                    f"CONFIG_MEM_PAGING (vm_event_domctl leaves -ENOSYS); {build.source}")
        return None
    return f"Xen was built without CONFIG_MEM_PAGING ({build.source})"


def start_paging(remote, xenpaging: str, domid: int, target_kb: int) -> tuple[str, str]:
    log = f"{layout.PAYLOAD_DIR}/paging-{domid}.log"
    pagefile = f"{layout.PAYLOAD_DIR}/paging-{domid}.file"
    pid = remote.check_output(
        f"nohup timeout {t.XENPAGING_RUN_S} {shlex.quote(xenpaging)} -d {domid} -f {pagefile} "
        f"-m {target_kb} -v > {log} 2>&1 & echo $!", timeout=t.QUICK_COMMAND_S).strip()
    return pid, log


def stop_paging(remote, pid: str, log: str) -> str:
    remote.run(f"kill -TERM {pid} 2>/dev/null; for i in $(seq 100); do kill -0 {pid} 2>/dev/null "
               f"|| break; sleep 0.2; done", timeout=t.PAGING_STOP_S)
    return remote.run(f"cat {shlex.quote(log)}", timeout=t.QUICK_COMMAND_S).stdout


def paging_built_in(config_text: str) -> bool | None:
    """Whether a Xen build config has memory paging; None when the text is no config."""
    if not CONFIG_LINE.search(config_text):
        return None
    return "CONFIG_MEM_PAGING=y" in config_text.splitlines()


@pytest.fixture(scope="module")
def paging_build(xen_host) -> PagingBuild:
    """What the booted Xen's build says; skip before creating a guest when it has no paging."""
    version = xen_host.facts().xen_version
    build = read_build(xen_host.remote, version)
    if build.built is False:
        pytest.skip(f"Xen {version} was built without CONFIG_MEM_PAGING ({build.source}): "
                    "xenpaging can only answer ENOSYS")
    return build


def judge_exit(log_text: str, build: PagingBuild) -> None:
    """xenpaging exited before paging anything out: a skip when this Xen lacks paging, else a failure."""
    reason = exit_skip_reason(log_text, build)
    if reason:
        pytest.skip(reason)
    pytest.fail(f"xenpaging exited (CONFIG_MEM_PAGING: {build.built}, from {build.source}):\n"
                f"{log_text.strip()[-1500:] or '(no output)'}", pytrace=False)


def wait_for_enoent(remote, agent, guest, pid: str, log: str, build: PagingBuild) -> list[int]:
    """Probe-page gfns that answer -ENOENT (paged out) within PAGE_OUT_S of xenpaging's start."""
    deadline = time.monotonic() + t.PAGE_OUT_S
    while time.monotonic() < deadline:
        alive = remote.run(f"kill -0 {pid}", timeout=t.QUICK_COMMAND_S).rc == 0
        if not alive:
            judge_exit(remote.run(f"cat {shlex.quote(log)}", timeout=t.QUICK_COMMAND_S).stdout, build)
        result = agent.map_foreign(guest.domid, [p.gfn for p in guest.pages], want="none")
        enoent = [f.frame for f in result.frames if f.error == -errno.ENOENT]
        if enoent:
            return enoent
        time.sleep(2)
    return []


@check(guests=["hvm"], caps=["hap"], dom0=["pv"])
def test_paged_out_gfns_give_enoent_then_map_after_page_in(paging_build, own_guest, agent, xen_host,
                                                           record_property):
    remote = xen_host.remote
    guest = own_guest
    xenpaging = find_tool(remote, "xenpaging", xen_host.facts().xen_version)
    assert xenpaging, (f"xenpaging is not installed in dom0 (looked in {', '.join(TOOL_DIRS)}), while "
                       f"the build may page (CONFIG_MEM_PAGING: {paging_build.built}, {paging_build.source})")
    pid, log = start_paging(remote, xenpaging, guest.domid, guest.spec.memory_mb * 1024 // 2)
    try:
        enoent = wait_for_enoent(remote, agent, guest, pid, log, paging_build)
        record_property("paged_out_probe_pages", len(enoent))
        assert enoent, f"xenpaging ran for {t.PAGE_OUT_S:g} s but no probe page answered -ENOENT"
    finally:
        text = stop_paging(remote, pid, log)
    # The -ENOENT answers asked Xen to page those frames back in; now they must map.
    deadline = time.monotonic() + t.PAGE_IN_S
    while True:
        result = agent.map_foreign(guest.domid, enoent)
        if all(f.error == 0 for f in result.frames) or time.monotonic() > deadline:
            break
        time.sleep(1)
    expected = {p.gfn: p.sha256 for p in guest.pages}
    bad = [f"{f.frame:#x}: error {f.error}, sha {f.sha256}" for f in result.frames
           if f.error != 0 or f.sha256 != expected[f.frame]]
    assert not bad, "after page-in:\n" + "\n".join(bad) + f"\nxenpaging log tail:\n{text[-1500:]}"
