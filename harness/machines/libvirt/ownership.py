"""Who a domain belongs to (``<metadata>`` naming host, pid and the pid's start
time), its ``nx-`` name, and reaping the domains of runs that are gone."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ...procs import pid_alive
from .storage import POOL_NAME

log = logging.getLogger("harness.machines.libvirt")  # one logger for the backend

NAME_PREFIX = "nx-"
OWNER_NS = "urn:nested-xen:owner"

ET.register_namespace("nx", OWNER_NS)


def process_start(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


@dataclass(frozen=True)
class Owner:
    """The harness process a domain belongs to."""

    host: str
    pid: int
    start: str = ""

    @classmethod
    def me(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), process_start(os.getpid()) or "")

    def element(self, volumes: tuple[str, ...] = ()) -> ET.Element:
        return ET.Element(f"{{{OWNER_NS}}}owner", {
            "host": self.host, "pid": str(self.pid), "start": self.start, "volumes": ",".join(volumes),
        })

    def alive(self, hostname: str | None = None) -> bool | None:
        """True/False for an owner on this host; None for another host's (not ours to judge)."""
        if self.host != (hostname or socket.gethostname()):
            return None
        if not pid_alive(self.pid):
            return False
        now = process_start(self.pid)
        return not (self.start and now is not None and now != self.start)


def parse_owner(domain_xml_text: str) -> tuple[Owner | None, tuple[str, ...]]:
    """The owner recorded in a domain's ``<metadata>`` and the volumes it made."""
    try:
        root = ET.fromstring(domain_xml_text)
    except ET.ParseError:
        return None, ()
    el = root.find(f"metadata/{{{OWNER_NS}}}owner")
    if el is None:
        return None, ()
    try:
        owner = Owner(el.get("host", ""), int(el.get("pid", "-1")), el.get("start", ""))
    except ValueError:
        return None, ()
    volumes = tuple(v for v in el.get("volumes", "").split(",") if v)
    return owner, volumes


def domain_name(label: str, pid: int | None = None) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return f"{NAME_PREFIX}{safe}-{os.getpid() if pid is None else pid}"


def reap_domains(conn, hostname: str | None = None) -> list[str]:
    """Destroy ``nx-`` domains whose owner on this host is gone; return their names.

    Domains without nested-xen metadata, or owned by a process on another host,
    are left alone. Overlay volumes a reaped domain recorded are deleted.
    """
    reaped = []
    for dom in conn.listAllDomains(0):
        try:
            name = dom.name()
            if not name.startswith(NAME_PREFIX):
                continue
            owner, volumes = parse_owner(dom.XMLDesc(0))
        except Exception:  # noqa: BLE001 - a domain that vanished meanwhile
            continue
        if owner is None or owner.alive(hostname) is not False:
            continue
        log.warning("reaping libvirt domain %s left by a killed run (pid %d on %s)",
                    name, owner.pid, owner.host)
        with contextlib.suppress(Exception):
            dom.destroy()
        for vol in volumes:
            _delete_volume(conn, vol)
        reaped.append(name)
    return reaped


def _delete_volume(conn, name: str) -> None:
    with contextlib.suppress(Exception):
        conn.storagePoolLookupByName(POOL_NAME).storageVolLookupByName(name).delete(0)
