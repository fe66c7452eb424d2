"""The header of a libvirt QEMU save image: read it, and write a copy whose domain
XML is another (each restored L1 needs its own name, UUID, port and disk)."""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from ..base import MachineError

SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_HEADER = struct.Struct("<16s5I56x")  # magic, version, data_len, was_running, compressed, cookieOffset
SAVE_PAD = 64 * 1024  # libvirt leaves this much room for edited XML; so do we


@dataclass(frozen=True)
class SaveImage:
    """The header of a libvirt QEMU save image (also an external snapshot's memory file)."""

    version: int
    was_running: int
    xml: str
    cookie: bytes
    stream_offset: int  # where QEMU's migration stream starts


def read_save_image(path: Path) -> SaveImage:
    with open(path, "rb") as f:
        head = f.read(SAVE_HEADER.size)
        if len(head) < SAVE_HEADER.size:
            raise MachineError(f"{path}: too short for a libvirt save image")
        magic, version, data_len, was_running, compressed, cookie_offset = SAVE_HEADER.unpack(head)
        if magic != SAVE_MAGIC:
            raise MachineError(f"{path}: not a complete libvirt save image (magic {magic!r})")
        if version != 2 or compressed != 0:
            raise MachineError(f"{path}: save image version {version}, compression {compressed}: "
                               "only uncompressed version 2 is supported")
        data = f.read(data_len)
    xml_part = data[:cookie_offset] if cookie_offset else data
    cookie = data[cookie_offset:].split(b"\0", 1)[0] if cookie_offset else b""
    return SaveImage(version, was_running, xml_part.split(b"\0", 1)[0].decode(), cookie,
                     SAVE_HEADER.size + data_len)


def save_image_header(image: SaveImage, xml: str) -> bytes:
    """Header + XML (+ cookie) for a copy of ``image`` whose domain XML is ``xml``."""
    xml_bytes = xml.encode() + b"\0"
    cookie = image.cookie + b"\0" if image.cookie else b""
    payload = xml_bytes + cookie
    data_len = len(payload) + SAVE_PAD
    head = SAVE_HEADER.pack(SAVE_MAGIC, image.version, data_len, image.was_running, 0,
                            len(xml_bytes) if cookie else 0)
    return head + payload + b"\0" * SAVE_PAD


def write_restore_image(src: Path, image: SaveImage, xml: str, dest: Path) -> None:
    """Copy the save image ``src`` to ``dest`` with its domain XML replaced."""
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        fout.write(save_image_header(image, xml))
        fin.seek(image.stream_offset)
        shutil.copyfileobj(fin, fout, 8 * 2**20)
