"""Where things are in dom0: every path and name the harness puts, reads or runs there.

A leaf: the standard library only, and nothing of the harness, so any module (the image
build, the host, the guests, the plugins) can import it without a circle. Each path is
spelled here once; tests/unit/test_dom0_layout.py fails on a dom0 path literal anywhere
else in harness/ or plugins/. The tools that run in dom0 on their own
(harness/agent/nxagent/, nxchannel.py) cannot import the harness and keep their own
copies of the few paths they use; the same test asserts the copies agree.

A path with ``{mm}`` is a template: the running Xen's major.minor goes there.
"""

from __future__ import annotations

# ----------------------------------------------------------------- the harness's own files

# The dom0 tools, put in by prepare() before an L1 snapshot (harness/dom0_files.py).
LIB_DIR = "/usr/local/lib/nested-xen"
AGENT_NAME = "nxagent.py"  # the agent zipapp: its name in dom0 and in the run's cache
AGENT_PATH = f"{LIB_DIR}/{AGENT_NAME}"
WATCH_PATH = f"{LIB_DIR}/nxwatch.py"  # file watcher: migration timings
CHANNEL_TOOL_PATH = f"{LIB_DIR}/nxchannel.py"  # answers on the virtio-serial channel
# The harness's data: made by the image build, holds the guest payload, saves and the
# stream relay (put in on demand, so not part of a snapshot).
PAYLOAD_DIR = "/var/lib/nested-xen"
GUEST_DIR = f"{PAYLOAD_DIR}/guest"
GUEST_KERNEL = f"{GUEST_DIR}/vmlinuz"
GUEST_INITRAMFS = f"{GUEST_DIR}/initramfs.gz"
GUEST_CONFIG_DIR = f"{PAYLOAD_DIR}/guests"  # one xl config per guest, <name>.cfg
SAVE_DIR = f"{PAYLOAD_DIR}/save"  # xl save's images, <name>.chkpt
STREAM_TOOL_PATH = f"{PAYLOAD_DIR}/nxstream.py"
# What the image was built from (an inputs label, else absent: Debian's own Xen).
INPUTS_DIR = "/etc/nested-xen"
INPUTS_FILE = f"{INPUTS_DIR}/inputs"
# The overlay's addition to Xen's defaults, appended to XEN_DEFAULTS_FILE by a build hook.
XEN_DEFAULTS_ADDITION = "/etc/nested-xen-xen-defaults"
# Emptied by the build: each booted copy makes its own (systemd-networkd's DHCP id).
MACHINE_ID = "/etc/machine-id"
# busybox-static's, copied out of the image for the guests' initramfs.
BUSYBOX = "/usr/bin/busybox"
# Scratch in dom0: the build's ldd findings; xen_tools_tests' negative-control programs.
TMP = "/tmp"  # where Xen's test programs run (some write scratch files in their cwd)
LDD_REPORT = f"{TMP}/nx-ldd"
TOOLTESTS_DIR = f"{TMP}/nx-tooltests"
# A migration's scratch, each name followed by what makes it unique and its suffix:
# nxwatch's tick log, nxstream's stream statistics, nxstream serve's log.
WATCH_LOG_PREFIX = f"{TMP}/nxwatch-"
STREAM_STATS_PREFIX = f"{TMP}/nxstream-"
SERVE_LOG_PREFIX = f"{TMP}/nxserve-"

# ------------------------------------------------------------------ the virtio-serial channel

# The port's name: QEMU's virtserialport name= and libvirt's <target name=>, dom0's device.
CHANNEL_NAME = "org.nested-xen.channel"
CHANNEL_DEVICE = f"/dev/virtio-ports/{CHANNEL_NAME}"
CHANNEL_SERVICE = "nx-channel.service"
CHANNEL_SERVICE_PATH = f"/etc/systemd/system/{CHANNEL_SERVICE}"
PYTHON = "/usr/bin/python3"  # what the channel's unit runs it with

# ------------------------------------------------------------------------- Xen's

XEN_LOG_DIR = "/var/log/xen"  # libxl's qemu-dm-<name>.log and xl-<name>.log
# xenconsoled --log-dir (the overlay's XEN_DEFAULTS): every guest console as a file.
CONSOLE_DIR = f"{XEN_LOG_DIR}/console"
XEN_DEFAULTS_FILE = "/etc/default/xen"  # Debian's; XENCONSOLED_ARGS goes here
XENCOMMONS_DEFAULTS = "/etc/default/xencommons"  # an own Xen tree's
BOOT_DIR = "/boot"  # the hypervisor, kernel, initrd and Xen's build config
XEN_BOOT_CONFIG = f"{BOOT_DIR}/xen-{{mm}}*.config"  # Debian's Xen build config (a glob)
# Where Xen installs its tools: Debian's versioned directory (and any version of it),
# an own build's lib and libexec, the unversioned ones, and the sbin/bin on PATH.
DEBIAN_XEN_LIB = "/usr/lib/xen-{mm}"
DEBIAN_XEN_LIB_ANY = "/usr/lib/xen-*"
OWN_XEN_LIB = "/usr/local/lib/xen"
OWN_XEN_LIBEXEC = "/usr/local/libexec/xen"
XEN_LIB = "/usr/lib/xen"
XEN_LIBEXEC = "/usr/libexec/xen"
SBIN = "/usr/sbin"
LOCAL_SBIN = "/usr/local/sbin"
LOCAL_BIN = "/usr/local/bin"
USR = "/usr"  # below it, xen_tools_tests looks for test programs outside the directories above
XL = f"{SBIN}/xl"
# Where an own build's libxl runs its device model (build-xen's --with-system-qemu).
OWN_DEVICE_MODEL = f"{OWN_XEN_LIB}/bin/qemu-system-i386"
# libxenlight, whose strings name the device model libxl runs.
LIBXENLIGHT_GLOBS = ("/usr/local/lib/libxenlight.so.*", "/usr/lib/libxenlight.so.*",
                     "/usr/lib/*/libxenlight.so.*")

# Where a Xen tree's systemd units go (upstream's tools/hotplug/Linux/systemd), and its
# init scripts where it has none.
SYSTEMD_UNIT_DIRS = ("/usr/local/lib/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")
INIT_D = "/etc/init.d"

# ------------------------------------------------------------------------ dom0's kernel

PRIVCMD_DEVICE = "/dev/xen/privcmd"
DEVMEM = "/dev/mem"
PROC_IOMEM = "/proc/iomem"
PROC_MEMINFO = "/proc/meminfo"
DROP_CACHES = "/proc/sys/vm/drop_caches"
PROC_UPTIME = "/proc/uptime"
SYS_HYPERVISOR = "/sys/hypervisor"
GUEST_TYPE_FILE = f"{SYS_HYPERVISOR}/guest_type"  # dom0's own: PV or PVH
MODULES_DIR = "/lib/modules"  # /lib/modules/<release>
INITRAMFS_CONF_DIR = "/etc/initramfs-tools/conf.d"
# The private link's NIC: PCI 00:06.0, where both backends put it (its netdev's name).
LINK_NIC_NET_DIRS = "/sys/bus/pci/devices/0000:00:06.0/virtio*/net/"
SYS_NET = "/sys/class/net"  # <dev>/statistics/tx_bytes: what a migration sent


def xen_boot_config(mm: str) -> str:
    """The glob of Debian's Xen build config in /boot for Xen ``mm`` (major.minor)."""
    return XEN_BOOT_CONFIG.format(mm=mm)


def console_log(guest_type: str, name: str) -> str:
    """Where xenconsoled logs guest ``name``'s console: an HVM guest's serial port
    (through its device model) as hvm-<name>.log, a PV/PVH console as guest-<name>.log."""
    prefix = "hvm" if guest_type == "hvm" else "guest"
    return f"{CONSOLE_DIR}/{prefix}-{name}.log"
