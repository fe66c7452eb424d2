"""plugins/migration.py's transport: the toolstack commands (timestamped), the stream relay
and its statistics, dom0's tick watcher and interface counters.

With ``pause``, the migrated or restored domain is left paused (``xl migrate -p``,
``migrate-receive -p``): plugins/migration.py checks the dirty buffer at the instant
the guest was suspended, then unpauses it.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time

from harness import dom0_layout as layout
from harness import timeouts as t
from harness.dom0_files import REMOTE_STREAM_TOOL, REMOTE_WATCH_PATH, STREAM, install
from harness.metrics import Record

# Prefix every toolstack line with dom0's clock as it arrives.
TIMESTAMP = ("""python3 -c 'import sys,time; [print("%.6f %s" % (time.time(), l), end="", flush=True) """
             """for l in sys.stdin]'""")
class Watch:
    """nxwatch in dom0 for one guest's console logs, for the span of one operation."""

    def __init__(self, remote, guest_name: str) -> None:
        self.remote = remote
        self.out = f"{layout.WATCH_LOG_PREFIX}{guest_name}-{time.time_ns()}.log"
        globs = f"'{layout.CONSOLE_DIR}/*{guest_name}*'"
        self.pid = remote.check_output(
            f"nohup python3 {REMOTE_WATCH_PATH} {self.out} {globs} >/dev/null 2>&1 & echo $!",
            timeout=t.QUICK_COMMAND_S).strip()

    def stop(self) -> str:
        """Stop the watcher (waiting for it to exit) and return what it saw, in one
        command: under TCG with two L1s busy each SSH command costs seconds."""
        return self.remote.run(f"kill {self.pid}; while kill -0 {self.pid} 2>/dev/null; do sleep 0.05; done; "
                               f"cat {self.out}; rm -f {self.out}", timeout=t.SMALL_COMMAND_S).stdout


LINK_DEV = f"$(ls {layout.LINK_NIC_NET_DIRS})"  # dom0's private-link NIC


def tx_bytes(remote, dev: str) -> int | None:
    """Bytes sent so far on a dom0 interface: the migration stream's size on the
    wire (ssh-encrypted, or plain over the tcp transport) is the difference across
    the operation."""
    out = remote.run(f"cat {layout.SYS_NET}/{dev}/statistics/tx_bytes", timeout=t.QUICK_COMMAND_S).stdout
    out = out.strip()
    return int(out) if out.isdigit() else None


def install_stream_tool(host) -> None:
    install(host.remote, [STREAM])  # harness/dom0_files.py


def migrate_counted(remote, name: str, target: str, counted: bool, timeout: float = t.MIGRATION_XL_S,
                    pause: bool = False):
    """`xl migrate` over ssh, with the stream relayed through nxstream.py on its way to
    ssh when ``counted`` (pre-copy iterations and pages per iteration); (result, stats)."""
    p = " -p" if pause else ""
    if not counted:
        return timed_xl(remote, f"migrate{p} {shlex.quote(name)} {target}", timeout), {}
    out = f"{layout.STREAM_STATS_PREFIX}{time.time_ns()}.json"
    relay = f"python3 {REMOTE_STREAM_TOOL} relay {out} -- ssh"
    result = timed_xl(remote, f"migrate -s {shlex.quote(relay)}{p} {shlex.quote(name)} {target}", timeout)
    return result, _stream_stats(remote, f"cat {out}; rm -f {out}")


def shift_log(log: str, seconds: float) -> list[tuple[float, str]]:
    """(time, line) of a timestamped log (``<epoch s> <line>``), put on another clock."""
    lines = []
    for line in log.splitlines():
        head, _, text = line.partition(" ")
        try:
            lines.append((float(head) + seconds, text))
        except ValueError:
            continue
    return lines


def merge_logs(sender: str, receiver: str, receiver_shift_s: float) -> str:
    """The sender's xl log and the receiver's, in time order on the sender's clock (over
    ssh the receiver's lines arrive in the sender's log; over tcp they are in its own)."""
    lines = sorted(shift_log(sender, 0.0) + shift_log(receiver, receiver_shift_s), key=lambda x: x[0])
    return "".join(f"{when:.6f} {text}\n" for when, text in lines)


TCP_PORT = 8102  # the receiving dom0's migration port: on 127.0.0.1 or the private link


SPLIT = "=====nxstream-serve-stderr====="


def migrate_tcp(src_remote, dst_remote, name: str, address: str, receiver_shift_s: float = 0.0,
                timeout: float = t.MIGRATION_XL_S, pause: bool = False, truncate_after: int | None = None):
    """`xl migrate` over the TCP transport (nxstream.py serve on the receiving dom0,
    connect on the sender, always counted); (result with both sides' logs, stats).
    ``truncate_after``: the receiver gets only that many bytes of the stream (a negative
    control: its restore must fail, saying so)."""
    stamp = time.time_ns()
    log, out = f"{layout.SERVE_LOG_PREFIX}{stamp}.log", f"{layout.STREAM_STATS_PREFIX}{stamp}.json"
    pid = dst_remote.check_output(
        f"nohup python3 {REMOTE_STREAM_TOOL} serve {address} {TCP_PORT} {log} -- "
        f"xl -vvv migrate-receive{' -p' if pause else ''} "
        f"> {log}.err 2>&1 & echo $!", timeout=t.QUICK_COMMAND_S).strip()
    try:
        connect = f"python3 {REMOTE_STREAM_TOOL} connect {out} {address} {TCP_PORT}" + (
            f" --truncate-after {int(truncate_after)}" if truncate_after is not None else "")
        p = " -p" if pause else ""
        result = timed_xl(src_remote, f"migrate -s ''{p} {shlex.quote(name)} {shlex.quote(connect)}", timeout)
    finally:
        # serve ends with xl migrate-receive; after a failure it may still wait for a
        # connection. One command (each costs seconds here); a failing step stops none.
        both = dst_remote.run(f"sleep 0.5; kill {pid} 2>/dev/null; cat {log}; echo; echo {SPLIT}; "
                              f"cat {log}.err; rm -f {log} {log}.err", timeout=t.SMALL_COMMAND_S).stdout
        received, _, errors = both.partition(f"\n{SPLIT}\n")
    merged = merge_logs(result.stdout, received, receiver_shift_s)
    if errors.strip():  # nxstream serve's own complaints (no timestamps: they stay out of the span)
        merged += "".join(f"nxstream serve: {line}\n" for line in errors.splitlines())
    return dataclasses.replace(result, stdout=merged), _stream_stats(src_remote, f"cat {out}; rm -f {out}")


def migrate_with(transport: str, src_remote, dst_remote, name: str, address: str, counted: bool,
                 receiver_shift_s: float = 0.0, pause: bool = False):
    """One live migration of ``name`` to the dom0 at ``address`` (``localhost`` or the
    link), over the configured transport; (result, stream stats). ``pause``: the domain
    stays paused where it arrived."""
    if transport == "tcp":
        return migrate_tcp(src_remote, dst_remote, name, "127.0.0.1" if address == "localhost" else address,
                           receiver_shift_s, pause=pause)
    return migrate_counted(src_remote, name, address, counted, pause=pause)


def _stream_stats(remote, command: str) -> dict:
    text = remote.run(command, timeout=t.STREAM_STATS_S).stdout.strip()
    try:
        return json.loads(text)
    except ValueError:
        return {}


def apply_stream_stats(rec: Record, stats: dict) -> None:
    """Iterations and pages from the stream itself (Xen 4.17's xl -vvv prints none)."""
    if not stats:
        return
    rec.pages_per_iteration = stats.get("pages_per_iteration") or rec.pages_per_iteration
    rec.iterations = stats.get("iterations") or rec.iterations
    rec.bytes_sent = stats.get("stream_bytes")
    rec.extra["stream_complete"] = stats.get("complete")


def timed_xl(remote, args: str, timeout: float):
    return remote.run(f"set -o pipefail; xl -vvv {args} 2>&1 | {TIMESTAMP}", timeout=timeout)


