"""What Xen documents about migrating a guest between two Xen releases, as data with its
sources, and which way a booted pair of hosts faces (issue 29).

The direction is decided from the hosts' booted Xen versions (`xl info`), never from the
run config's order: *forward* moves a guest from the older Xen to the newer, *backward*
from the newer to the older.

- Forward is promised. The libxc stream spec says a release's tools restore the stream
  version they write and the previous release's ("Tools shall support restoring from
  version _V_ ..."), and migration's feature page gives it Status: Supported. Every
  release from 4.17 to 4.22 writes libxc stream version 3 (xg_sr_save.c) and reads 2..3
  (xg_sr_restore.c read_headers), and writes and reads libxl stream version 2
  (libxl_sr_stream_format.h): a 4.17 stream is a version the 4.22 receiver must take.
- Backward is not promised: nothing in the spec says an older release restores a newer
  one's stream. What is specified is how it must refuse: a stream with an unrecognised
  mandatory record must fail (the spec; xg_sr_restore.c's "Mandatory record ... not
  handled", libxl_stream_read.c's "Unrecognised record"). The harness's expectation
  (plugins/cross_version.py) is therefore "refused cleanly, or migrated intact".

Each citation names a tag of xen.git, a file, a line range and a phrase those lines hold;
tests/unit/test_cross_version_rules.py checks every one against the Xen mirror.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FORWARD, BACKWARD = "forward", "backward"
SUPPORTED, NOT_PROMISED = "supported", "not promised"
TAGS = ("RELEASE-4.17.0", "RELEASE-4.22.0")
LIBXC_SPEC = "docs/specs/libxc-migration-stream.pandoc"
LIBXL_FORMAT = "tools/libs/light/libxl_sr_stream_format.h"


@dataclass(frozen=True)
class Citation:
    """Lines ``first``..``last`` of ``path`` at ``tag`` of xen.git hold ``phrase``."""

    tag: str
    path: str
    first: int
    last: int
    phrase: str

    def where(self) -> str:
        return f"xen.git {self.tag}:{self.path}:{self.first}-{self.last}"


def _both(path: str, first: int, last: int, phrase: str, at_422: tuple[int, int] | None = None
          ) -> tuple[Citation, ...]:
    """The same text at 4.17.0 and 4.22.0 (``at_422``: where it moved to in 4.22.0)."""
    lines = at_422 or (first, last)
    return (Citation(TAGS[0], path, first, last, phrase), Citation(TAGS[1], path, *lines, phrase))


# The restore side's promise: the stream versions a release's tools read.
RESTORE_PROMISE = _both(LIBXC_SPEC, 100, 104, "Tools shall support restoring from version")
FEATURE_SUPPORTED = _both("docs/features/migration.pandoc", 6, 8, "Status: **Supported**")
MANDATORY_MUST_FAIL = _both(LIBXC_SPEC, 250, 253, "unsupported mandatory record must fail")
LIBXC_WRITES_V3 = _both("tools/libs/guest/xg_sr_save.c", 14, 18, ".version = htonl(3)")
LIBXC_READS_V2_V3 = _both("tools/libs/guest/xg_sr_restore.c", 38, 43, "ihdr.version < 2 || ihdr.version > 3")
LIBXC_REFUSES_RECORD = (Citation(TAGS[0], "tools/libs/guest/xg_sr_restore.c", 805, 813,
                                 "Mandatory record %#x (%s) not handled"),
                        Citation(TAGS[1], "tools/libs/guest/xg_sr_restore.c", 844, 852,
                                 "Mandatory record %#x (%s) not handled"))
LIBXL_VERSION_2 = _both(LIBXL_FORMAT, 19, 19, "RESTORE_STREAM_VERSION       0x00000002U")
LIBXL_REFUSES = _both("tools/libs/light/libxl_stream_read.c", 345, 350, "Unexpected Version")
LIBXL_UNRECOGNISED = _both("tools/libs/light/libxl_stream_read.c", 645, 648, "Unrecognised record 0x%08x")


@dataclass(frozen=True)
class StreamFormat:
    """The migration stream versions one Xen release's tools write and read."""

    libxc_writes: int
    libxc_reads: tuple[int, int]  # lowest, highest
    libxl: int  # written, and the only one read


# Read at each RELEASE-4.N.0 tag (the citations above are the 4.17.0 and 4.22.0 lines;
# 4.18 to 4.21 hold the same definitions). A release not listed is judged by the spec alone.
FORMATS = {f"4.{minor}": StreamFormat(3, (2, 3), 2) for minor in range(17, 23)}


@dataclass(frozen=True)
class Rule:
    """What Xen documents for one direction, and where."""

    direction: str
    promise: str  # SUPPORTED | NOT_PROMISED
    statement: str
    citations: tuple[Citation, ...]

    def cite(self) -> str:
        return f"{self.statement} ({'; '.join(c.where() for c in self.citations)})"


FORWARD_RULE = Rule(
    FORWARD, SUPPORTED,
    "Xen documents migration to a newer release as supported: its tools restore the stream version they "
    "write and the previous release's, and every release 4.17..4.22 writes libxc stream v3 (read: v2..v3) "
    "and libxl stream v2",
    RESTORE_PROMISE + FEATURE_SUPPORTED + LIBXC_WRITES_V3 + LIBXC_READS_V2_V3 + LIBXL_VERSION_2)
BACKWARD_RULE = Rule(
    BACKWARD, NOT_PROMISED,
    "Xen does not promise migration to an older release; an older receiver that meets a record it does "
    "not know must refuse the stream (mandatory records), so the outcome must be a clean refusal or an "
    "intact guest",
    RESTORE_PROMISE + MANDATORY_MUST_FAIL + LIBXC_REFUSES_RECORD + LIBXL_REFUSES + LIBXL_UNRECOGNISED)


class SameXen(ValueError):
    """Both hosts run the same Xen: the pair is not cross-version."""


def release(version: str) -> tuple[int, ...]:
    """``4.17.5`` -> (4, 17, 5); ``4.22.1-pre`` -> (4, 22, 1). A version `xl info` gives."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if not match:
        raise ValueError(f"cannot read a Xen version from {version!r}")
    return tuple(int(p) for p in match.group(0).split("."))


def direction(source_version: str, destination_version: str) -> str:
    """FORWARD when the source runs the older Xen, BACKWARD when it runs the newer."""
    src, dst = release(source_version), release(destination_version)
    if src == dst:
        raise SameXen(f"both hosts run Xen {source_version}: not a cross-version pair; give a pair whose "
                      "images boot different Xen releases (migration.cross_version in the run config)")
    return FORWARD if src < dst else BACKWARD


def stream_format(version: str) -> StreamFormat | None:
    return FORMATS.get(".".join(map(str, release(version)[:2])))


def rule_for(source_version: str, destination_version: str) -> Rule:
    """The rule for migrating from a host running ``source_version`` to one running
    ``destination_version``. Forward is promised only while the receiver reads the stream
    version the sender writes (true of every release in FORMATS); a pair outside the table is
    judged by the spec's promise."""
    if direction(source_version, destination_version) == BACKWARD:
        return BACKWARD_RULE
    src, dst = stream_format(source_version), stream_format(destination_version)
    if src and dst and not dst.libxc_reads[0] <= src.libxc_writes <= dst.libxc_reads[1]:
        return Rule(FORWARD, NOT_PROMISED,
                    f"Xen {destination_version} reads libxc streams "
                    f"v{dst.libxc_reads[0]}..v{dst.libxc_reads[1]}, "
                    f"Xen {source_version} writes v{src.libxc_writes}", RESTORE_PROMISE + LIBXC_READS_V2_V3)
    return FORWARD_RULE
