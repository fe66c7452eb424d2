"""The harness's timeouts, in seconds, each with its reason: the one place to read and tune them.

A leaf (the standard library only). The machine the numbers were measured on is the
slow case the harness must survive: Xen and dom0 under QEMU TCG on a loaded 2-core
host, with a guest booting beside dom0. A healthy host answers in a fraction of each;
a dead one is told apart by the host checks (fixtures/hosts.py), not by waiting longer.

The first group are the defaults of the run config's ``timeouts:`` section
(harness/config.py ``Timeouts``), which a run config overrides; the others are fixed.
A literal timeout anywhere else in harness/ or plugins/ carries its reason on its line
(tests/unit/test_timeouts.py fails on one without).
"""

from __future__ import annotations

# ------------------------------------------- run-config defaults (config.py Timeouts)

XEN_BANNER_S = 90.0  # Xen's banner on the serial console: decompress and boot Xen under TCG
DOM0_KERNEL_S = 180.0  # dom0's kernel banner: Xen's own boot, then dom0 built and started
DOM0_SSH_S = 420.0  # dom0's sshd answers: the whole of systemd's boot under TCG, xenstored first
# A dom0 command that names no timeout of its own (Remote's default; testinfra's too).
COMMAND_S = 120.0
# A guest's probe reports ready: an HVM probe printing its 64 pages on a loaded 2-core TCG
# host took > 300 s.
GUEST_READY_S = 600.0
WORKLOAD_S = 900.0  # `nested-xen run`'s own command in dom0 (cli): a whole workload

# ---------------------------------------------------------------- SSH to dom0 (remote.py)

# How long dom0's sshd may take to open a channel (or to answer a reconnect). Under TCG a
# dom0 sharing 2 vCPUs with a booting HVM guest (its device model runs in dom0) can be
# slow to schedule sshd; a dead dom0 is told apart by the host check, not by this timeout.
CHANNEL_OPEN_S = 30.0
# One readiness probe while dom0 boots (connect, then `true` in twice this): the boot
# stage's own deadline is the limit; a probe that waits longer only delays the next one.
SSH_PROBE_S = 5.0
# A dom0 command that does next to nothing (cat or ls a small file, mkdir, chmod, kill -0,
# date, uname): instant on a healthy dom0; this covers sshd and the shell being slow to
# be scheduled under TCG while a guest boots.
QUICK_COMMAND_S = 30.0
# A dom0 command that moves or reads a little (put_text's cat, logs' tails, sync, `xl
# list`, the device model's --version, rm of a saved image): seconds under TCG.
SMALL_COMMAND_S = 60.0
# `systemctl daemon-reload && systemctl enable --now`: systemd re-reads every unit, slow
# under TCG while the L1 boots its last services.
SERVICE_START_S = 120.0
# The settle script (settle.py): a sync, a page-cache drop and zeroing most of dom0's free
# memory, 32 MiB at a time, under TCG.
SETTLE_S = 300.0

# ------------------------------------------------------------------------- xl (xen.py)

XL_CREATE_S = 300.0  # `xl create`: domain built, kernel and initramfs loaded (HVM: device model started)
XL_DESTROY_S = 120.0  # `xl destroy`: an HVM guest's device model torn down too
XL_DESTROY_ALL_S = 300.0  # every guest destroyed, one after another
# `xl save`, `xl restore` and `xl migrate`: a guest's whole memory through xl's stream, under
# TCG at tens of MiB/s, plus an HVM device model's state.
XL_STREAM_S = 900.0

# ------------------------------------------------------------- the L1 machine (machines/)

QMP_CONNECT_S = 30.0  # QEMU makes its QMP socket within a second of starting; longer: it is stuck
QMP_REPLY_S = 60.0  # one QMP command's answer (a snapshot's save is polled, not waited for)
QMP_QUIT_S = 5.0  # QMP `quit` at stop, before the signals
PROCESS_EXIT_S = 10.0  # a process (QEMU, ssh, a pump thread) ends after quit or SIGKILL
SIGTERM_EXIT_S = 5.0  # QEMU ends after SIGTERM; then SIGKILL
# A snapshot restore: the L1's memory loaded from the file (mapped-ram: only what is in use).
RESTORE_S = 120.0
# A snapshot save: QEMU writes the L1's memory (up to its memory_mb) to the file under TCG.
SNAPSHOT_SAVE_S = 600.0
TUNNEL_OPEN_S = 60.0  # libvirt's SSH tunnel listens: ssh's connect and auth to a remote host
TUNNEL_RETRY_MIN_S = 5.0  # a retried tunnel gets at least this long, whatever is left
SOCKET_PROBE_S = 1.0  # one connect to a local port that is listening or not
# Local tools on the harness host: qemu-img create, dpkg-deb -f.
HOST_TOOL_S = 60.0
QEMU_VERSION_S = 30.0  # a QEMU's --version (here, or the device model's in dom0): it prints and exits
BUILD_STOP_S = 30.0  # an interrupted image build (mmdebstrap) ends after SIGTERM; then SIGKILL

# --------------------------------------------------------- the virtio-serial channel

CHANNEL_REQUEST_S = 10.0  # a channel request's answer: nxchannel.py answers at once (no sshd fork)
# The first ping after prepare() starts the channel service: python3 starting under TCG.
CHANNEL_FIRST_PING_S = 60.0
# A restored dom0's nxchannel.py answers as soon as the VM runs; past this, the restore
# goes on over SSH alone.
RESTORE_CHANNEL_S = 20.0
RESTORE_SSH_S = 60.0  # a restored dom0 (already up) answers over SSH
# One SSH attempt after a restore may take this long: dom0 is up, and abandoning slow
# handshakes only makes sshd fork more under TCG.
RESTORE_SSH_ATTEMPT_S = 15.0

# -------------------------------------------------------------- the harness host's work

COMPILE_S = 300.0  # the guest probe's static build (gcc) on the harness host
APT_FETCH_S = 900.0  # apt-get download / dpkg-deb of Debian's Xen and kernel (debian_inputs)
THREAD_STOP_S = 5.0  # the progress plugin's threads end at unconfigure

# ------------------------------------------------------------ host health (fixtures/hosts.py)

# How long a dom0 that does not answer is given before it counts as lost. Under TCG a
# dom0 whose L1 also runs an HVM guest booting (its device model in dom0) is slow, and
# one failed SSH channel is not yet a dead host: CI once errored a check that way, on a
# single 10 s channel-open timeout, with no way to tell slow from dead afterwards.
HEALTH_PATIENCE_S = 90.0
HEALTH_TRY_S = 30.0  # one `xl list` try within the patience above
# dom0 reaches the peer's dom0 over the private link (ssh or a TCP connect, each with its
# own PEER_CONNECT_S connect limit), under TCG on both ends.
PEER_REACH_S = 90.0
# That connect limit, written into the probe's command line: ssh's ConnectTimeout takes
# whole seconds (hence an int), and a connect over the link under TCG takes a few.
PEER_CONNECT_S = 20

# --------------------------------------------------------------------- the dom0 agent

# Added to every agent call's own deadline for the SSH command around it: python3 starting
# the zipapp and sshd forking under TCG are slow.
AGENT_OVERHEAD_S = 60.0
AGENT_INFO_S = 30.0  # the agent's `info`: reads a few /sys files and opens privcmd, maps nothing
AGENT_P2M_S = 120.0  # `xen-mfndump dump-p2m` of a PV guest, through the agent
AGENT_DIRTY_SCAN_S = 900.0  # the agent maps and parses a dirty buffer of many frames under TCG
AGENT_WRITE_PAGE_S = 60.0  # one 4 KiB write through a foreign mapping

# ---------------------------------------------------------------------- the plugins'

# A migration plugin's own `xl save/restore/migrate` (timed): up to the guest's
# memory_mb with a dirtying workload, so twice the harness's XL_STREAM_S.
MIGRATION_XL_S = 1800.0
XL_PAUSE_S = 120.0  # `xl pause` / `xl unpause`: an HVM guest's device model is told too
STREAM_STATS_S = 300.0  # nxstream.py reads a whole saved image for its statistics

XENPAGING_RUN_S = 600  # xenpaging's own limit in dom0 (coreutils timeout): a check never leaves it running
PAGE_OUT_S = 120.0  # xenpaging pages out a probe page (an -ENOENT answer) under TCG
PAGE_IN_S = 60.0  # every paged-out page maps again after xenpaging stops
PAGING_STOP_S = 60.0  # kill xenpaging and wait, in the same command, up to 20 s for it to exit
PROGRAM_KILL_GRACE_S = 10  # a Xen test program: after coreutils timeout's SIGTERM, SIGKILL
# Past a test program's timeout and its kill grace: the SSH command's own margin.
PROGRAM_MARGIN_S = 60
FIND_PROGRAMS_S = 120.0  # `find /usr` for Xen test programs outside the known directories
DOMAINS_GONE_S = 60.0  # destroyed domains leave `xl list` (a dying one lingers a moment)
