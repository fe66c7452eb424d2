"""Request validation: every command's request checked and completed with its defaults."""

from __future__ import annotations

import base64

from .abi import (
    DEFAULT_MAX_CANDIDATES,
    DEFAULT_TIMEOUT_S,
    DEVMEM_METHODS,
    DOMID_MAX,
    M2P_DEFAULT_TIMEOUT_S,
    MAP_CALLS,
    MAX_CANDIDATES_LIMIT,
    MAX_DEVMEM_LENGTH,
    MAX_FRAMES,
    MAX_GFN,
    MAX_TIMEOUT_S,
    PROTS,
    U64_MAX,
    WANTS,
    XEN_PAGE_SIZE,
)
from .errors import RequestError

_MISSING = object()


def _check_keys(req: dict, allowed: tuple, where: str) -> None:
    unknown = sorted(set(req) - set(allowed) - {"command"})
    if unknown:
        raise RequestError(
            "{}: unknown key(s) {}; allowed: {}".format(
                where, ", ".join(unknown), ", ".join(allowed)
            )
        )


def _get_int(req: dict, key: str, where: str, lo: int, hi: int, default=_MISSING) -> int:
    if key not in req:
        if default is _MISSING:
            raise RequestError(f"{where}.{key}: required (an integer in [{lo}, {hi}])")
        return default
    value = req[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(
            f"{where}.{key}: expected an integer, got {type(value).__name__} {value!r}"
        )
    if not lo <= value <= hi:
        raise RequestError(f"{where}.{key}: {value} is outside [{lo}, {hi}]")
    return value


def _get_choice(req: dict, key: str, where: str, choices: tuple, default: str) -> str:
    value = req.get(key, default)
    if value not in choices:
        raise RequestError(
            "{}.{}: {!r} is not one of {}".format(where, key, value, ", ".join(choices))
        )
    return value


def _get_timeout(req: dict, where: str, default: float = DEFAULT_TIMEOUT_S) -> float:
    value = req.get("timeout_s", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{where}.timeout_s: expected a number of seconds, got {value!r}")
    if not 0 < value <= MAX_TIMEOUT_S:
        raise RequestError(f"{where}.timeout_s: {value!r} is outside (0, {MAX_TIMEOUT_S:g}]")
    return float(value)


def _get_int_list(req: dict, key: str, where: str, hi: int, required: bool = True) -> list | None:
    if key not in req or req[key] is None:
        if required:
            raise RequestError(f"{where}.{key}: required (a list of integers)")
        return None
    values = req[key]
    if not isinstance(values, list):
        raise RequestError(f"{where}.{key}: expected a list, got {type(values).__name__}")
    if len(values) > MAX_FRAMES:
        raise RequestError(f"{where}.{key}: {len(values)} entries, at most {MAX_FRAMES}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
            raise RequestError(
                f"{where}.{key}[{i}]: {value!r} is not an integer in [0, {hi}]"
            )
    return list(values)


def _validate_map_fields(req: dict, where: str) -> dict:
    return {
        "domid": _get_int(req, "domid", where, 0, DOMID_MAX),
        "frames": _get_int_list(req, "frames", where, U64_MAX),
        "want": _get_choice(req, "want", where, WANTS, "sha256"),
        "prot": _get_choice(req, "prot", where, PROTS, "r"),
        "timeout_s": _get_timeout(req, where),
    }


def validate_info(req: dict, where: str) -> dict:
    _check_keys(req, ("timeout_s",), where)
    return {"timeout_s": _get_timeout(req, where)}


def validate_map(req: dict, where: str) -> dict:
    _check_keys(req, ("domid", "frames", "want", "prot", "timeout_s"), where)
    return _validate_map_fields(req, where)


def validate_restrict_then_map(req: dict, where: str) -> dict:
    _check_keys(
        req, ("domid", "frames", "restrict_domid", "call", "want", "prot", "timeout_s"), where
    )
    out = _validate_map_fields(req, where)
    restrict = req.get("restrict_domid", _MISSING)
    if isinstance(restrict, list):
        out["restrict_domids"] = _get_int_list(req, "restrict_domid", where, DOMID_MAX)
    else:
        out["restrict_domids"] = [_get_int(req, "restrict_domid", where, 0, DOMID_MAX)]
    out["map_call"] = _get_choice(req, "call", where, MAP_CALLS, "mmapbatch_v2")
    return out


def validate_devmem(req: dict, where: str) -> dict:
    _check_keys(req, ("address", "length", "want", "method", "timeout_s"), where)
    length = _get_int(req, "length", where, 1, MAX_DEVMEM_LENGTH)
    return {
        "address": _get_int(req, "address", where, 0, (1 << 63) - 1 - length),
        "length": length,
        "want": _get_choice(req, "want", where, ("sha256", "bytes"), "sha256"),
        "method": _get_choice(req, "method", where, DEVMEM_METHODS, "pread"),
        "timeout_s": _get_timeout(req, where),
    }


def validate_p2m(req: dict, where: str) -> dict:
    _check_keys(req, ("domid", "pfns", "tool", "timeout_s"), where)
    tool = req.get("tool")
    if tool is not None and not isinstance(tool, str):
        raise RequestError(f"{where}.tool: expected a path string, got {tool!r}")
    return {
        "domid": _get_int(req, "domid", where, 0, DOMID_MAX),
        "pfns": _get_int_list(req, "pfns", where, U64_MAX, required=False),
        "tool": tool,
        "timeout_s": _get_timeout(req, where),
    }


def validate_m2p(req: dict, where: str) -> dict:
    _check_keys(req, ("gfns", "max_candidates", "timeout_s"), where)
    gfns = _get_int_list(req, "gfns", where, MAX_GFN)
    return {
        "gfns": list(dict.fromkeys(gfns)),  # duplicates dropped, order kept
        "max_candidates": _get_int(
            req, "max_candidates", where, 1, MAX_CANDIDATES_LIMIT, DEFAULT_MAX_CANDIDATES
        ),
        "timeout_s": _get_timeout(req, where, M2P_DEFAULT_TIMEOUT_S),
    }


def validate_dirty_scan(req: dict, where: str) -> dict:
    _check_keys(req, ("domid", "frames", "cursor_frame", "timeout_s"), where)
    cursor = req.get("cursor_frame")
    return {
        "domid": _get_int(req, "domid", where, 0, DOMID_MAX),
        "frames": _get_int_list(req, "frames", where, U64_MAX),
        "cursor_frame": None if cursor is None else _get_int(req, "cursor_frame", where, 0, U64_MAX),
        "timeout_s": _get_timeout(req, where),
    }


def validate_write_page(req: dict, where: str) -> dict:
    _check_keys(req, ("domid", "frame", "bytes_b64", "timeout_s"), where)
    data = req.get("bytes_b64")
    try:
        size = len(base64.b64decode(data, validate=True)) if isinstance(data, str) else -1
    except ValueError:
        size = -1
    if size != XEN_PAGE_SIZE:
        raise RequestError(f"{where}.bytes_b64: required, the base64 of exactly {XEN_PAGE_SIZE} bytes")
    return {
        "domid": _get_int(req, "domid", where, 0, DOMID_MAX),
        "frame": _get_int(req, "frame", where, 0, U64_MAX),
        "bytes_b64": data,
        "timeout_s": _get_timeout(req, where),
    }


def validate_batch(req: dict, where: str) -> dict:
    _check_keys(req, ("calls",), where)
    calls = req.get("calls")
    if not isinstance(calls, list):
        raise RequestError(f"{where}.calls: required (a list of request objects)")
    checked = []
    for i, call in enumerate(calls):
        here = f"{where}.calls[{i}]"
        if not isinstance(call, dict):
            raise RequestError(f"{here}: expected an object, got {type(call).__name__}")
        command = call.get("command")
        if command == "batch":
            raise RequestError(f"{here}.command: batches do not nest")
        if command not in VALIDATORS:
            raise RequestError(
                "{}.command: {!r} is not one of {}".format(
                    here, command, ", ".join(_leaf_commands())
                )
            )
        checked.append(validate(command, call, here))
    return {"calls": checked}


# name -> validator; commands.py pairs each with its runner (COMMANDS)
VALIDATORS = {
    "info": validate_info,
    "mmapbatch_v2": validate_map,
    "mmapbatch": validate_map,
    "mmap": validate_map,
    "restrict_then_map": validate_restrict_then_map,
    "devmem": validate_devmem,
    "p2m": validate_p2m,
    "m2p": validate_m2p,
    "dirty_scan": validate_dirty_scan,
    "write_page": validate_write_page,
    "batch": validate_batch,
}


def _leaf_commands() -> list:
    return sorted(c for c in VALIDATORS if c != "batch")


def validate(command: str, req: object, where: str = "request") -> dict:
    """Check a request and return it normalised (defaults filled in)."""
    if not isinstance(req, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(req).__name__}")
    if "command" in req and req["command"] != command:
        raise RequestError(
            "{}.command: {!r} does not match the command {!r}".format(
                where, req["command"], command
            )
        )
    out = VALIDATORS[command](req, where)
    out["command"] = command
    return out


