"""Paged-out frames: MMAPBATCH_V2 answers -ENOENT for a gfn Xen has paged out, and
the frame maps with the guest's content once paged back in.

Debian's xenpaging pages an HVM guest out to a file. Xen supports paging only
when built with CONFIG_MEM_PAGING (an UNSUPPORTED option Debian's 4.17 leaves out)
and on some hardware (it needs HAP); when this Xen cannot, the check is skipped
with the reason (the hypervisor's own build config in dom0's /boot, or
xenpaging's own words), never passed.
"""

from __future__ import annotations

import errno
import shlex
import time

import pytest

from harness.imaging import REMOTE_PAYLOAD_DIR
from harness.plugins import check

XENPAGING = "$(ls /usr/lib/xen-*/bin/xenpaging | tail -1)"
REFUSALS = ("not supported", "No such device", "Operation not permitted", "Error initialising",
            "Error enabling", "Invalid argument")


def start_paging(remote, domid: int, target_kb: int) -> tuple[str, str]:
    log = f"{REMOTE_PAYLOAD_DIR}/paging-{domid}.log"
    pagefile = f"{REMOTE_PAYLOAD_DIR}/paging-{domid}.file"
    pid = remote.check_output(
        f"nohup timeout 600 {XENPAGING} -d {domid} -f {pagefile} -m {target_kb} -v "
        f"> {log} 2>&1 & echo $!", timeout=30).strip()
    return pid, log


def stop_paging(remote, pid: str, log: str) -> str:
    remote.run(f"kill -TERM {pid} 2>/dev/null; for i in $(seq 100); do kill -0 {pid} 2>/dev/null "
               f"|| break; sleep 0.2; done", timeout=60)
    return remote.run(f"cat {shlex.quote(log)}", timeout=30).stdout


def paging_built_in(config_text: str) -> bool | None:
    """Whether a Xen build config has memory paging; None when the text says nothing."""
    if not config_text.strip():
        return None
    return "CONFIG_MEM_PAGING=y" in config_text.splitlines()


@pytest.fixture(scope="module")
def paging_support(xen_host) -> None:
    """Skip before creating a guest when the booted Xen was built without paging."""
    version = xen_host.facts().xen_version.rsplit(".", 1)[0]
    path = f"/boot/xen-{version}-amd64.config"
    built = paging_built_in(xen_host.remote.run(f"cat {path} 2>/dev/null", timeout=30).stdout)
    if built is False:
        pytest.skip(f"Xen {xen_host.facts().xen_version} was built without CONFIG_MEM_PAGING ({path}): "
                    "xenpaging can only answer ENOSYS")


@check(guests=["hvm"], caps=["hap"])
def test_paged_out_gfns_give_enoent_then_map_after_page_in(paging_support, own_guest, agent, xen_host,
                                                           record_property):
    remote = xen_host.remote
    guest = own_guest
    target_kb = guest.spec.memory_mb * 1024 // 2
    pid, log = start_paging(remote, guest.domid, target_kb)
    try:
        deadline = time.monotonic() + 120
        enoent: list[int] = []
        while time.monotonic() < deadline:
            alive = remote.run(f"kill -0 {pid}", timeout=30).rc == 0
            text = remote.run(f"cat {shlex.quote(log)}", timeout=30).stdout
            if not alive:
                reason = next((line for line in text.splitlines() if any(r in line for r in REFUSALS)),
                              text.strip()[-300:] or "xenpaging exited")
                pytest.skip(f"this Xen cannot page this guest: {reason.strip()}")
            result = agent.map_foreign(guest.domid, [p.gfn for p in guest.pages], want="none")
            enoent = [f.frame for f in result.frames if f.error == -errno.ENOENT]
            if enoent:
                break
            time.sleep(2)
        record_property("paged_out_probe_pages", len(enoent))
        assert enoent, "xenpaging ran for 120 s but no probe page answered -ENOENT"
    finally:
        text = stop_paging(remote, pid, log)
    # The -ENOENT answers asked Xen to page those frames back in; now they must map.
    deadline = time.monotonic() + 60
    while True:
        result = agent.map_foreign(guest.domid, enoent)
        if all(f.error == 0 for f in result.frames) or time.monotonic() > deadline:
            break
        time.sleep(1)
    expected = {p.gfn: p.sha256 for p in guest.pages}
    bad = [f"{f.frame:#x}: error {f.error}, sha {f.sha256}" for f in result.frames
           if f.error != 0 or f.sha256 != expected[f.frame]]
    assert not bad, "after page-in:\n" + "\n".join(bad) + f"\nxenpaging log tail:\n{text[-1500:]}"
