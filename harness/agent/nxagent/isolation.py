"""Running a call in a forked child: its events on a pipe, a crash or a hang turned into an answer."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import select
import signal
import sys
import time
import traceback

from .abi import DEFAULT_TIMEOUT_S, REAP_GRACE_S
from .errors import EnvironmentProblem, signal_name


class Channel:
    """Child side of the pipe: newline-delimited JSON events for the parent.

    {"stage": {...}} says what the child is about to do (kept for crash reports),
    {"set": {...}} merges fields into the answer, {"page": {"index": i, ...}}
    fills one page entry, {"fail": {...}} ends the call with ok=false, and
    {"done": true} says the child finished normally.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, **event) -> None:
        data = (json.dumps(event) + "\n").encode()
        while data:
            written = os.write(self.fd, data)
            data = data[written:]

    def stage(self, name: str, **info) -> None:
        info["name"] = name
        self.send(stage=info)

    def update(self, **fields) -> None:
        self.send(set=fields)

    def page(self, index: int, **fields) -> None:
        fields["index"] = index
        self.send(page=fields)


def _child_main(body, req: dict, read_fd: int, write_fd: int) -> None:
    """Runs in the forked child; never returns."""
    code = 0
    try:
        os.close(read_fd)
        if faulthandler.is_enabled():
            faulthandler.disable()
        for sig in (signal.SIGBUS, signal.SIGSEGV):
            signal.signal(sig, signal.SIG_DFL)
        chan = Channel(write_fd)
        try:
            body(req, chan)
        except EnvironmentProblem as exc:
            chan.send(fail=exc.to_answer())
        except Exception as exc:
            chan.send(fail={
                "ok": False,
                "error": f"internal error in child: {exc!r}",
                "traceback": traceback.format_exc(),
            })
            code = 1
        chan.send(done=True)
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _collect(read_fd: int, timeout_s: float) -> tuple[bytes, bool]:
    """Read the child's events until EOF or the deadline; (data, timed_out)."""
    deadline = time.monotonic() + timeout_s
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return b"".join(chunks), True
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            return b"".join(chunks), False
        chunks.append(chunk)


def _reap(pid: int, grace_s: float) -> int | None:
    """waitpid() with a deadline: a child stuck in the kernel may not die at once."""
    deadline = time.monotonic() + grace_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _parse_events(data: bytes) -> list[dict]:
    events = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(event, dict):
            events.append(event)
    return events


def run_isolated(body, req: dict, base: dict) -> dict:
    """Run body(req, channel) in a forked child and build the answer from its events.

    `base` holds the answer's default fields. A child killed by a signal gives
    "crashed": {"signal", "name", "stage"}; one still running after
    req["timeout_s"] is SIGKILLed and gives "timed_out": true.
    """
    answer = dict(base)
    answer.setdefault("ok", True)
    answer["crashed"] = None
    answer["timed_out"] = False
    answer["stage"] = None
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child_main(body, req, read_fd, write_fd)
    os.close(write_fd)
    try:
        data, timed_out = _collect(read_fd, req.get("timeout_s", DEFAULT_TIMEOUT_S))
    finally:
        os.close(read_fd)
    if timed_out:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    # EOF means the child is exiting; after SIGKILL a child stuck in the kernel
    # may take a while, so do not wait for it forever.
    status = _reap(pid, REAP_GRACE_S) if timed_out else os.waitpid(pid, 0)[1]
    return _assemble(answer, _parse_events(data), status, timed_out, pid)


def _assemble(answer: dict, events: list, status: int | None, timed_out: bool, pid: int) -> dict:
    stage = None
    done = False
    for event in events:
        if "stage" in event:
            stage = event["stage"]
        if "set" in event:
            answer.update(event["set"])
        if "page" in event:
            page = dict(event["page"])
            index = page.pop("index")
            answer["pages"][index].update(page)
        if "fail" in event:
            answer.update(event["fail"])
        if event.get("done"):
            done = True
    if not done:
        answer["stage"] = stage  # what the child was doing when it died or hung
    if timed_out:
        answer["timed_out"] = True
        if status is None:
            answer["unreaped_child_pid"] = pid
        return answer
    if status is not None and os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        answer["crashed"] = {"signal": signum, "name": signal_name(signum), "stage": stage}
    elif not done:
        answer["ok"] = False
        answer["error"] = (
            f"child exited (status {status!r}) without finishing; last stage {stage!r}"
        )
    return answer


