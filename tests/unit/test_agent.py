"""Unit tests of the dom0 agent (the package harness/agent/nxagent/, run as the one file it
builds to) and its host client.

No Xen here: the privcmd device is replaced by fakes (an anonymous mapping for
the VMA, a Python function for the ioctl; patched in the submodule that looks the
name up, e.g. nxagent.privcmd) so the whole request -> child -> answer path runs;
the ioctl numbers and struct layouts are checked against values computed by a C
compiler from include/uapi/xen/privcmd.h (x86_64).
"""

from __future__ import annotations

import ast
import base64
import ctypes
import errno
import hashlib
import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from harness.agent import build, nxagent
from harness.agent import client as agent_client
from harness.agent.client import Agent, AgentError, FrameResult, M2PResult, MapResult

AGENT_MODULES = sorted(Path(nxagent.__file__).parent.glob("*.py"))
PAGE = nxagent.abi.XEN_PAGE_SIZE

# --------------------------------------------------------------------------
# ioctl numbers and struct layouts
# --------------------------------------------------------------------------
# Printed by a C program including include/uapi/xen/privcmd.h (Linux 6.12) with
# domid_t = uint16_t and xen_pfn_t = unsigned long, built with gcc on x86_64.
# MMAPBATCH_V2 = 0x205004 was also measured in dom0.
HEADER_IOCTLS = {
    "HYPERCALL": 0x305000,
    "MMAP": 0x105002,
    "MMAPBATCH": 0x185003,
    "MMAPBATCH_V2": 0x205004,
    "DM_OP": 0x105005,
    "RESTRICT": 0x25006,
    "MMAP_RESOURCE": 0x205007,
}


def test_mmapbatch_v2_number_measured_in_dom0():
    assert nxagent.abi.IOCTL["MMAPBATCH_V2"] == 0x205004


@pytest.mark.parametrize("name", sorted(HEADER_IOCTLS))
def test_ioctl_numbers_match_header(name):
    assert nxagent.abi.IOCTL[name] == HEADER_IOCTLS[name], hex(nxagent.abi.IOCTL[name])


def test_unimplemented_ioctl_number():
    # Xen tools/include/xen-sys/Linux/privcmd.h: _IOC(_IOC_NONE, 'P', 0xFF, 0)
    assert nxagent.abi.IOCTL["UNIMPLEMENTED"] == 0x50FF


def test_ioc_rejects_oversized_argument():
    with pytest.raises(ValueError):
        nxagent.abi.ioc(0, "P", 1, 1 << 14)


def _layout(struct_type) -> dict[str, int]:
    return {name: getattr(struct_type, name).offset for name, *_ in struct_type._fields_}


@pytest.mark.parametrize(
    ("struct_type", "size", "offsets"),
    [
        (nxagent.abi.PrivcmdMmapBatchV2, 32, {"num": 0, "dom": 4, "addr": 8, "arr": 16, "err": 24}),
        (nxagent.abi.PrivcmdMmapBatch, 24, {"num": 0, "dom": 4, "addr": 8, "arr": 16}),
        (nxagent.abi.PrivcmdMmap, 16, {"num": 0, "dom": 4, "entry": 8}),
        (nxagent.abi.PrivcmdMmapEntry, 24, {"va": 0, "mfn": 8, "npages": 16}),
        (nxagent.abi.PrivcmdHypercall, 48, {"op": 0, "arg": 8}),
        (nxagent.abi.PrivcmdDmOp, 16, {"dom": 0, "num": 2, "ubufs": 8}),
        (
            nxagent.abi.PrivcmdMmapResource,
            32,
            {"dom": 0, "type": 4, "id": 8, "idx": 12, "num": 16, "addr": 24},
        ),
        # offsetof/sizeof printed by gcc from xen/include/public/memory.h of Xen
        # RELEASE-4.17.3 and RELEASE-4.20.0 (x86_64, __XEN_TOOLS__).
        (
            nxagent.abi.XenMachphysMfnList,
            24,
            {"max_extents": 0, "extent_start": 8, "nr_extents": 16},
        ),
    ],
)
def test_struct_layout_matches_header(struct_type, size, offsets):
    assert ctypes.sizeof(struct_type) == size
    assert _layout(struct_type) == offsets


def test_field_widths():
    assert ctypes.sizeof(nxagent.abi.c_domid_t) == 2
    assert ctypes.sizeof(nxagent.abi.c_xen_pfn_t) == 8
    v2 = nxagent.abi.PrivcmdMmapBatchV2(num=3, dom=0xFFFF, addr=0x7F0000000000, arr=16, err=32)
    assert bytes(v2) == struct.pack("<IH2xQQQ", 3, 0xFFFF, 0x7F0000000000, 16, 32)


def test_fcntl_ioctl_reads_and_writes_a_ctypes_struct():
    """The mechanism privcmd_ioctl relies on, exercised on a pty (TIOCSWINSZ/TIOCGWINSZ)."""

    class WinSize(ctypes.Structure):
        _fields_ = [(n, ctypes.c_ushort) for n in ("rows", "cols", "xpix", "ypix")]

    master, slave = os.openpty()
    try:
        rc, err = nxagent.privcmd.privcmd_ioctl(master, termios.TIOCSWINSZ, WinSize(37, 91, 0, 0))
        assert (rc, err) == (0, 0)
        out = WinSize()
        assert nxagent.privcmd.privcmd_ioctl(slave, termios.TIOCGWINSZ, out) == (0, 0)
        assert (out.rows, out.cols) == (37, 91)
        null = os.open(os.devnull, os.O_RDONLY)
        try:  # an ioctl the device does not know: (-1, errno), not an exception
            assert nxagent.privcmd.privcmd_ioctl(null, termios.TIOCGWINSZ, out) == (-1, errno.ENOTTY)
        finally:
            os.close(null)
    finally:
        os.close(master)
        os.close(slave)


# --------------------------------------------------------------------------
# Request validation
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("command", "request_", "message"),
    [
        ("mmapbatch_v2", {"frames": [1]}, "request.domid: required"),
        ("mmapbatch_v2", {"domid": 1}, "request.frames: required"),
        ("mmapbatch_v2", {"domid": 70000, "frames": [1]}, "request.domid: 70000 is outside"),
        ("mmapbatch_v2", {"domid": True, "frames": [1]}, "expected an integer"),
        ("mmapbatch_v2", {"domid": 1, "frames": [-1]}, "request.frames[0]: -1"),
        ("mmapbatch_v2", {"domid": 1, "frames": [1, 1 << 64]}, "request.frames[1]"),
        ("mmapbatch_v2", {"domid": 1, "frames": ["0x10"]}, "request.frames[0]: '0x10'"),
        ("mmapbatch_v2", {"domid": 1, "frames": 5}, "expected a list"),
        ("mmapbatch", {"domid": 1, "frames": [1], "want": "md5"}, "request.want: 'md5'"),
        ("mmap", {"domid": 1, "frames": [1], "prot": "w"}, "request.prot: 'w'"),
        ("mmap", {"domid": 1, "frames": [1], "frame": 3}, "unknown key(s) frame"),
        ("mmap", {"domid": 1, "frames": [1], "timeout_s": 0}, "request.timeout_s"),
        ("mmap", {"domid": 1, "frames": [1], "command": "mmapbatch"}, "does not match"),
        ("restrict_then_map", {"domid": 1, "frames": [1]}, "request.restrict_domid"),
        (
            "restrict_then_map",
            {"domid": 1, "frames": [1], "restrict_domid": 1, "call": "mmap_v3"},
            "request.call",
        ),
        ("devmem", {"address": 0}, "request.length: required"),
        ("devmem", {"address": -5, "length": 1}, "request.address"),
        ("devmem", {"address": 0, "length": 1, "method": "read"}, "request.method"),
        ("p2m", {"domid": 1, "pfns": [1, None]}, "request.pfns[1]"),
        ("m2p", {}, "request.gfns: required"),
        ("m2p", {"gfns": 3}, "request.gfns: expected a list"),
        ("m2p", {"gfns": [1, -1]}, "request.gfns[1]: -1"),
        ("m2p", {"gfns": [1 << 63]}, "request.gfns[0]"),  # bit 63 set: never a valid entry
        ("m2p", {"gfns": [True]}, "request.gfns[0]: True"),
        ("m2p", {"gfns": [1], "max_candidates": 0}, "request.max_candidates: 0 is outside"),
        ("m2p", {"gfns": [1], "max_candidates": "64"}, "request.max_candidates: expected"),
        ("m2p", {"gfns": [1], "domid": 0}, "unknown key(s) domid"),
        ("m2p", {"gfns": [1], "timeout_s": -1}, "request.timeout_s"),
        ("batch", {"calls": {}}, "request.calls: required"),
        ("batch", {"calls": [{"command": "batch", "calls": []}]}, "do not nest"),
        ("batch", {"calls": [{"command": "nope"}]}, "request.calls[0].command: 'nope'"),
        ("batch", {"calls": [{"command": "mmap", "domid": 1}]}, "request.calls[0].frames"),
        ("info", [], "expected a JSON object"),
        ("frobnicate", {}, "unknown command 'frobnicate'"),
    ],
)
def test_request_validation_errors(command, request_, message):
    with pytest.raises(nxagent.errors.RequestError) as info:
        nxagent.commands.run_command(command, request_)
    assert message in str(info.value)


def test_validation_fills_defaults():
    req = nxagent.validate.validate("mmapbatch_v2", {"domid": 3, "frames": [0, (1 << 64) - 1]})
    assert req == {
        "command": "mmapbatch_v2",
        "domid": 3,
        "frames": [0, (1 << 64) - 1],
        "want": "sha256",
        "prot": "r",
        "timeout_s": 60.0,
    }
    rtm = nxagent.validate.validate("restrict_then_map", {"domid": 3, "frames": [], "restrict_domid": 4})
    assert rtm["restrict_domids"] == [4]
    assert rtm["map_call"] == "mmapbatch_v2"


# --------------------------------------------------------------------------
# v1 error-bit decoding (privcmd.c mmap_return_error: gfn |= 0x80000000 for
# -ENOENT, gfn |= 0xf0000000 otherwise)
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("orig", "raw", "expected"),
    [
        (0x1234, 0x1234, (0, "ok")),
        (0x1234, 0xF0001234, (-errno.EINVAL, "mfn_error")),
        (0x1234, 0x80001234, (-errno.ENOENT, "paged")),
        (0x5_0000_1234, 0x5_F000_1234, (-errno.EINVAL, "mfn_error")),  # 64-bit frame
        (0x1000_1234, 0x9000_1234, (-errno.ENOENT, "paged")),
        (0x7000_1234, 0xF000_1234, (None, "error_ambiguous")),
        (0x8000_0000, 0x8000_0000, (None, "ambiguous")),
        (0x1234, 0x1235, (None, "unexpected")),
        (0x1234, 0x4000_1234, (None, "unexpected")),
    ],
)
def test_decode_v1_frame(orig, raw, expected):
    assert nxagent.mapping.decode_v1_frame(orig, raw) == expected


# --------------------------------------------------------------------------
# Fork isolation
# --------------------------------------------------------------------------
def _run(body, timeout_s=10.0, base=None):
    return nxagent.isolation.run_isolated(body, {"timeout_s": timeout_s}, base or {"call": "test"})


@pytest.mark.parametrize("sig", [signal.SIGBUS, signal.SIGSEGV])
def test_child_killed_by_signal_is_reported(sig):
    def body(req, chan):
        chan.update(rc=0, errno=0)
        chan.stage("touch", index=1, frame=42)
        os.kill(os.getpid(), sig)

    answer = _run(body)
    assert answer["ok"] is True
    assert answer["crashed"]["name"] == sig.name
    assert answer["crashed"]["signal"] == int(sig)
    assert answer["crashed"]["stage"] == {"name": "touch", "index": 1, "frame": 42}
    assert answer["rc"] == 0  # what the child reported before dying is kept
    assert answer["timed_out"] is False


def test_timeout_kills_a_sleeping_child():
    def body(req, chan):
        chan.stage("ioctl")
        time.sleep(30)

    started = time.monotonic()
    answer = _run(body, timeout_s=0.5)
    assert time.monotonic() - started < 10
    assert answer["timed_out"] is True
    assert answer["crashed"] is None
    assert answer["stage"] == {"name": "ioctl"}
    assert "unreaped_child_pid" not in answer


def test_child_exception_and_environment_problem():
    def broken(req, chan):
        raise KeyError("oops")

    answer = _run(broken)
    assert answer["ok"] is False
    assert "internal error in child" in answer["error"]
    assert "KeyError" in answer["traceback"]

    def no_device(req, chan):
        raise nxagent.errors.EnvironmentProblem("open", "cannot open /dev/x: gone", errno.ENOENT)

    answer = _run(no_device)
    assert answer["ok"] is False
    assert answer["error_errno_name"] == "ENOENT"
    assert answer["error_stage"] == "open"
    assert answer["crashed"] is None


def test_child_that_exits_without_answer():
    def quits(req, chan):
        os._exit(3)

    answer = _run(quits)
    assert answer["ok"] is False
    assert "without finishing" in answer["error"]


# --------------------------------------------------------------------------
# The mapping pipeline with a fake privcmd device
# --------------------------------------------------------------------------
def _page_content(index: int) -> bytes:
    return bytes([index + 1]) * PAGE


class FakePrivcmd:
    """Stands in for /dev/xen/privcmd: an anonymous VMA and scripted ioctl results.

    `frame_errors` maps a frame to the -errno the kernel would report for it;
    `rc_errno` forces the ioctl's overall result.
    """

    def __init__(self, frame_errors=None, rc_errno=None, restrict_errnos=()):
        self.frame_errors = frame_errors or {}
        self.rc_errno = rc_errno
        self.restrict_errnos = list(restrict_errnos)

    def install(self, monkeypatch):
        monkeypatch.setattr(nxagent.privcmd, "open_privcmd", lambda: os.open(os.devnull, os.O_RDWR))
        monkeypatch.setattr(nxagent.privcmd, "map_vma", self.map_vma)
        monkeypatch.setattr(nxagent.privcmd, "privcmd_ioctl", self.ioctl)
        return self

    @staticmethod
    def map_vma(fd, npages, prot):
        addr = nxagent.privcmd.mmap_raw(
            npages * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1,
        )
        for i in range(npages):
            ctypes.memmove(addr + i * PAGE, _page_content(i), PAGE)
        return addr

    def ioctl(self, fd, request, arg):
        if request == nxagent.abi.IOCTL["RESTRICT"]:
            err = self.restrict_errnos.pop(0) if self.restrict_errnos else 0
            return (-1, err) if err else (0, 0)
        if request == nxagent.abi.IOCTL["MMAPBATCH_V2"]:
            frames = (ctypes.c_uint64 * arg.num).from_address(arg.arr)
            errs = (ctypes.c_int * arg.num).from_address(arg.err)
            for i, frame in enumerate(frames):
                errs[i] = self.frame_errors.get(frame, 0)
        elif request == nxagent.abi.IOCTL["MMAPBATCH"]:
            frames = (ctypes.c_uint64 * arg.num).from_address(arg.arr)
            for i, frame in enumerate(frames):
                err = self.frame_errors.get(frame, 0)
                if err:
                    frames[i] = frame | (0x80000000 if err == -errno.ENOENT else 0xF0000000)
        elif request != nxagent.abi.IOCTL["MMAP"]:
            return -1, errno.ENOTTY
        if self.rc_errno:
            return -1, self.rc_errno
        return 0, 0


def _sha(index: int) -> str:
    return hashlib.sha256(_page_content(index)).hexdigest()


def test_mmapbatch_v2_pipeline(monkeypatch):
    FakePrivcmd({11: -errno.EINVAL, 13: -errno.EPERM}).install(monkeypatch)
    frames = [10, 11, 12, 13, (1 << 64) - 1]
    answer = nxagent.commands.run_command("mmapbatch_v2", {"domid": 5, "frames": frames, "want": "bytes"})
    assert answer["ok"] is True and answer["call"] == "mmapbatch_v2"
    assert (answer["rc"], answer["errno"], answer["errno_name"]) == (0, 0, None)
    assert answer["errors"] == [0, -errno.EINVAL, 0, -errno.EPERM, 0]
    assert answer["error_names"] == [None, "EINVAL", None, "EPERM", None]
    assert [p["frame"] for p in answer["pages"]] == frames
    assert [p["sha256"] for p in answer["pages"]] == [_sha(0), None, _sha(2), None, _sha(4)]
    assert [p["touched"] for p in answer["pages"]] == [True, False, True, False, True]
    assert answer["pages"][2]["bytes_b64"] is not None
    assert answer["crashed"] is None and answer["timed_out"] is False and answer["stage"] is None


def test_mmapbatch_v2_paged_out_frame(monkeypatch):
    FakePrivcmd({21: -errno.ENOENT}, rc_errno=errno.ENOENT).install(monkeypatch)
    answer = nxagent.commands.run_command("mmapbatch_v2", {"domid": 5, "frames": [20, 21]})
    assert (answer["rc"], answer["errno_name"]) == (-1, "ENOENT")
    assert answer["per_frame_valid"] is True
    assert answer["errors"] == [0, -errno.ENOENT]
    assert answer["pages"][0]["sha256"] == _sha(0)
    assert answer["pages"][1]["sha256"] is None


def test_mmapbatch_v2_whole_call_failure_touches_nothing(monkeypatch):
    FakePrivcmd(rc_errno=errno.EINVAL).install(monkeypatch)

    def never(addr):
        raise AssertionError("a page was read after a failed ioctl")

    monkeypatch.setattr(nxagent.privcmd, "read_page", never)
    answer = nxagent.commands.run_command("mmapbatch_v2", {"domid": 5, "frames": []})
    assert (answer["rc"], answer["errno_name"]) == (-1, "EINVAL")
    assert answer["errors"] == [] and answer["pages"] == []


def test_mmapbatch_v2_error_array_untouched_is_null(monkeypatch):
    def refuse(fd, request, arg):
        return -1, errno.EPERM  # e.g. a restricted fd: fails before clear_user()

    FakePrivcmd().install(monkeypatch)
    monkeypatch.setattr(nxagent.privcmd, "privcmd_ioctl", refuse)
    answer = nxagent.commands.run_command("mmapbatch_v2", {"domid": 5, "frames": [1, 2]})
    assert answer["errno_name"] == "EPERM"
    assert answer["errors"] == [None, None]
    assert answer["raw_errors"] == [None, None]
    assert answer["per_frame_valid"] is False


def test_sigbus_while_touching_a_page(monkeypatch):
    FakePrivcmd().install(monkeypatch)

    def sigbus(addr):
        os.kill(os.getpid(), signal.SIGBUS)

    monkeypatch.setattr(nxagent.privcmd, "read_page", sigbus)
    answer = nxagent.commands.run_command("mmapbatch_v2", {"domid": 5, "frames": [7, 8]})
    assert answer["ok"] is True
    assert answer["crashed"]["name"] == "SIGBUS"
    assert answer["crashed"]["stage"] == {"name": "touch", "index": 0, "frame": 7}
    assert answer["errors"] == [0, 0]  # the ioctl result reached the parent first
    assert answer["pages"][0]["sha256"] is None


def test_mmapbatch_v1_pipeline(monkeypatch):
    FakePrivcmd({31: -errno.EINVAL, 32: -errno.ENOENT}).install(monkeypatch)
    answer = nxagent.commands.run_command("mmapbatch", {"domid": 5, "frames": [30, 31, 32]})
    assert answer["call"] == "mmapbatch"
    assert answer["raw_frames"] == [30, 31 | 0xF0000000, 32 | 0x80000000]
    assert answer["v1_status"] == ["ok", "mfn_error", "paged"]
    assert answer["errors"] == [0, -errno.EINVAL, -errno.ENOENT]
    assert [p["sha256"] is not None for p in answer["pages"]] == [True, False, False]


def test_mmap_pipeline(monkeypatch):
    FakePrivcmd().install(monkeypatch)
    answer = nxagent.commands.run_command("mmap", {"domid": 5, "frames": [40, 41], "want": "none"})
    assert answer["call"] == "mmap" and answer["rc"] == 0
    assert answer["errors"] == [None, None]  # MMAP has no per-frame errors
    assert [p["mapped"] for p in answer["pages"]] == [True, True]
    assert [p["sha256"] for p in answer["pages"]] == [None, None]  # want=none

    FakePrivcmd(rc_errno=errno.EBUSY).install(monkeypatch)
    failed = nxagent.commands.run_command("mmap", {"domid": 5, "frames": [40, 41]})
    assert failed["errno_name"] == "EBUSY"
    assert [p["mapped"] for p in failed["pages"]] == [False, False]


def test_restrict_then_map(monkeypatch):
    FakePrivcmd(restrict_errnos=[0, errno.EINVAL]).install(monkeypatch)
    answer = nxagent.commands.run_command(
        "restrict_then_map",
        {"domid": 5, "frames": [1], "restrict_domid": [7, 8], "call": "mmapbatch"},
    )
    assert answer["call"] == "restrict_then_map" and answer["map_call"] == "mmapbatch"
    assert answer["restrict"] == [
        {"domid": 7, "rc": 0, "errno": 0, "errno_name": None},
        {"domid": 8, "rc": -1, "errno": errno.EINVAL, "errno_name": "EINVAL"},
    ]
    assert answer["errors"] == [0]


def test_batch_runs_each_call(monkeypatch):
    FakePrivcmd({2: -errno.ESRCH}).install(monkeypatch)
    answer = nxagent.commands.run_command(
        "batch",
        {"calls": [
            {"command": "mmapbatch_v2", "domid": 1, "frames": [1, 2]},
            {"command": "info"},
            {"command": "mmap", "domid": 1, "frames": [3]},
        ]},
    )
    results = answer["results"]
    assert [r["call"] for r in results] == ["mmapbatch_v2", "info", "mmap"]
    assert results[0]["errors"] == [0, -errno.ESRCH]
    assert results[1]["agent_version"] == nxagent.abi.AGENT_VERSION


# --------------------------------------------------------------------------
# devmem and p2m
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["pread", "mmap"])
def test_devmem_reads_a_range(monkeypatch, tmp_path, method):
    blob = bytes(range(256)) * 64  # 16 KiB
    path = tmp_path / "mem"
    path.write_bytes(blob)
    monkeypatch.setattr(nxagent.abi, "DEVMEM_PATH", str(path))
    answer = nxagent.commands.run_command(
        "devmem", {"address": 5000, "length": 300, "want": "bytes", "method": method}
    )
    expected = blob[5000:5300]
    assert answer["ok"] is True and answer["errno"] == 0 and answer["rc"] == 300
    assert answer["sha256"] == hashlib.sha256(expected).hexdigest()
    assert answer["complete"] is True
    assert base64.b64decode(answer["bytes_b64"]) == expected


def test_devmem_missing_device(monkeypatch, tmp_path):
    monkeypatch.setattr(nxagent.abi, "DEVMEM_PATH", str(tmp_path / "absent"))
    answer = nxagent.commands.run_command("devmem", {"address": 0, "length": 1})
    assert answer["ok"] is False and "absent" in answer["error"]


MFNDUMP_OUTPUT = """\
 --- Dumping P2M for domain 3 ---
 Guest Width: 8, PT Levels: 4 P2M size: = 4
  pfn=0x0 ==> mfn=0x12a00 (type 0x0)
  pfn=0x1 ==> mfn=0x12a01 (type 0x1) L1
  pfn=0x2 ==> mfn=0x13b00 (type 0xc) pinned L4
  pfn=0x3 ==> mfn=0xffffffffffffffff (type 0xf) invalid
 --- End of P2M for domain 3 ---
"""


def test_parse_mfndump_p2m():
    parsed = nxagent.commands.parse_mfndump_p2m(MFNDUMP_OUTPUT)
    assert (parsed["guest_width"], parsed["pt_levels"], parsed["p2m_size"]) == (8, 4, 4)
    assert parsed["entries"][1] == (0x12A01, 1, "L1")
    assert parsed["entries"][2] == (0x13B00, 0xC, "pinned L4")
    assert parsed["entries"][3][0] == (1 << 64) - 1


def _fake_tool(tmp_path: Path, stdout: str, status: int = 0) -> str:
    (tmp_path / "out.txt").write_text(stdout)
    tool = tmp_path / "xen-mfndump"
    tool.write_text(
        f"#!/bin/sh\n[ \"$1\" = dump-p2m ] || exit 9\ncat {tmp_path / 'out.txt'}\n"
        f"echo 'some diagnostics' >&2\nexit {status}\n"
    )
    tool.chmod(0o755)
    return str(tool)


def test_p2m_through_a_fake_mfndump(tmp_path):
    tool = _fake_tool(tmp_path, MFNDUMP_OUTPUT)
    answer = nxagent.commands.run_command("p2m", {"domid": 3, "pfns": [0, 2, 9], "tool": tool})
    assert answer["ok"] is True
    assert answer["p2m"] == {"0": 0x12A00, "2": 0x13B00}
    assert answer["missing"] == [9]

    bad = _fake_tool(tmp_path, "Could not map domain 3 memory information\n", status=1)
    failed = nxagent.commands.run_command("p2m", {"domid": 3, "tool": bad})
    assert failed["ok"] is False
    assert "exited 1" in failed["error"] and "some diagnostics" in failed["error"]


# --------------------------------------------------------------------------
# m2p: XENMEM_machphys_mfn_list + MMAPBATCH_V2 from DOMID_XEN + table scan
# --------------------------------------------------------------------------
CHUNK = nxagent.abi.M2P_ENTRIES_PER_CHUNK  # M2P entries (MFNs) per 2 MiB extent
INVALID = (1 << 64) - 1
SHARED = (1 << 64) - 2


def test_xen_interface_numbers():
    # xen/include/public/xen.h, memory.h and arch/x86/include/asm/mm.h (4.17 and 4.20)
    assert nxagent.abi.HYPERVISOR_MEMORY_OP == 12
    assert nxagent.abi.XENMEM_MAXIMUM_RAM_PAGE == 2
    assert nxagent.abi.XENMEM_MACHPHYS_MFN_LIST == 5
    assert nxagent.abi.DOMID_XEN == 0x7FF2
    assert nxagent.abi.INVALID_M2P_ENTRY == INVALID and nxagent.abi.SHARED_M2P_ENTRY == SHARED
    # One extent is an L2 superpage of the table: 512 frames, 2**18 entries of 8 bytes.
    assert nxagent.abi.M2P_CHUNK_FRAMES == 512 and CHUNK == 1 << 18
    assert nxagent.abi.MAX_GFN == (1 << 63) - 1


def test_hypercall_packs_privcmd_hypercall(monkeypatch):
    seen = []

    def ioctl(fd, request, arg):
        seen.append((request, bytes(arg)))
        return 4242, 0

    monkeypatch.setattr(nxagent.privcmd, "privcmd_ioctl", ioctl)
    assert nxagent.m2p.hypercall(9, 12, 5, 0x7F00DEAD000) == (4242, 0)
    assert seen == [(0x305000, struct.pack("<6Q", 12, 5, 0x7F00DEAD000, 0, 0, 0))]


def test_hypercall_buffer_is_resident_page_aligned_memory():
    addr, length, mlock_errno = nxagent.m2p.alloc_hypercall_buffer(PAGE + 3)
    try:
        assert addr % PAGE == 0 and length == 2 * PAGE
        assert ctypes.string_at(addr, length) == bytes(length)
        # root (the agent in dom0) may always lock; a test user may hit RLIMIT_MEMLOCK
        assert mlock_errno in (0, errno.EPERM, errno.ENOMEM, errno.EAGAIN)
    finally:
        nxagent.privcmd.munmap_raw(addr, length)


@pytest.mark.parametrize(
    ("max_page", "expected"),
    [(None, 4096), (1, 4096), (4096 * CHUNK, 4096), (4096 * CHUNK + 1, 4097), (1 << 40, 1 << 20)],
)
def test_m2p_max_extents(max_page, expected):
    assert nxagent.m2p.m2p_max_extents(max_page) == expected


def test_plan_m2p_extents_skips_holes():
    # Xen repeats the previous MFN over a stretch without memory; memory.h says 0.
    extents = [0x1000, 0x1000, 0x2000, 0, 0x2000, 0x3000]
    assert nxagent.m2p.plan_m2p_extents(extents) == [(0, 0x1000), (2, 0x2000), (5, 0x3000)]


def _table(entries: dict[int, int], size: int) -> bytes:
    values = [INVALID] * size
    for index, value in entries.items():
        values[index] = value
    return struct.pack(f"<{size}Q", *values)


SCAN_ENTRIES = {
    3: 0, 9: 0,  # gfn 0: dom0's pfn 0 and a guest's
    5: 0x1234, 700: 0x1234, 1500: 0x1234,
    6: 0x1235,  # same >> 8 group as 0x1234
    8: SHARED,
    11: 0x1_0000_0012,  # needs all 8 bytes to tell apart
    12: 0x12,
    20: 7, 21: 7, 22: 7, 23: 7, 24: 7,
}


def _misaligned_decoy() -> bytes:
    # 0x1234's bytes straddling two entries, at offsets 3 and 1 (neither is 0x1234)
    return b"\xaa" * 3 + struct.pack("<Q", 0x1234) + b"\xbb" * 5 + b"\x34\x12" + b"\xcc" * 14


@pytest.mark.parametrize("method", ["find", "set", None])
def test_scan_m2p_synthetic_table(method):
    segments = [(0, _table(SCAN_ENTRIES, 2048)), (5000, _misaligned_decoy()),
                (9000, _table({1: 0x1234, 2: INVALID}, 4))]
    gfns = [0x1234, 0, 0x12, 0x1_0000_0012, 7, 0xDEAD, 0x1235]
    candidates, truncated, info = nxagent.m2p.scan_m2p(iter(segments), gfns, 3, method=method)
    assert candidates == {
        0x1234: [5, 700, 1500],  # 9001 is a fourth match: cut at max_candidates
        0: [3, 9],
        0x12: [12],
        0x1_0000_0012: [11],
        7: [20, 21, 22],
        0xDEAD: [],
        0x1235: [6],
    }
    assert list(candidates) == gfns  # request order
    assert truncated == [0x1234, 7]
    assert info["segments"] == 3 and info["entries"] == 2048 + 4 + 4
    assert info["method"] == (method or "find")  # 4 gfn >> 8 groups


def test_scan_m2p_never_matches_invalid_or_shared():
    data = _table({0: INVALID, 1: SHARED, 2: 1 << 62}, 4)
    candidates, _, _ = nxagent.m2p.scan_m2p([(0, data)], [1 << 62, 0, (1 << 63) - 1], 8)
    assert candidates == {1 << 62: [2], 0: [], (1 << 63) - 1: []}


def test_scan_m2p_picks_the_linear_scan_for_many_groups():
    gfns = [g << 8 for g in range(nxagent.abi.M2P_FIND_GROUPS_MAX + 1)]
    data = _table({i: g for i, g in enumerate(gfns)}, 64)
    candidates, truncated, info = nxagent.m2p.scan_m2p([(100, data)], gfns, 1)
    assert info["method"] == "set"
    assert candidates == {g: [100 + i] for i, g in enumerate(gfns)}
    assert truncated == []
    _, _, none = nxagent.m2p.scan_m2p([(0, data)], [], 1)
    assert none == {"method": "find", "segments": 1, "entries": 64}


def test_scan_m2p_random_table_both_methods_agree():
    import random

    rng = random.Random(7)
    values = [rng.choice([INVALID, INVALID, SHARED, rng.randrange(4096)]) for _ in range(20000)]
    data = struct.pack(f"<{len(values)}Q", *values)
    gfns = rng.sample(range(4096), 40)
    by_find = nxagent.m2p.scan_m2p([(64, data)], gfns, 1000, method="find")
    by_set = nxagent.m2p.scan_m2p([(64, data)], gfns, 1000, method="set")
    assert by_find[0] == by_set[0]
    expected = {g: [64 + i for i, v in enumerate(values) if v == g] for g in gfns}
    assert by_find[0] == expected


PROT_NONE = 0
_libc_test = ctypes.CDLL(None, use_errno=True)
_libc_test.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class FakeXen(FakePrivcmd):
    """privcmd on a host whose M2P is `table` (a dict MFN -> entry, the rest INVALID).

    Extent i of the table lives at MFN extents[i]; a repeated MFN is a hole (Xen
    repeats the previous extent's MFN). A frame that fails to map is left
    PROT_NONE in the VMA, so reading it kills the child as SIGBUS would.
    """

    def __init__(self, table, extents, max_page, frame_errors=None, hypercall_errno=None,
                 map_rc_errno=None):
        super().__init__(frame_errors=frame_errors, rc_errno=map_rc_errno)
        self.table = table
        self.extents = extents
        self.max_page = max_page
        self.hypercall_errno = hypercall_errno

    @staticmethod
    def map_vma(fd, npages, prot):
        assert prot == "r"
        return nxagent.privcmd.mmap_raw(
            npages * PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1,
        )

    def frame_page(self, frame: int) -> bytes:
        for index, base in enumerate(self.extents):
            if base <= frame < base + 512 and base not in self.extents[:index]:
                first = index * CHUNK + (frame - base) * 512
                return struct.pack(
                    "<512Q", *(self.table.get(first + i, INVALID) for i in range(512))
                )
        raise AssertionError(f"frame {frame:#x} is not part of the M2P")

    def ioctl(self, fd, request, arg):
        if request == nxagent.abi.IOCTL["HYPERCALL"]:
            assert arg.op == 12
            cmd = arg.arg[0]
            if self.hypercall_errno and cmd == 5:
                return -1, self.hypercall_errno
            if cmd == 2:
                assert arg.arg[1] == 0
                return self.max_page, 0
            assert cmd == 5
            xmml = nxagent.abi.XenMachphysMfnList.from_address(arg.arg[1])
            assert xmml.max_extents >= 4096
            count = min(len(self.extents), xmml.max_extents)
            out = (ctypes.c_uint64 * count).from_address(xmml.extent_start)
            out[:] = self.extents[:count]
            xmml.nr_extents = count
            return 0, 0
        if request == nxagent.abi.IOCTL["MMAPBATCH_V2"]:
            assert arg.dom == 0x7FF2
            frames = (ctypes.c_uint64 * arg.num).from_address(arg.arr)
            errs = (ctypes.c_int * arg.num).from_address(arg.err)
            failed_as_a_whole = self.rc_errno not in (None, errno.ENOENT)
            for i, frame in enumerate(frames):
                va = arg.addr + i * PAGE
                err = self.frame_errors.get(frame, 0)
                if not failed_as_a_whole:  # then the kernel never writes err[]
                    errs[i] = err
                if err or failed_as_a_whole:
                    assert _libc_test.mprotect(va, PAGE, PROT_NONE) == 0
                else:
                    ctypes.memmove(va, self.frame_page(frame), PAGE)
            if self.rc_errno:
                return -1, self.rc_errno
            return 0, 0
        return -1, errno.ENOTTY


# Three extents: a hole (repeat of extent 0) in the middle, the last one only
# partly below max_page.
M2P_EXTENTS = [0x40000, 0x40000, 0x80200]
M2P_MAX_PAGE = 2 * CHUNK + 1000
M2P_TABLE = {
    0: 0, 17: 0x1234, 513: 0x1234, 600: 7,
    2 * CHUNK + 3: 0x1234, 2 * CHUNK + 999: 0,
    2 * CHUNK + 1000: 0x1234,  # at max_page: beyond the RAM, must not be read
    2 * CHUNK + 520: 0x99,
}


def test_m2p_pipeline(monkeypatch):
    FakeXen(M2P_TABLE, M2P_EXTENTS, M2P_MAX_PAGE).install(monkeypatch)
    answer = nxagent.commands.run_command("m2p", {"gfns": [0x1234, 0, 0x1234, 0x77, 0x99]})
    assert answer["ok"] is True and answer["call"] == "m2p"
    assert answer["crashed"] is None and answer["timed_out"] is False
    assert answer["maximum_ram_page"] == {"rc": M2P_MAX_PAGE, "errno": None, "errno_name": None}
    assert answer["max_page"] == M2P_MAX_PAGE and answer["max_mfn"] == M2P_MAX_PAGE - 1
    assert answer["hypercall"] == {
        "rc": 0, "errno": None, "errno_name": None, "cmd": "XENMEM_machphys_mfn_list"
    }
    assert answer["max_extents"] == 4096
    assert answer["nr_extents"] == 3 and answer["extents"] == M2P_EXTENTS
    assert answer["extent_holes"] == 1
    assert answer["buffer"]["bytes"] == PAGE + 4096 * 8
    assert answer["map"] == {
        "call": "mmapbatch_v2", "domid": 0x7FF2, "rc": 0, "errno": None, "errno_name": None,
        "per_frame_valid": True, "frames": 1024, "mapped": 1024, "errors_nonzero": 0,
        "error_counts": {}, "first_error": None,
    }
    assert answer["gfns"] == [0x1234, 0, 0x77, 0x99]
    assert answer["candidates"] == {
        str(0x1234): [17, 513, 2 * CHUNK + 3],
        "0": [0, 2 * CHUNK + 999],
        str(0x77): [],
        str(0x99): [2 * CHUNK + 520],
    }
    assert answer["truncated"] == []
    assert answer["complete"] is True
    assert answer["scan"]["entries"] == CHUNK + 1000 == answer["scan"]["expected_entries"]
    assert answer["scan"]["limit"] == M2P_MAX_PAGE and answer["scan"]["segments"] == 2
    assert set(answer["seconds"]) == {"hypercall", "map", "scan"}


def test_m2p_max_page_sizes_max_extents(monkeypatch):
    # XENMEM_maximum_ram_page runs first: a table needing 5000 extents asks for 5000.
    FakeXen(M2P_TABLE, M2P_EXTENTS, 5000 * CHUNK).install(monkeypatch)
    answer = nxagent.commands.run_command("m2p", {"gfns": [0x99]})
    assert answer["max_extents"] == 5000
    assert answer["scan"]["limit"] == 3 * CHUNK  # only 3 extents came back
    assert answer["candidates"] == {str(0x99): [2 * CHUNK + 520]}
    assert answer["complete"] is True


def test_m2p_many_gfns_and_truncation(monkeypatch):
    table = {i: 5 for i in range(0, 100, 10)}
    table.update({CHUNK * 2 + i: i << 8 for i in range(1, 20)})
    FakeXen(table, M2P_EXTENTS, M2P_MAX_PAGE).install(monkeypatch)
    gfns = [5] + [i << 8 for i in range(1, 20)]
    answer = nxagent.commands.run_command("m2p", {"gfns": gfns, "max_candidates": 4})
    assert answer["scan"]["method"] == "set"
    assert answer["candidates"]["5"] == [0, 10, 20, 30]
    assert answer["truncated"] == [5]
    assert answer["candidates"][str(3 << 8)] == [CHUNK * 2 + 3]


def test_m2p_skips_frames_that_did_not_map(monkeypatch):
    # The second page of extent 2 fails: its entries (2*CHUNK+512..1023) are not read
    # (reading it would crash the child: the fake leaves it PROT_NONE).
    FakeXen(M2P_TABLE, M2P_EXTENTS, M2P_MAX_PAGE,
            frame_errors={0x80201: -errno.EPERM}).install(monkeypatch)
    answer = nxagent.commands.run_command("m2p", {"gfns": [0x99, 0x1234]})
    assert answer["crashed"] is None
    assert answer["map"]["errors_nonzero"] == 1 and answer["map"]["mapped"] == 1023
    assert answer["map"]["error_counts"] == {"EPERM": 1}
    assert answer["map"]["first_error"] == {"index": 513, "frame": 0x80201, "error": -errno.EPERM}
    assert answer["candidates"][str(0x99)] == []
    assert answer["candidates"][str(0x1234)] == [17, 513, 2 * CHUNK + 3]
    assert answer["complete"] is False
    assert answer["scan"]["entries"] == CHUNK + 512


def test_m2p_whole_map_failure(monkeypatch):
    FakeXen(M2P_TABLE, M2P_EXTENTS, M2P_MAX_PAGE, map_rc_errno=errno.EINVAL).install(monkeypatch)
    answer = nxagent.commands.run_command("m2p", {"gfns": [0x1234]})
    assert answer["ok"] is True and answer["crashed"] is None
    assert answer["map"]["rc"] == -1 and answer["map"]["errno_name"] == "EINVAL"
    assert answer["map"]["errors_nonzero"] is None and answer["map"]["mapped"] == 0
    assert answer["candidates"] == {str(0x1234): []} and answer["complete"] is False


def test_m2p_hypercall_failure(monkeypatch):
    fake = FakeXen(M2P_TABLE, M2P_EXTENTS, M2P_MAX_PAGE, hypercall_errno=errno.EPERM)
    fake.install(monkeypatch)
    answer = nxagent.commands.run_command("m2p", {"gfns": [1]})
    assert answer["ok"] is True
    assert answer["hypercall"]["rc"] == -1 and answer["hypercall"]["errno_name"] == "EPERM"
    assert answer["nr_extents"] is None and answer["extents"] == []
    assert answer["map"] is None and answer["candidates"] == {} and answer["complete"] is False


def test_m2p_crash_while_scanning_is_reported(monkeypatch):
    FakeXen(M2P_TABLE, M2P_EXTENTS, M2P_MAX_PAGE).install(monkeypatch)

    def sigbus(addr, length):
        os.kill(os.getpid(), signal.SIGBUS)

    monkeypatch.setattr(nxagent.m2p, "read_memory", sigbus)
    answer = nxagent.commands.run_command("m2p", {"gfns": [1]})
    assert answer["crashed"]["name"] == "SIGBUS"
    assert answer["crashed"]["stage"] == {"name": "scan", "extent": 0, "mfn": 0x40000}
    assert answer["map"]["errors_nonzero"] == 0  # reported before the scan began


def test_m2p_validation_defaults():
    req = nxagent.validate.validate("m2p", {"gfns": [5, 0, 5]})
    assert req == {"command": "m2p", "gfns": [5, 0], "max_candidates": 64, "timeout_s": 120.0}


@pytest.mark.skipif(os.path.exists("/dev/xen/privcmd"), reason="this machine has privcmd")
def test_program_m2p_without_privcmd(agent_file: Path):
    proc = _agent(agent_file, "m2p", json.dumps({"gfns": [1]}))
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False and answer["call"] == "m2p"
    assert answer["error_stage"] == "open" and "/dev/xen/privcmd" in answer["error"]


# --------------------------------------------------------------------------
# The agent as a program
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def agent_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file shipped to dom0: the package built into one zipapp, in a cache of the test's."""
    return build.built_agent(tmp_path_factory.mktemp("cache"))


def _agent(agent_file: Path, command: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(agent_file), command],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.skipif(os.path.exists("/dev/xen/privcmd"), reason="this machine has privcmd")
def test_program_without_privcmd_answers_json(agent_file: Path):
    proc = _agent(agent_file, "mmapbatch_v2", json.dumps({"domid": 1, "frames": [5, 6]}))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False
    assert "/dev/xen/privcmd" in answer["error"]
    assert answer["error_stage"] == "open"
    assert answer["errno"] is None  # the ioctl never ran
    assert proc.stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["mmapbatch_v2"], "{not json", "stdin is not valid JSON"),
        (["mmapbatch_v2"], '{"domid": 1}', "request.frames: required"),
        (["nope"], "{}", "unknown command 'nope'"),
        ([], "{}", "usage"),
    ],
)
def test_program_request_errors_exit_2(agent_file: Path, args, stdin, message):
    proc = subprocess.run(
        [sys.executable, str(agent_file), *args],
        input=stdin, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    answer = json.loads(proc.stdout)
    assert answer["ok"] is False and message in answer["error"]


def test_program_info(agent_file: Path):
    proc = _agent(agent_file, "info", "")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["ok"] is True
    assert info["agent_version"] == nxagent.abi.AGENT_VERSION
    assert info["page_size"] == mmap.PAGESIZE
    assert info["ioctls"]["MMAPBATCH_V2"] == "0x205004"
    assert info["privcmd_exists"] == os.path.exists("/dev/xen/privcmd")


def test_agent_source_is_python39_and_stdlib_only(agent_file: Path):
    assert agent_file.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert len(AGENT_MODULES) > 1
    for module in AGENT_MODULES:
        source = module.read_text()
        tree = ast.parse(source, feature_version=(3, 9))
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
            assert not isinstance(node, ast.Match)
        assert modules <= set(sys.stdlib_module_names), (module, modules - set(sys.stdlib_module_names))
        assert "from __future__ import annotations" in source, module


# --------------------------------------------------------------------------
# Host client
# --------------------------------------------------------------------------
class FakeRun:
    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []

    def __call__(self, cmd, stdin, timeout):
        self.calls.append((cmd, stdin, timeout))
        answer = self.answers.pop(0)
        if isinstance(answer, tuple):
            return answer
        return 0, json.dumps(answer), ""


V2_ANSWER = {
    "ok": True, "call": "mmapbatch_v2", "domid": 4, "rc": 0, "errno": 0, "errno_name": None,
    "errors": [0, -22],
    "pages": [
        {"frame": 16, "sha256": "ab" * 32, "bytes_b64": "AAEC", "mapped": True},
        {"frame": 17, "sha256": None, "bytes_b64": None, "mapped": False},
    ],
    "crashed": None, "timed_out": False,
}


def test_client_map_foreign():
    run = FakeRun(V2_ANSWER)
    result = Agent(run).map_foreign(4, [16, 17], want="bytes")
    cmd, stdin, timeout = run.calls[0]
    assert cmd == "python3 /usr/local/lib/nested-xen/nxagent.py mmapbatch_v2"
    assert json.loads(stdin) == {
        "domid": 4, "frames": [16, 17], "want": "bytes", "prot": "r", "timeout_s": 60
    }
    assert timeout > 60
    assert result.call == "mmapbatch_v2" and result.rc == 0 and result.ok
    assert result.frames == [
        FrameResult(16, 0, "ab" * 32, b"\x00\x01\x02"),
        FrameResult(17, -22, None, None),
    ]
    assert result.errors == [0, -22]
    assert result.crashed is None and result.timed_out is False


def test_client_reports_crash_without_raising():
    crashed = dict(V2_ANSWER, crashed={"signal": 7, "name": "SIGBUS", "stage": {}})
    result = Agent(FakeRun(crashed)).map_foreign(4, [16, 17])
    assert result.crashed["name"] == "SIGBUS"


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        ((0, "Traceback (most recent call last):\n", ""), "not a JSON object"),
        ((1, "", "python3: can't open file"), "exit status 1"),
        ((127, "", "bash: python3: command not found"), "command not found"),
        ((2, json.dumps({"ok": False, "error": "request.frames[0]: bad"}), ""), "frames[0]: bad"),
        (
            (0, json.dumps({"ok": False, "error": "cannot open /dev/xen/privcmd: No such"}), ""),
            "/dev/xen/privcmd",
        ),
    ],
)
def test_client_errors(reply, fragment):
    with pytest.raises(AgentError) as info:
        Agent(FakeRun(reply)).map_foreign(4, [1])
    assert fragment in str(info.value)
    assert "mmapbatch_v2" in str(info.value)


def test_client_stderr_tail_and_status():
    with pytest.raises(AgentError) as info:
        Agent(FakeRun((1, "", "x" * 5000 + "THE END"))).info()
    assert info.value.status == 1
    assert info.value.stderr.endswith("THE END") and len(info.value.stderr) < 2000


def test_client_batch_and_helpers():
    devmem = {"ok": True, "call": "devmem", "rc": 8, "errno": 0, "sha256": "cd" * 32}
    failed = {"ok": False, "call": "mmap", "error": "cannot open /dev/xen/privcmd"}
    run = FakeRun({"ok": True, "call": "batch", "results": [V2_ANSWER, devmem, failed]})
    calls = [
        agent_client.map_request(4, [16, 17]),
        agent_client.devmem_request(0x1000, 8),
        agent_client.map_request(4, [1], call="mmap", timeout_s=5),
    ]
    results = Agent(run).batch(calls)
    assert isinstance(results[0], MapResult) and results[0].errors == [0, -22]
    assert results[1] == devmem
    assert isinstance(results[2], MapResult) and not results[2].ok
    assert results[2].error == "cannot open /dev/xen/privcmd"
    sent = json.loads(run.calls[0][1])
    assert [c["command"] for c in sent["calls"]] == ["mmapbatch_v2", "devmem", "mmap"]
    assert run.calls[0][2] >= 125  # the per-call timeouts add up
    for call in sent["calls"]:  # every request the client builds passes the agent's checks
        nxagent.validate.validate(call["command"], call)


def test_client_restrict_then_map_and_p2m():
    rtm = dict(V2_ANSWER, call="restrict_then_map",
               restrict=[{"domid": 9, "rc": 0, "errno": 0, "errno_name": None}])
    run = FakeRun(rtm, {"ok": True, "call": "p2m", "p2m": {"0": 74240, "2": 80640}})
    agent = Agent(run)
    result = agent.restrict_then_map(4, [16, 17], restrict_domid=9)
    assert result.restrict[0]["domid"] == 9
    sent = json.loads(run.calls[0][1])
    assert sent["restrict_domid"] == 9 and sent["call"] == "mmapbatch_v2"
    nxagent.validate.validate("restrict_then_map", sent)
    assert agent.p2m(3, [0, 2]) == {0: 74240, 2: 80640}
    assert json.loads(run.calls[1][1])["pfns"] == [0, 2]

    short = FakeRun({"ok": True, "call": "p2m", "p2m": {"0": 1}, "missing": [9], "p2m_size": 4})
    with pytest.raises(AgentError, match="0x9"):
        Agent(short).p2m(3, [0, 9])


def test_client_handshake():
    info = {"ok": True, "call": "info", "agent_version": nxagent.abi.AGENT_VERSION}
    run = FakeRun(info)
    assert Agent(run).handshake() == info
    assert run.calls[0][0].endswith("/usr/local/lib/nested-xen/nxagent.py info")

    stale = FakeRun(dict(info, agent_version="0.0"))
    with pytest.raises(AgentError, match="reports version '0.0', expected"):
        Agent(stale).handshake()


def test_client_devmem_decodes_bytes():
    run = FakeRun({"ok": True, "call": "devmem", "rc": 3, "errno": 0, "bytes_b64": "AAEC"})
    answer = Agent(run).devmem(0xF0000, 3, want="bytes")
    assert answer["data"] == b"\x00\x01\x02"


M2P_ANSWER = {
    "ok": True, "call": "m2p", "gfns": [4660, 0, 119], "max_candidates": 2,
    "maximum_ram_page": {"rc": 525288, "errno": None, "errno_name": None},
    "max_page": 525288, "max_mfn": 525287,
    "hypercall": {"rc": 0, "errno": None, "errno_name": None, "cmd": "XENMEM_machphys_mfn_list"},
    "nr_extents": 3, "extents": [262144, 262144, 524800], "extent_holes": 1,
    "map": {"call": "mmapbatch_v2", "domid": 32754, "rc": 0, "errno": None, "errno_name": None,
            "per_frame_valid": True, "frames": 1024, "mapped": 1024, "errors_nonzero": 0,
            "error_counts": {}, "first_error": None},
    "candidates": {"4660": [17, 513], "0": [0], "119": []},
    "truncated": [4660], "complete": True,
    "crashed": None, "timed_out": False, "stage": None,
}


def test_client_m2p():
    run = FakeRun(M2P_ANSWER)
    result = Agent(run).m2p([0x1234, 0, 0x77], max_candidates=2)
    cmd, stdin, timeout = run.calls[0]
    assert cmd == "python3 /usr/local/lib/nested-xen/nxagent.py m2p"
    sent = json.loads(stdin)
    assert sent == {"gfns": [0x1234, 0, 0x77], "max_candidates": 2, "timeout_s": 120}
    nxagent.validate.validate("m2p", sent)
    assert timeout > 120
    assert isinstance(result, M2PResult)
    assert result.candidates == {0x1234: [17, 513], 0: [0], 0x77: []}
    assert (result.hypercall_rc, result.max_mfn, result.nr_extents) == (0, 525287, 3)
    assert result.map_errors == 0 and result.map_rc == 0 and result.map_frames == 1024
    assert result.mapped and result.complete and result.ok
    assert result.truncated == [0x1234]
    assert result.extents == [262144, 262144, 524800]
    assert result.crashed is None and result.timed_out is False
    assert result.hypercall_errno_name is None and result.error is None


def test_client_m2p_failures():
    failed = {"ok": False, "call": "m2p", "error": "cannot open /dev/xen/privcmd: No such file",
              "error_stage": "open"}
    with pytest.raises(AgentError, match="nxagent m2p: cannot open /dev/xen/privcmd") as info:
        Agent(FakeRun(failed)).m2p([1])
    assert info.value.answer["error_stage"] == "open"

    refused = dict(M2P_ANSWER, hypercall={"rc": -1, "errno": 1, "errno_name": "EPERM"},
                   nr_extents=None, extents=[], map=None, candidates={}, truncated=[],
                   complete=False)
    result = Agent(FakeRun(refused)).m2p([1])  # ran, but Xen said no: reported, not raised
    assert result.hypercall_rc == -1 and result.hypercall_errno_name == "EPERM"
    assert result.map_errors is None and result.map_rc is None and not result.mapped
    assert result.candidates == {} and not result.complete

    partial = dict(M2P_ANSWER, map=dict(M2P_ANSWER["map"], errors_nonzero=3, mapped=1021),
                   crashed={"signal": 7, "name": "SIGBUS", "stage": {"name": "scan"}},
                   complete=False)
    result = Agent(FakeRun(partial)).m2p([1])
    assert result.map_errors == 3 and not result.mapped
    assert result.crashed["name"] == "SIGBUS"


def test_client_batch_parses_m2p():
    failed = {"ok": False, "call": "m2p", "error": "cannot open /dev/xen/privcmd"}
    run = FakeRun({"ok": True, "call": "batch", "results": [M2P_ANSWER, failed]})
    calls = [agent_client.m2p_request([0x1234]), agent_client.m2p_request([1], timeout_s=5)]
    results = Agent(run).batch(calls)
    assert isinstance(results[0], M2PResult) and results[0].candidates[0] == [0]
    assert isinstance(results[1], M2PResult) and not results[1].ok
    assert results[1].error == "cannot open /dev/xen/privcmd"
    for call in json.loads(run.calls[0][1])["calls"]:
        nxagent.validate.validate(call["command"], call)
