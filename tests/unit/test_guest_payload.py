"""Unit tests for harness.guest_payload and the probe it ships (no VM needed).

The probe tests compile images/guests/probe.c and run it here as an ordinary
process; they are skipped when gcc (or the static libc) is missing.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import selectors
import shutil
import stat
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from harness.guest_payload import (
    BUSYBOX_APPLETS,
    INIT_SCRIPT,
    PROBE_SOURCE,
    CpioEntry,
    GuestPayloadError,
    build_guest_initramfs,
    compile_probe,
    newc_cpio_bytes,
    write_newc_cpio,
)
from harness.probe_report import expected_page_bytes, parse_probe_log

HAVE_CPIO = shutil.which("cpio") is not None
needs_cpio = pytest.mark.skipif(not HAVE_CPIO, reason="cpio not installed (apt-get install cpio)")


def fake_elf(interp: bool = False) -> bytes:
    """A minimal ELF64 header, with one PT_INTERP program header if interp."""
    phnum = 1 if interp else 0
    header = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 3, 4, 0, 0, 0, 0, 0, 1) if interp else b""
    return header + phdr + b"payload"


def parse_newc(data: bytes) -> list[dict[str, object]]:
    """Independent newc reader; asserts the format's alignment rules."""
    members, offset = [], 0
    while True:
        assert offset % 4 == 0
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        body = name_start + namesize + (-(110 + namesize) % 4)
        content = data[body : body + filesize]
        offset = body + filesize + (-filesize % 4)
        members.append({"name": name, "mode": fields[1], "nlink": fields[4], "data": content,
                        "rdev": (fields[9], fields[10])})  # fmt: skip
        if name == "TRAILER!!!":
            assert offset == len(data)
            return members


SAMPLE = [
    CpioEntry.directory("bin"),
    CpioEntry.directory("etc", 0o700),
    CpioEntry.file("bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
    CpioEntry.file("etc/odd", b"x" * 5),
    CpioEntry.file("empty", b""),
    CpioEntry.symlink("bin/sh", "tool"),
]
DEVICES = [CpioEntry.chardev("console", 5, 1), CpioEntry.chardev("null", 1, 3, 0o666)]


# ------------------------------------------------------------------ cpio writer


def test_newc_layout_and_trailer() -> None:
    members = parse_newc(newc_cpio_bytes(SAMPLE + DEVICES))
    by_name = {m["name"]: m for m in members}
    assert [m["name"] for m in members][-1] == "TRAILER!!!"
    assert by_name["bin"]["mode"] == stat.S_IFDIR | 0o755 and by_name["bin"]["nlink"] == 2
    assert by_name["bin/tool"]["data"] == b"#!/bin/sh\necho hi\n"
    assert by_name["bin/tool"]["mode"] == stat.S_IFREG | 0o755
    assert by_name["bin/sh"]["mode"] == stat.S_IFLNK | 0o777
    assert by_name["bin/sh"]["data"] == b"tool"
    assert by_name["console"]["mode"] == stat.S_IFCHR | 0o600
    assert by_name["console"]["rdev"] == (5, 1)
    assert by_name["null"]["rdev"] == (1, 3)


def test_write_is_gzipped_and_reproducible(tmp_path: Path) -> None:
    first = write_newc_cpio(SAMPLE, tmp_path / "a.cpio.gz")
    second = write_newc_cpio(SAMPLE, tmp_path / "b.cpio.gz")
    assert first.read_bytes() == second.read_bytes()
    assert gzip.decompress(first.read_bytes()) == newc_cpio_bytes(SAMPLE)
    plain = write_newc_cpio(SAMPLE, tmp_path / "c.cpio", gzip_level=None)
    assert plain.read_bytes() == newc_cpio_bytes(SAMPLE)
    assert not list(tmp_path.glob("*.tmp"))


@needs_cpio
def test_real_cpio_lists_archive(tmp_path: Path) -> None:
    archive = newc_cpio_bytes(SAMPLE + DEVICES)
    out = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive, capture_output=True, check=True
    ).stdout.decode()
    listing = {line.split()[-1] if "->" not in line else line.split()[-3]: line
               for line in out.splitlines()}  # fmt: skip
    assert set(listing) == {e.name for e in SAMPLE + DEVICES}
    assert listing["console"].startswith("crw-------")
    assert "5,   1" in listing["console"] or "5, 1" in listing["console"]
    assert listing["bin/sh"].startswith("lrwxrwxrwx") and listing["bin/sh"].endswith("-> tool")


@needs_cpio
def test_real_cpio_extracts_archive(tmp_path: Path) -> None:
    entries = SAMPLE + (DEVICES if os.geteuid() == 0 else [])
    archive = gzip.decompress(write_newc_cpio(entries, tmp_path / "x.cpio.gz").read_bytes())
    dest = tmp_path / "root"
    dest.mkdir()
    subprocess.run(
        ["cpio", "-idv", "--quiet", "--no-absolute-filenames"],
        input=archive, cwd=dest, capture_output=True, check=True,
    )  # fmt: skip
    assert (dest / "bin/tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((dest / "bin/tool").stat().st_mode) == 0o755
    assert (dest / "etc/odd").read_bytes() == b"xxxxx"
    assert (dest / "empty").stat().st_size == 0
    assert os.readlink(dest / "bin/sh") == "tool"
    if os.geteuid() == 0:
        st = (dest / "console").lstat()
        assert stat.S_ISCHR(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)


# ------------------------------------------------------------------ initramfs


def test_initramfs_layout(tmp_path: Path) -> None:
    busybox, probe = tmp_path / "busybox", tmp_path / "probe"
    busybox.write_bytes(fake_elf())
    probe.write_bytes(fake_elf() + b"probe")
    out = build_guest_initramfs(busybox, probe, tmp_path / "initrd.gz")
    members = {m["name"]: m for m in parse_newc(gzip.decompress(out.read_bytes()))}
    for directory in ("bin", "dev", "proc", "sys", "tmp"):
        assert stat.S_ISDIR(members[directory]["mode"])
    assert members["bin/busybox"]["data"] == fake_elf()
    assert members["probe"]["data"] == fake_elf() + b"probe"
    for applet in ("sh", "mount", "sleep", "cat", "echo", "mkdir"):
        assert applet in BUSYBOX_APPLETS
        assert members[f"bin/{applet}"]["data"] == b"busybox"
    expected_nodes = {"dev/console": (5, 1), "dev/null": (1, 3), "dev/hvc0": (229, 0),
                      "dev/ttyS0": (4, 64)}  # fmt: skip
    for name, rdev in expected_nodes.items():
        assert stat.S_ISCHR(members[name]["mode"]) and members[name]["rdev"] == rdev
    init = members["init"]
    assert init["mode"] == stat.S_IFREG | 0o755
    assert init["data"] == INIT_SCRIPT.encode()


def test_init_script_is_valid_sh_and_never_exits(tmp_path: Path) -> None:
    assert INIT_SCRIPT.startswith("#!/bin/sh\n")
    for needed in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs",
                   "NXPROBE-INIT up", "/probe > /dev/console 2>&1 &",
                   "while :; do sleep 3600; done"):  # fmt: skip
        assert needed in INIT_SCRIPT
    script = tmp_path / "init"
    script.write_text(INIT_SCRIPT)
    subprocess.run(["sh", "-n", str(script)], check=True)


def test_dynamic_or_missing_binaries_are_refused(tmp_path: Path) -> None:
    static, dynamic, text = tmp_path / "static", tmp_path / "dynamic", tmp_path / "text"
    static.write_bytes(fake_elf())
    dynamic.write_bytes(fake_elf(interp=True))
    text.write_text("#!/bin/sh\n")
    out = tmp_path / "initrd.gz"
    with pytest.raises(GuestPayloadError, match="dynamically linked.*busybox-static"):
        build_guest_initramfs(dynamic, static, out)
    with pytest.raises(GuestPayloadError, match="probe.*dynamically linked"):
        build_guest_initramfs(static, dynamic, out)
    with pytest.raises(GuestPayloadError, match="not an ELF"):
        build_guest_initramfs(text, static, out)
    with pytest.raises(GuestPayloadError, match="busybox-static"):
        build_guest_initramfs(tmp_path / "absent", static, out)
    assert not out.exists()


@pytest.mark.skipif(not Path("/bin/busybox").exists(), reason="busybox not installed")
def test_host_busybox_is_accepted_if_static(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.write_bytes(fake_elf())
    try:
        out = build_guest_initramfs(Path("/bin/busybox"), probe, tmp_path / "initrd.gz")
    except GuestPayloadError as exc:
        assert "dynamically linked" in str(exc)  # Debian's "busybox", not "busybox-static"
    else:
        assert out.stat().st_size > 100_000


# ------------------------------------------------------------------ compile_probe


def test_compile_probe_missing_compiler(tmp_path: Path) -> None:
    with pytest.raises(GuestPayloadError, match="no-such-cc.*not found.*gcc libc6-dev"):
        compile_probe(PROBE_SOURCE, tmp_path / "probe", cc="no-such-cc")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_compile_probe_failure_includes_stderr(tmp_path: Path) -> None:
    src = tmp_path / "broken.c"
    src.write_text("int main(void) { return undefined_symbol_xyz; }\n")
    with pytest.raises(GuestPayloadError, match="(?s)libc6-dev.*undefined_symbol_xyz"):
        compile_probe(src, tmp_path / "probe")
    assert not (tmp_path / "probe").exists()


# ------------------------------------------------------------------ the probe itself




def read_until(proc: subprocess.Popen[bytes], done: str, timeout: float = 20.0) -> str:
    """Read proc's stdout until it contains done, it closes, or the timeout passes."""
    assert proc.stdout is not None
    text, deadline = b"", time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while done.encode() not in text and time.monotonic() < deadline:
            if sel.select(timeout=max(0.0, deadline - time.monotonic())):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                text += chunk
    return text.decode(errors="replace")


def run_probe(probe: Path, *args: str, until: str, exit_s: float = 0.0) -> tuple[str, int]:
    """Start the probe, read until the marker, give it exit_s to exit, then kill it."""
    proc = subprocess.Popen([str(probe), *args], stdout=subprocess.PIPE)
    try:
        text = read_until(proc, until)
        proc.wait(timeout=exit_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
    return text, rc


def test_compiles_without_warnings(probe_bin: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(tmp_path / "p"),
         str(PROBE_SOURCE)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert proc.stderr == ""


@pytest.mark.parametrize("size", [0, 1, 3, 55, 56, 57, 63, 64, 65, 119, 120, 4096, 100_003])
def test_probe_sha256_and_crc32_match_python(probe_bin: Path, size: int) -> None:
    data = hashlib.sha256(str(size).encode()).digest() * (size // 32 + 1)
    data = data[:size]
    out = subprocess.run(
        [str(probe_bin), "--hash"], input=data, capture_output=True, check=True, timeout=20
    ).stdout.decode()
    assert out == f"{hashlib.sha256(data).hexdigest()} {zlib.crc32(data):08x}\n"


def test_probe_report_matches_python_model(probe_bin: Path) -> None:
    text, rc = run_probe(probe_bin, "nxprobe.pages=4", "--once", until='"ev":"ready"', exit_s=10)
    assert rc == 0, text
    state = parse_probe_log(text)
    assert state.rejected == 0 and state.error is None, text
    report = state.report
    assert report is not None, text
    assert len(report.pages) == 4 and report.page_size == 4096 and report.tick_ms == 0
    for page in report.pages:
        assert page.pfn >= 0  # 0 when pagemap hides PFNs from non-root
        expected = hashlib.sha256(expected_page_bytes(report.nonce, page.index)).hexdigest()
        assert page.sha256 == expected
    if os.geteuid() == 0:
        assert all(pfn > 0 for pfn in report.pfns)


def test_probe_nonce_differs_between_runs(probe_bin: Path) -> None:
    nonces = set()
    for _ in range(2):
        text, _rc = run_probe(probe_bin, "nxprobe.pages=1", "--once", until='"ev":"ready"')
        nonces.add(parse_probe_log(text).nonce)
    assert len(nonces) == 2


def test_probe_ticks_and_dirtying(probe_bin: Path) -> None:
    args = ("nxprobe.pages=2", "nxprobe.tick_ms=20", "nxprobe.dirty_mb=1", "nxprobe.dirty_pct=500")
    text, _rc = run_probe(probe_bin, *args, until="NXTICK 3 ")
    state = parse_probe_log(text)
    assert state.report is not None and state.report.tick_ms == 20, text
    ticks = state.ticks
    assert [t.seq for t in ticks[:4]] == [0, 1, 2, 3]
    gaps = [b.mono_ns - a.mono_ns for a, b in zip(ticks, ticks[1:], strict=False)]
    assert all(gap > 10_000_000 for gap in gaps), gaps
    assert all(t.real_ns > 1_500_000_000 * 10**9 for t in ticks)


def test_probe_rejects_bad_option(probe_bin: Path) -> None:
    proc = subprocess.run(
        [str(probe_bin), "nxprobe.pages=lots"], capture_output=True, text=True, timeout=20
    )
    assert proc.returncode == 1
    state = parse_probe_log(proc.stdout)
    assert state.error is not None and "nxprobe.pages" in state.error
