"""dom0's own files in a host image: its SSH key and the overlay copied over the
debootstrapped tree (hostname, network unit, sshd and ssh client settings, the Xen
modules to load, the console-log setting for xenconsoled). Used by
:class:`harness.imaging.ImageBuilder`; what the harness puts into a *booted* dom0 is
harness/dom0_files.py."""

from __future__ import annotations

from pathlib import Path

from . import dom0_layout as layout

ROOT_LABEL = "nxroot"


# --------------------------------------------------------------------------- keys


def generate_ssh_key(path: Path) -> str:
    """Write an unencrypted OpenSSH Ed25519 key to ``path``; return the public line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.write_bytes(private)
    path.chmod(0o600)
    line = public.decode() + " nested-xen"
    path.with_suffix(".pub").write_text(line + "\n")
    return line


# --------------------------------------------------------------------------- overlay


NETWORK_UNIT = """\
[Match]
Name=en* eth*

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
"""

SSHD_CONF = """\
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
"""

SSH_CLIENT_CONF = """\
Host *
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
"""

MODULES = """\
xen-evtchn
xen-gntdev
xen-gntalloc
xen-privcmd
xenfs
xen-blkback
xen-netback
"""

# Appended to Debian's /etc/default/xen: log every guest console to a file
# dom0 can read, which is how the harness hears the guest probe.
XEN_DEFAULTS = f"""
# nested-xen: guest consoles are logged for the harness
XENCONSOLED_ARGS="--log=guest --log-dir={layout.CONSOLE_DIR}"
"""


def write_overlay(dest: Path, public_key: str, private_key: Path) -> None:
    """Files copied over the debootstrapped tree (owner root, modes set here)."""
    files = {
        "etc/hostname": ("nxdom0\n", 0o644),
        "etc/hosts": ("127.0.0.1 localhost\n127.0.1.1 nxdom0\n::1 localhost\n", 0o644),
        "etc/fstab": (f"LABEL={ROOT_LABEL} / ext4 rw,errors=remount-ro 0 1\n", 0o644),
        "etc/systemd/network/20-wired.network": (NETWORK_UNIT, 0o644),
        "etc/ssh/sshd_config.d/nested-xen.conf": (SSHD_CONF, 0o644),
        "etc/modules-load.d/nested-xen.conf": (MODULES, 0o644),
        "root/.ssh/authorized_keys": (public_key + "\n", 0o600),
        "root/.ssh/config": (SSH_CLIENT_CONF, 0o600),
        "root/.ssh/id_ed25519.pub": (public_key + "\n", 0o644),
        "root/.ssh/id_ed25519": (private_key.read_text(), 0o600),
        layout.XEN_DEFAULTS_ADDITION.lstrip("/"): (XEN_DEFAULTS, 0o644),
    }
    for rel, (text, mode) in files.items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)
    (dest / "root").chmod(0o700)
    (dest / "root/.ssh").chmod(0o700)
