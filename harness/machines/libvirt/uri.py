"""Reaching libvirt: the bindings, a connection, and what a URI says (local or
remote, and how to SSH to a remote libvirt host)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from ..base import MachineStartError

INSTALL_HINT = "pip install 'nested-xen[libvirt]'"


def import_libvirt():
    """The libvirt module, or a MachineStartError saying how to install it."""
    try:
        import libvirt
    except ImportError:
        raise MachineStartError(
            f"the libvirt backend needs libvirt-python: {INSTALL_HINT} (it compiles against "
            "libvirt-dev with pkg-config and gcc; `./setup --libvirt` installs them)"
        ) from None
    # libvirt prints every error to stderr besides raising it; the harness reports them itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def connect(uri: str):
    """An open connection to ``uri``, or a MachineStartError that says what to do."""
    libvirt = import_libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise MachineStartError(
            f"cannot connect to libvirt at {uri}: {first_line(exc)}; "
            "start libvirtd (libvirtd -d) or pass --libvirt-uri"
        ) from None
    if conn is None:  # old bindings return None instead of raising
        raise MachineStartError(f"cannot connect to libvirt at {uri}; start libvirtd (libvirtd -d) "
                                "or pass --libvirt-uri")
    return conn


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def error_code(exc: BaseException) -> int | None:
    get = getattr(exc, "get_error_code", None)
    return get() if get else None


@dataclass(frozen=True)
class LibvirtUri:
    """A libvirt URI, as far as the harness needs it: local or remote, and how to SSH there."""

    uri: str
    driver: str
    transport: str
    user: str | None
    host: str | None
    port: int | None
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, uri: str) -> LibvirtUri:
        parts = urlsplit(uri)
        if not parts.scheme:
            raise MachineStartError(f"{uri!r} is not a libvirt URI (e.g. qemu:///system, "
                                    "qemu+ssh://root@HOST/system)")
        driver, _, transport = parts.scheme.partition("+")
        params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        return cls(uri, driver, transport, unquote(parts.username) if parts.username else None,
                   parts.hostname or None, parts.port, params)

    @property
    def remote(self) -> bool:
        """Is the libvirt host another machine (as far as the harness can tell)?

        Any host name counts, 127.0.0.1 included: the harness then talks to it
        only through libvirt and SSH, which is how the remote path is tested.
        """
        return bool(self.host)

    def ssh_base(self) -> list[str]:
        """``ssh`` with the URI's user, port, key and host-key options (no destination)."""
        if self.transport != "ssh":
            raise MachineStartError(
                f"{self.uri}: dom0's SSH is forwarded on the libvirt host's 127.0.0.1, which the "
                "harness reaches through SSH; use a qemu+ssh:// URI for a remote libvirt host"
            )
        cmd = [self.params.get("command", "ssh"), "-o", "BatchMode=yes"]
        if self.port:
            cmd += ["-p", str(self.port)]
        if self.user:
            cmd += ["-l", self.user]
        if self.params.get("keyfile"):
            cmd += ["-i", self.params["keyfile"]]
        if self.params.get("known_hosts"):
            cmd += ["-o", f"UserKnownHostsFile={self.params['known_hosts']}"]
        if self.params.get("no_verify") == "1":
            cmd += ["-o", "StrictHostKeyChecking=no"]
        return cmd
