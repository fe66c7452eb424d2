"""L1 machines as transient libvirt domains, on this host or on a remote one.

``LibvirtMachine`` has QemuMachine's interface: the Provisioner boots, snapshots
and restores it the same way. What the domain XML says, and why:

* ``<domain type='qemu'>`` (TCG) or ``type='kvm'``, as accel.py chose; the TCG
  CPU is ``qemu64`` with the ``svm`` and ``npt`` features required (Xen gets
  HVM with HAP), KVM uses ``host-passthrough``. ACPI and APIC are on (libvirt
  passes ``-no-acpi`` otherwise); poweroff, reboot and crash destroy the domain.
* Xen boots through QEMU's multiboot loader from native ``<os>`` elements:
  ``<kernel>`` is xen, ``<cmdline>`` its command line, and ``<initrd>`` the
  module list ``"vmlinuz args,initrd.img"``. libvirt 9.0 hands ``<initrd>`` to
  ``-initrd`` verbatim (it is not a QemuOpts list, so the comma is not escaped;
  checked with ``virsh domxml-to-native qemu-argv``), so no passthrough is
  needed there. A comma inside a module path or its arguments is refused, as in
  the QEMU backend.
* The disk is a fresh qcow2 overlay on the cached image (``cache=unsafe``).
* Networking is **qemu:commandline passthrough**: ``-netdev user,restrict=on,
  hostfwd=tcp:127.0.0.1:PORT-:22`` plus ``-device virtio-net-pci``. libvirt
  9.0's ``<interface type='user'>`` is slirp without ``restrict=on`` and its
  ``<portForward>`` needs the passt backend, which bookworm's libvirt does not
  pair with slirp; the passthrough keeps exactly the QEMU backend's network:
  dom0 reaches nothing, only SSH is forwarded, on the libvirt host's 127.0.0.1.
* The serial console is a ``<serial type='pty'>`` read through libvirt's stream
  API (``virDomainOpenConsole``) by a thread that appends to ``serial.log`` in
  the run directory, so ``Machine.read_serial`` and the readiness stages work
  the same for a local and a remote URI. The domain is created paused, the
  console opened, then the domain resumed, so no output is lost.
* QEMU runs under a fixed DAC label without relabeling (``<seclabel
  type='static' model='dac' relabel='no'>``): for a local URI the harness's own
  uid:gid, like the QEMU backend runs QEMU as the user (the image cache under a
  private home stays readable and nothing gets chowned); for a remote URI the
  host's default QEMU uid:gid (its capabilities' DAC ``baselabel``), which owns
  the pool volumes the harness makes there. Relabeling must stay off: libvirt's
  DAC driver takes the whole ``<initrd>`` module list for one file and fails
  ("unable to stat: .../vmlinuz root=...,.../initrd.img").

Names are ``nx-<label>-<pid>`` and every domain carries ``<metadata>`` naming
its owner (host name, pid, the pid's start time). Before starting a domain, the
machine destroys leftover ``nx-`` domains whose owner on this host is gone (a
SIGKILLed run cannot destroy its domains: libvirtd, not the harness, is QEMU's
parent). Domains owned by another host are left alone.

Snapshots: ``snapshot()`` takes an external libvirt snapshot without metadata
(``virDomainSnapshotCreateXML`` with ``NO_METADATA``): libvirt pauses the VM,
writes its memory as a libvirt save image and moves the disk onto a new
overlay; the old overlay, frozen, is copied beside the memory. The VM keeps
running. A save image pins the domain's name and UUID (``virDomainRestore``
with a changed XML fails "Target domain name ... does not match source"), and
each restored L1 needs its own name, UUID, SSH port and overlay, so a restore
rewrites the image's XML header into a per-restore copy (``restore.save``,
deleted once the domain runs) and restores that with ``virDomainRestoreFlags``.

Remote URIs (``qemu+ssh://[user@]host[:port]/system``): the boot files and
the root filesystem are uploaded once per image into a storage pool
``nested-xen`` (a directory pool at ``/var/lib/libvirt/images/nested-xen``,
created if missing; sparse stream upload), each domain gets its own qcow2
overlay volume in that pool, the console comes through the libvirt stream, and
dom0's SSH is reached through an ``ssh -L`` tunnel to the forwarded port on
the remote host's 127.0.0.1, using the URI's user, port, ``keyfile``,
``known_hosts`` and ``no_verify`` parameters. Other transports (``+tcp``,
``+tls``) are refused: nothing could reach the forwarded port. L1 snapshots
are not taken over a remote URI (the run boots cold and says so).

The package, one module per seam: ``uri`` (the bindings, connections, URIs),
``ownership`` (owner metadata, names, reaping), ``domain_xml``, ``save_image``
(the save-image header), ``storage`` (the remote pool and uploads), ``tunnel``
(the SSH tunnel) and ``machine`` (``LibvirtMachine``). Every name is importable
from ``harness.machines.libvirt`` as before.
"""

from __future__ import annotations

from .domain_xml import (  # noqa: F401
    NET_MAC,
    QEMU_NS,
    BootPaths,
    domain_xml,
    module_list,
    net_args,
    rewrite_saved_xml,
    tcg_cpu,
)
from .machine import (  # noqa: F401
    REMOTE_PORTS,
    SNAPSHOT_FORMAT,
    LibvirtMachine,
)
from .ownership import (  # noqa: F401
    NAME_PREFIX,
    OWNER_NS,
    Owner,
    domain_name,
    parse_owner,
    process_start,
    reap_domains,
)
from .save_image import (  # noqa: F401
    SAVE_HEADER,
    SAVE_MAGIC,
    SAVE_PAD,
    SaveImage,
    read_save_image,
    save_image_header,
    write_restore_image,
)
from .storage import (  # noqa: F401
    POOL_NAME,
    POOL_PATH,
    RemoteStore,
    _send_sparse,
    dac_baselabel,
    parse_dac_label,
    volume_xml,
)
from .tunnel import (  # noqa: F401
    SshTunnel,
)
from .uri import (  # noqa: F401
    INSTALL_HINT,
    LibvirtUri,
    connect,
    error_code,
    first_line,
    import_libvirt,
)

__all__ = [
    "BootPaths",
    "INSTALL_HINT",
    "LibvirtMachine",
    "LibvirtUri",
    "NAME_PREFIX",
    "NET_MAC",
    "OWNER_NS",
    "Owner",
    "POOL_NAME",
    "POOL_PATH",
    "QEMU_NS",
    "REMOTE_PORTS",
    "RemoteStore",
    "SAVE_HEADER",
    "SAVE_MAGIC",
    "SAVE_PAD",
    "SNAPSHOT_FORMAT",
    "SaveImage",
    "SshTunnel",
    "connect",
    "dac_baselabel",
    "domain_name",
    "domain_xml",
    "error_code",
    "first_line",
    "import_libvirt",
    "module_list",
    "net_args",
    "parse_dac_label",
    "parse_owner",
    "process_start",
    "read_save_image",
    "reap_domains",
    "rewrite_saved_xml",
    "save_image_header",
    "tcg_cpu",
    "volume_xml",
    "write_restore_image",
]
