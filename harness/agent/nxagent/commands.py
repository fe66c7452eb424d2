"""The commands: each one's runner, info, p2m through xen-mfndump, batch, and run_command()."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import mmap
import os
import platform
import re
import shutil
import subprocess

from . import abi, privcmd
from .abi import AGENT_VERSION, IOCTL, IOCTL_TABLE, PRIVCMD_PATH, SYS_HYPERVISOR, XenMachphysMfnList
from .dirty import body_dirty_scan, body_write_page
from .errors import EnvironmentProblem, RequestError, errno_name
from .isolation import run_isolated
from .m2p import body_m2p
from .mapping import body_devmem, body_map, body_restrict_then_map
from .validate import VALIDATORS, validate


def _map_base(req: dict, call: str) -> dict:
    frames = req["frames"]
    return {
        "ok": True,
        "call": call,
        "domid": req["domid"],
        "prot": req["prot"],
        "rc": None,
        "errno": None,
        "errno_name": None,
        "errors": [None] * len(frames),
        "pages": [
            {"frame": f, "mapped": False, "sha256": None, "bytes_b64": None, "touched": False}
            for f in frames
        ],
    }


def run_map(req: dict) -> dict:
    return run_isolated(body_map, req, _map_base(req, req["command"]))


def run_restrict_then_map(req: dict) -> dict:
    base = _map_base(req, "restrict_then_map")
    base.update(map_call=req["map_call"], restrict=[])
    return run_isolated(body_restrict_then_map, req, base)


def run_devmem(req: dict) -> dict:
    base = {
        "ok": True,
        "call": "devmem",
        "address": req["address"],
        "length": req["length"],
        "method": req["method"],
        "rc": None,
        "errno": None,
        "errno_name": None,
        "sha256": None,
        "bytes_b64": None,
    }
    return run_isolated(body_devmem, req, base)


def run_m2p(req: dict) -> dict:
    base = {
        "ok": True,
        "call": "m2p",
        "gfns": req["gfns"],
        "max_candidates": req["max_candidates"],
        "maximum_ram_page": None,
        "max_page": None,
        "max_mfn": None,
        "hypercall": None,
        "buffer": None,
        "max_extents": None,
        "nr_extents": None,
        "extents": [],
        "extent_holes": None,
        "map": None,
        "candidates": {},
        "truncated": [],
        "complete": False,
        "scan": None,
        "seconds": {},
    }
    return run_isolated(body_m2p, req, base)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _hypervisor_info() -> dict:
    def part(name: str) -> str | None:
        return _read_text(os.path.join(SYS_HYPERVISOR, name))

    version = None
    major, minor, extra = part("version/major"), part("version/minor"), part("version/extra")
    if major is not None and minor is not None:
        version = "{}.{}{}".format(major, minor, extra or "")
    features = part("properties/features")
    auto_translated = None
    if features:
        with contextlib.suppress(ValueError):
            # bit 2 is XENFEAT_auto_translated_physmap
            auto_translated = bool(int(features, 16) & (1 << 2))
    return {
        "type": part("type"),
        "guest_type": part("guest_type"),
        "version": version,
        "features": features,
        "auto_translated_physmap": auto_translated,
    }


def _probe_privcmd() -> dict:
    out = {"path": PRIVCMD_PATH, "exists": os.path.exists(PRIVCMD_PATH), "open_errno": None,
           "open_errno_name": None, "unimplemented_ioctl_errno_name": None}
    try:
        fd = os.open(PRIVCMD_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        out.update(open_errno=exc.errno, open_errno_name=errno_name(exc.errno))
        return out
    try:
        rc, err = privcmd.privcmd_ioctl(fd, IOCTL["UNIMPLEMENTED"], 0)
        out["unimplemented_ioctl_errno_name"] = errno_name(err) if rc < 0 else "succeeded?!"
    finally:
        os.close(fd)
    return out


def run_info(req: dict) -> dict:
    uname = os.uname()
    return {
        "ok": True,
        "call": "info",
        "agent_version": AGENT_VERSION,
        "python": platform.python_version(),
        "kernel_release": uname.release,
        "machine": uname.machine,
        "page_size": mmap.PAGESIZE,
        "euid": os.geteuid(),
        "privcmd_exists": os.path.exists(PRIVCMD_PATH),
        "privcmd": _probe_privcmd(),
        "guest_type": _read_text(os.path.join(SYS_HYPERVISOR, "guest_type")),
        "hypervisor": _hypervisor_info(),
        "devmem_exists": os.path.exists(abi.DEVMEM_PATH),
        "xen_mfndump": find_mfndump(None),
        "ioctls": {name: hex(number) for name, number in IOCTL.items()},
        "struct_sizes": {name: ctypes.sizeof(t) for name, _, t in IOCTL_TABLE},
        "xen_struct_sizes": {"xen_machphys_mfn_list": ctypes.sizeof(XenMachphysMfnList)},
        "commands": sorted(COMMANDS),
    }


# --- p2m through xen-mfndump (tools/misc/xen-mfndump.c, dump-p2m) -----------
P2M_HEADER_RE = re.compile(r"Guest Width: (\d+), PT Levels: (\d+) P2M size: = (\d+)")
P2M_LINE_RE = re.compile(
    r"^\s*pfn=0x([0-9a-fA-F]+) ==> mfn=0x([0-9a-fA-F]+) \(type 0x([0-9a-fA-F]+)\)\s*(.*)$"
)


def _version_key(path: str) -> list:
    return [int(n) for n in re.findall(r"\d+", path)]


def find_mfndump(explicit: str | None) -> str | None:
    """xen-mfndump: Debian installs it in /usr/lib/xen-<ver>/bin, off PATH."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("xen-mfndump")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/xen-*/bin/xen-mfndump"), key=_version_key,
                        reverse=True)
    candidates += ["/usr/lib/xen/bin/xen-mfndump", "/usr/local/lib/xen/bin/xen-mfndump",
                   "/usr/sbin/xen-mfndump", "/usr/local/sbin/xen-mfndump"]
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return None


def parse_mfndump_p2m(text: str) -> dict:
    """Parse `xen-mfndump dump-p2m` stdout: header numbers and pfn -> (mfn, type, note)."""
    header = P2M_HEADER_RE.search(text)
    entries = {}
    for line in text.splitlines():
        match = P2M_LINE_RE.match(line)
        if match:
            entries[int(match.group(1), 16)] = (
                int(match.group(2), 16), int(match.group(3), 16), match.group(4).strip()
            )
    return {
        "guest_width": int(header.group(1)) if header else None,
        "pt_levels": int(header.group(2)) if header else None,
        "p2m_size": int(header.group(3)) if header else None,
        "entries": entries,
    }


def _tail(text: str, limit: int = 2000) -> str:
    return text[-limit:]


def run_p2m(req: dict) -> dict:
    answer = {"ok": False, "call": "p2m", "domid": req["domid"]}
    tool = find_mfndump(req["tool"])
    if tool is None:
        answer["error"] = (
            "xen-mfndump not found (%s; looked on PATH and in /usr/lib/xen-*/bin)"
            % (req["tool"] or "no explicit tool given")
        )
        return answer
    argv = [tool, "dump-p2m", str(req["domid"])]
    answer["tool"] = tool
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=req["timeout_s"], check=False)
    except subprocess.TimeoutExpired:
        answer.update(error="{} timed out after {:g}s".format(" ".join(argv), req["timeout_s"]),
                      timed_out=True)
        return answer
    except OSError as exc:
        answer["error"] = "cannot run {}: {}".format(" ".join(argv), exc.strerror)
        return answer
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace")
    parsed = parse_mfndump_p2m(stdout)
    if proc.returncode != 0 or not parsed["entries"]:
        answer.update(
            error="{} exited {} with {} p2m lines; stderr: {}".format(
                " ".join(argv), proc.returncode, len(parsed["entries"]),
                _tail(stderr, 500).strip() or "(empty)"),
            exit_status=proc.returncode,
            stdout_tail=_tail(stdout),
            stderr_tail=_tail(stderr),
        )
        return answer
    entries = parsed["entries"]
    wanted = sorted(entries) if req["pfns"] is None else req["pfns"]
    answer.update(
        ok=True,
        guest_width=parsed["guest_width"],
        pt_levels=parsed["pt_levels"],
        p2m_size=parsed["p2m_size"],
        p2m={str(p): entries[p][0] for p in wanted if p in entries},
        types={str(p): entries[p][1] for p in wanted if p in entries},
        missing=[p for p in wanted if p not in entries],
    )
    return answer


def run_dirty_scan(req: dict) -> dict:
    base = {"ok": True, "call": "dirty_scan", "domid": req["domid"], "frames": len(req["frames"]),
            "cursor": None, "nonces": [], "runs": []}
    return run_isolated(body_dirty_scan, req, base)


def run_write_page(req: dict) -> dict:
    base = {"ok": True, "call": "write_page", "domid": req["domid"], "frame": req["frame"], "rc": None,
            "errno": None, "errno_name": None, "frame_error": None, "written": False, "old_b64": None,
            "sha256": None}
    return run_isolated(body_write_page, req, base)


def run_batch(req: dict) -> dict:
    results = []
    for call in req["calls"]:
        try:
            results.append(COMMANDS[call["command"]][1](call))
        except EnvironmentProblem as exc:
            answer = exc.to_answer()
            answer["call"] = call["command"]
            results.append(answer)
    return {"ok": True, "call": "batch", "results": results}


# name -> runner
RUNNERS = {
    "info": run_info,
    "mmapbatch_v2": run_map,
    "mmapbatch": run_map,
    "mmap": run_map,
    "restrict_then_map": run_restrict_then_map,
    "devmem": run_devmem,
    "p2m": run_p2m,
    "m2p": run_m2p,
    "dirty_scan": run_dirty_scan,
    "write_page": run_write_page,
    "batch": run_batch,
}
# name -> (validator, runner)
COMMANDS = {name: (validator, RUNNERS[name]) for name, validator in VALIDATORS.items()}


def run_command(command: str, request: object) -> dict:
    """Validate and run one command (raises RequestError on a bad request)."""
    if command not in COMMANDS:
        raise RequestError(
            "unknown command {!r}; commands: {}".format(command, ", ".join(sorted(COMMANDS)))
        )
    req = validate(command, request)
    try:
        return COMMANDS[command][1](req)
    except EnvironmentProblem as exc:
        answer = exc.to_answer()
        answer["call"] = command
        return answer


