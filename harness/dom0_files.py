"""Every file the harness puts into dom0: where it comes from, where it goes, its mode.

``PREPARED`` is what ``prepare()`` (harness/provision.py) puts into a fresh dom0
before an L1 snapshot is taken, with the guest payload (``payload_files``); the
snapshot key hashes exactly those entries (``digest``). ``ON_DEMAND`` files are
put in by the checks that need them and are not part of a snapshot. ``install``
is the one step that copies entries in. The agent is built (harness/agent/build.py)
when it is first needed: into the run's cache at install, its bytes for the digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from . import dom0_layout as layout
from .agent.build import agent_bytes, built_agent

AGENT_DIR = Path(__file__).with_name("agent")  # harness/agent/: the dom0 tools' sources

WATCH_PATH = AGENT_DIR / "nxwatch.py"
REMOTE_WATCH_PATH = layout.WATCH_PATH
CHANNEL_PATH = AGENT_DIR / "nxchannel.py"
REMOTE_CHANNEL_PATH = layout.CHANNEL_TOOL_PATH
STREAM_TOOL = AGENT_DIR / "nxstream.py"
REMOTE_STREAM_TOOL = layout.STREAM_TOOL_PATH
CHANNEL_DEVICE = layout.CHANNEL_DEVICE
CHANNEL_UNIT = f"""\
[Unit]
Description=nested-xen: answer the harness on the virtio-serial channel
ConditionPathExists={CHANNEL_DEVICE}

[Service]
ExecStart={layout.PYTHON} {REMOTE_CHANNEL_PATH} {CHANNEL_DEVICE}
Restart=on-failure

[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class GuestPayload:
    """Guest kernel and initramfs as they sit on the harness host (put into dom0 by
    :func:`payload_files`; built by harness/guest_payload.py)."""

    kernel: Path
    initramfs: Path


@dataclass(frozen=True)
class Dom0File:
    """One file in dom0: a local file's copy (``local``), generated ``text``, or a file
    ``built`` into the run's cache when it is installed (``data`` gives its bytes)."""

    remote: str
    local: Path | None = None
    text: str | None = None
    mode: int | None = None
    built: Callable[[Path], Path] | None = None
    data: Callable[[], bytes] | None = None

    def content(self) -> bytes:
        if self.text is not None:
            return self.text.encode()
        if self.data is not None:
            return self.data()
        return Path(self.local).read_bytes()

    def source(self, cache: Path) -> Path:
        """The local file to copy (a built one is built into ``cache`` first)."""
        return self.built(cache) if self.built is not None else Path(self.local)


# privcmd calls (harness/agent/nxagent/, built into one file)
AGENT = Dom0File(layout.AGENT_PATH, mode=0o755, built=built_agent, data=agent_bytes)
WATCHER = Dom0File(REMOTE_WATCH_PATH, WATCH_PATH, mode=0o755)  # file watcher (migration timings)
CHANNEL = Dom0File(REMOTE_CHANNEL_PATH, CHANNEL_PATH, mode=0o755)  # answers on the virtio-serial port
CHANNEL_SERVICE = Dom0File(layout.CHANNEL_SERVICE_PATH, text=CHANNEL_UNIT)
STREAM = Dom0File(REMOTE_STREAM_TOOL, STREAM_TOOL, mode=0o755)  # migration stream relay

PREPARED: tuple[Dom0File, ...] = (AGENT, WATCHER, CHANNEL, CHANNEL_SERVICE)
ON_DEMAND: tuple[Dom0File, ...] = (STREAM,)


def payload_files(payload: GuestPayload | None) -> tuple[Dom0File, ...]:
    """The guest payload's kernel and initramfs (none without a payload)."""
    if not payload:
        return ()
    return (Dom0File(layout.GUEST_KERNEL, payload.kernel),
            Dom0File(layout.GUEST_INITRAMFS, payload.initramfs))


def install(remote, files: Iterable[Dom0File], cache: Path | None = None) -> None:
    """Put ``files`` into dom0 through ``remote`` (harness/remote.py), in order; a built
    file is built into ``cache`` (the run's) first."""
    for f in files:
        if f.text is not None:
            remote.put_text(f.text, f.remote, mode=f.mode)
        elif f.built is not None and cache is None:
            raise ValueError(f"{f.remote} is built into the run's cache: install it with cache=")
        else:
            remote.put(f.source(cache), f.remote, mode=f.mode)


def digest(files: Iterable[Dom0File]) -> str:
    """A digest of the entries: where each goes, its mode and its content."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.remote} {f.mode}\n".encode())
        h.update(f.content())
    return h.hexdigest()
