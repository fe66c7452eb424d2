"""The `nested-xen` command: doctor, images, boot, run, bench, report, new-plugin.

Errors the user can fix print one clear sentence and exit 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from . import options
from . import results as check_results
from .accel import HostFacts, nested_kvm_problem
from .bench import bench_boot
from .bench_guests import add_arguments as add_bench_guests_arguments
from .bench_guests import cmd_bench_guests
from .bisect import add_parser as add_bisect_parser
from .config import ConfigError, RunConfig, available_recipes, load_recipe
from .config import run_config_from_args as _config
from .html_report import write as write_html_report
from .imaging import ImageError, mirror_and_source
from .machines.base import MachineError
from .machines.qemu import qemu_candidates
from .metrics import load
from .mutants import add_parser as add_mutant_parser
from .ownbuild import BuildError, add_parsers
from .remote import RemoteError
from .report import compare, plots, summary_table
from .scaffold import ScaffoldError, next_steps, write_plugin
from .wiring import provisioner_for

log = logging.getLogger("nested_xen")


class UserError(Exception):
    """Printed as one line, exit status 2."""


# ---------------------------------------------------------------------- doctor

TOOLS = [
    ("qemu-system-x86_64", "qemu-system-x86", "boots the L1 VM"),
    ("qemu-img", "qemu-utils", "creates disk overlays"),
    ("mmdebstrap", "mmdebstrap", "builds host images (root or unshare mode)"),
    ("mkfs.ext4", "e2fsprogs", "turns the image tree into a disk"),
    ("gcc", "gcc libc6-dev", "compiles the static guest probe"),
]


def libvirt_status(uri: str = "qemu:///system") -> str:
    """Whether the libvirt backend could run here; it is optional, so this only informs."""
    try:
        import libvirt  # type: ignore[import-not-found]
    except ImportError:
        return "libvirt-python not installed (pip install 'nested-xen[libvirt]')"
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        return f"{uri} does not answer ({str(exc).splitlines()[0]})"
    try:
        version = conn.getLibVersion()
        return f"{uri} answers (libvirt {version // 1000000}.{version // 1000 % 1000})"
    finally:
        conn.close()


def doctor_findings() -> list[tuple[bool, str, str]]:
    """(ok, what, how to fix) for everything a run needs."""
    findings = []
    for binary, package, why in TOOLS:
        found = shutil.which(binary)
        findings.append((bool(found), f"{binary}: {found or 'missing'} ({why})",
                         f"apt-get install {package}"))
    problem = nested_kvm_problem(HostFacts.read())
    findings.append((True, "accelerator: " + ("KVM with nested virtualization" if problem is None
                                              else f"TCG (slower) because {problem}"),
                     "enable nested virtualization in kvm_amd/kvm_intel for speed"))
    cache = RunConfig().resolved_cache_dir()
    qemus = qemu_candidates("qemu-system-x86_64", cache)
    findings.append((True, "QEMU builds: " + (", ".join(f"{b} ({v[0]}.{v[1]})" for b, v in qemus) or "none")
                     + "; a recipe's qemu_tcg range picks one under TCG (trixie: >=8)",
                     "./setup unpacks QEMU 10.0 from bookworm-backports into the cache"))
    findings.append((True, "libvirt backend (optional, --backend libvirt): " + libvirt_status(),
                     "./setup --libvirt"))
    if os.geteuid() != 0:
        userns = Path("/proc/sys/kernel/unprivileged_userns_clone")
        ok = not userns.exists() or userns.read_text().strip() == "1"
        findings.append((ok and bool(shutil.which("newuidmap")),
                         "rootless image builds: mmdebstrap --mode=unshare needs user namespaces "
                         "and newuidmap",
                         "apt-get install uidmap; sysctl kernel.unprivileged_userns_clone=1"))
    findings.append(_mirror_finding())
    cache.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(cache).free / 2**30
    findings.append((free_gb >= 10, f"disk: {free_gb:.0f} GiB free in {cache} (an image takes ~3, "
                     "a snapshot ~0.5)", "free space or set NESTED_XEN_CACHE to a larger disk"))
    return findings


def _mirror_finding() -> tuple[bool, str, str]:
    """The Debian mirror image builds would use, and where that choice came from."""
    cfg = RunConfig()
    try:
        mirror, where = mirror_and_source(cfg.mirror, load_recipe(cfg.host_images[0]))
    except (ImageError, ConfigError) as exc:
        return False, f"image mirror: none ({exc})", "set `mirror:` in the run config or --mirror URL"
    return (True, f"image mirror: {mirror} (from {where}; a recipe's `mirror:` or --mirror overrides; "
            "allow_expired_release: true builds against Release files past Valid-Until)",
            "set `mirror:` in the run config or --mirror URL")


def cmd_doctor(args: argparse.Namespace) -> int:
    bad = 0
    for ok, what, fix in doctor_findings():
        print(f"[{'ok' if ok else 'MISSING'}] {what}")
        if not ok:
            bad += 1
            print(f"          fix: {fix}")
    print("all good" if not bad else f"{bad} problem(s)")
    return 0 if not bad else 1


# ---------------------------------------------------------------------- helpers


def _provisioner(cfg: RunConfig):
    return provisioner_for(cfg, lambda line: print(line, flush=True))


def cmd_images(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name in available_recipes():
            recipe = load_recipe(name)
            print(f"{name:24} {recipe.description}")
        return 0
    cfg = _config(args)
    prov = _provisioner(cfg)
    for name in cfg.host_images:
        _recipe, image = prov.image(name)
        print(f"{name}: {image.dir}")
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    """Boot (or restore) a host, print how to reach dom0, wait for Ctrl-C."""
    cfg = _config(args)
    prov = _provisioner(cfg)
    name = cfg.host_images[0]
    run_dir = cfg.artifacts_dir.resolve() / "hosts" / f"{name}-cli"
    host = prov.host(name, f"{name}-cli", run_dir)
    try:
        facts = host.facts()
        port = host.machine.ssh_address[1]
        print(json.dumps({"timings": host.timings, "facts": facts.as_dict()}, indent=2))
        print(f"dom0: ssh -i {host.image.ssh_key} -p {port} -o StrictHostKeyChecking=no "
              f"root@127.0.0.1\nserial log: {host.machine.serial_log}")
        if args.command:
            result = host.remote.run(args.command, timeout=cfg.timeouts.workload)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return result.rc
        print("Ctrl-C stops the VM.")
        signal.pause()
    except KeyboardInterrupt:
        print("stopping")
    finally:
        host.stop()
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "guests":
        return cmd_bench_guests(args)
    cfg = _config(args)
    results = bench_boot(cfg, runs=args.runs, cold_image=args.cold_image,
                         progress=lambda line: print(line, flush=True))
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


def _report_inputs(path: Path) -> tuple[Path | None, Path | None]:
    """(results.json, metrics.json) of a run's artifacts dir, or the one file given (told
    apart by content, since a kept metrics file may be called anything)."""
    if path.is_dir():
        found = [f if f.is_file() else None for f in (path / "results.json", path / "metrics.json")]
        if found == [None, None]:
            raise UserError(f"{path}: has neither results.json nor metrics.json")
        return found[0], found[1]
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file or directory") from None
    except ValueError as exc:
        raise UserError(f"{path}: not JSON: {exc}") from None
    if isinstance(data, dict) and "results" in data:
        return path, None
    if isinstance(data, dict) and "records" in data:
        return None, path
    raise UserError(f"{path}: neither a results.json nor a metrics.json")


def cmd_report(args: argparse.Namespace) -> int:
    """Summarize a run's results and measurements; with --baseline, flag measurement
    regressions against an older run."""
    if getattr(args, "html", False):
        return _html_report(Path(args.run))
    results_path, metrics_path = _report_inputs(Path(args.run))
    if (args.plots or args.baseline) and metrics_path is None:
        raise UserError(f"{args.run}: --plots and --baseline need a metrics.json")
    results = check_results.load(results_path) if results_path else []
    new = load(metrics_path) if metrics_path else []
    if args.markdown:
        print(check_results.markdown(results, new))
    else:
        if results_path:
            print(check_results.matrix_table(results))
        if metrics_path:
            print(summary_table(new))
    if args.plots:
        for path in plots(new, Path(args.plots)):
            print(f"plot: {path}")
    if args.baseline:
        regressions = compare(load(Path(args.baseline)), new, args.threshold)
        for line in regressions:
            print(f"REGRESSION {line}")
        print(f"{len(regressions)} regression(s) beyond {args.threshold:.0%}")
        return 1 if regressions else 0
    return 0


def _html_report(run: Path) -> int:
    if not run.is_dir():
        raise UserError(f"{run}: --html needs a run's artifacts directory (where results.json is)")
    print(f"report: {write_html_report(run)}")
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    """Write a plugin module to start from (the README's example) and say what comes next."""
    try:
        path = write_plugin(args.name, Path(args.dir) if args.dir else None)
    except ScaffoldError as exc:
        raise UserError(str(exc)) from None
    print(next_steps(path))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the plugin checks: pytest plugins/ with every option given (harness/options.py)."""
    cmd = [sys.executable, "-m", "pytest", *pytest_args(args)]
    return subprocess.call(cmd)


def pytest_args(args: argparse.Namespace) -> list[str]:
    """pytest's arguments for `nested-xen run ARGS`: the options, then what followed them."""
    rest = [a for a in args.pytest_args if a != "--"]
    paths = [a for a in rest if not a.startswith("-") and ".py" in a]
    return [*([] if paths else ["plugins"]), "-v", "-rA",
            *options.pytest_args(lambda name: getattr(args, name, None)), *rest]


# ---------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nested-xen", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        options.add_arguments(p)  # every run-config option (harness/options.py)

    sub.add_parser("doctor", help="what this host has and lacks").set_defaults(func=cmd_doctor)
    p = sub.add_parser("images", help="list recipes or build images")
    p.add_argument("action", choices=["list", "build"])
    common(p)
    p.set_defaults(func=cmd_images)
    p = sub.add_parser("boot", help="boot a host and keep it up (or run one command)")
    common(p)
    p.add_argument("command", nargs="?", help="run this in dom0, then stop")
    p.set_defaults(func=cmd_boot)
    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("what", choices=["boot", "guests"])
    common(p)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--cold-image", action="store_true",
                   help="also time an image build into an empty cache (~2 min)")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    add_bench_guests_arguments(p)  # `nested-xen bench guests` (harness/bench_guests.py)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("report", help="summarize a run's results and measurements; compare with a baseline")
    p.add_argument("run", metavar="RUN", help="a run's artifacts dir, or its results.json or metrics.json")
    p.add_argument("--markdown", action="store_true",
                   help="print Markdown (results matrix, what did not pass, measurements)")
    p.add_argument("--baseline", metavar="OLD.json", help="an older run's metrics.json")
    p.add_argument("--threshold", type=float, default=0.2, help="regression threshold (0.2 = +20%%)")
    p.add_argument("--plots", metavar="DIR", help="also write PNG plots here")
    p.add_argument("--html", action="store_true",
                   help="write RUN/report.html again from the artifacts (RUN must be the directory)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("new-plugin", help="write plugins/NAME.py: a check and its negative control")
    p.add_argument("name", metavar="NAME", help="the module's name (a lowercase Python identifier)")
    p.add_argument("--dir", metavar="DIR", help="write it here instead of plugins/")
    p.set_defaults(func=cmd_new_plugin)
    add_parsers(sub)
    add_mutant_parser(sub)  # `nested-xen mutant list|run` (harness/mutants.py)
    add_bisect_parser(sub)  # `nested-xen bisect` (harness/bisect.py)
    p = sub.add_parser("run", help="run the plugin checks (pytest)")
    options.add_arguments(p, scopes=options.SCOPES)  # and pytest's own: all go on to pytest
    p.add_argument("pytest_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_run)
    return parser


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every VM is stopped on the way out."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ConfigError, UserError, ImageError, MachineError, RemoteError, BuildError) as exc:
        print(f"nested-xen: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nested-xen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

