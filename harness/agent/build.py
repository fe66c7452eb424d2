"""Build the dom0 agent (the package harness/agent/nxagent/) into the ONE file dom0 runs.

The file is a zipapp: ``#!/usr/bin/env python3`` then a zip archive holding the
package as ``nxagent/*.py`` and a ``__main__.py`` that runs ``nxagent.cli.main``.
``python3 FILE COMMAND`` runs it whatever the file's name (dom0 keeps calling it
nxagent.py). It is built deterministically -- entries sorted, stored uncompressed
(no dependence on the zlib version), a fixed timestamp and fixed permissions -- so
the same sources give the same bytes: the L1 snapshot key hashes those bytes
(harness/dom0_files.py ``digest``), and an unchanged agent keeps its snapshots.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

from ..dom0_layout import AGENT_NAME

PACKAGE_DIR = Path(__file__).with_name("nxagent")
PACKAGE = PACKAGE_DIR.name  # the import name inside the archive
FILE_NAME = AGENT_NAME  # the built file's name, here and in dom0
SHEBANG = b"#!/usr/bin/env python3\n"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can hold
ENTRY_MODE = 0o100644  # a regular file, rw-r--r--
MAIN = f"""\
# nested-xen dom0 agent: built from harness/agent/{PACKAGE}/ by harness/agent/build.py.
import sys

from {PACKAGE}.cli import main

sys.exit(main())
"""


def sources(package_dir: Path = PACKAGE_DIR) -> list[tuple[str, bytes]]:
    """(name in the archive, content) of every module of the package, sorted by name."""
    modules = sorted(p for p in package_dir.glob("*.py") if p.is_file())
    if not modules:
        raise FileNotFoundError(f"no modules in {package_dir}")
    return [(f"{PACKAGE}/{p.name}", p.read_bytes()) for p in modules]


def _entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3  # Unix, so external_attr reads as a mode everywhere
    info.external_attr = ENTRY_MODE << 16
    return info


def agent_bytes(package_dir: Path = PACKAGE_DIR) -> bytes:
    """The built agent: the shebang, then the zip archive (the same sources, the same bytes)."""
    entries = sorted([("__main__.py", MAIN.encode()), *sources(package_dir)])
    buf = io.BytesIO()
    buf.write(SHEBANG)  # zipimport finds the archive after a prefix (as zipapp writes it)
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in entries:
            archive.writestr(_entry(name), data)
    return buf.getvalue()


def build(dest: Path, data: bytes | None = None) -> Path:
    """Write the built agent (``data``, or built now) to ``dest``: mode 0755, replaced
    atomically, left alone when it already holds those bytes."""
    data = agent_bytes() if data is None else data
    if dest.is_file() and dest.read_bytes() == data:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)  # concurrent builders (xdist workers) write the same bytes
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def built_agent(cache_dir: Path) -> Path:
    """The built agent in the run's cache (``cache_dir``), under a directory named for its
    content: built when first asked for (an install into dom0), not when imported."""
    data = agent_bytes()
    key = hashlib.sha256(data).hexdigest()[:16]
    return build(cache_dir / "agent" / key / FILE_NAME, data)
