"""Benchmarks: image build (cold and warm cache), cold boot and snapshot restore.

Numbers are medians over several runs, written as JSON with the unit in each
key. They are reported, never asserted: a noisy machine must not fail a test.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .config import RunConfig


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def bench_boot(cfg: RunConfig, runs: int = 3, cold_image: bool = False,
               progress: Callable[[str], None] = print) -> dict:
    from .wiring import provisioner_for

    name = cfg.host_images[0]
    results: dict = {"image": name, "runs": runs}
    if cold_image:
        with tempfile.TemporaryDirectory(prefix="nx-bench-cache-") as tmp:
            cold_cfg = dataclasses.replace(cfg, cache_dir=Path(tmp))
            started = time.monotonic()
            provisioner_for(cold_cfg, progress, guest_payload=False).image(name)
            results["image_build_cold_s"] = round(time.monotonic() - started, 1)
    prov = provisioner_for(cfg, progress)
    started = time.monotonic()
    prov.image(name)
    results["image_cache_warm_s"] = round(time.monotonic() - started, 2)
    results["accel"] = prov.accel.accel

    _bench_cold_boots(cfg, prov, name, runs, progress, results)
    _bench_restores(cfg, name, runs, progress, results)
    return results


def _bench_cold_boots(cfg: RunConfig, prov, name: str, runs: int, progress: Callable[[str], None],
                      results: dict) -> None:
    """``runs`` cold boots of ``name`` to dom0 ready, with the harness's overhead."""
    cold, overhead, stages = [], [], []
    run_root = cfg.artifacts_dir.resolve() / "bench"
    for i in range(runs):
        started = time.monotonic()
        host = prov.host(name, f"bench-cold-{i}", run_root / f"cold-{i}", snapshot="off")
        total = time.monotonic() - started
        host.stop()
        cold.append(host.timings["boot_total"])
        overhead.append(total - host.timings["boot_total"])
        stages.append({k: v for k, v in host.timings.items() if k != "path"})
        progress(f"cold boot {i + 1}/{runs}: {host.timings['boot_total']:.1f} s")
    results["cold_boot_s"] = _median(cold)
    results["cold_boot_all_s"] = cold
    results["cold_stages_s"] = stages
    results["harness_overhead_s"] = _median(overhead)


def _bench_restores(cfg: RunConfig, name: str, runs: int, progress: Callable[[str], None],
                    results: dict) -> None:
    """One host saves the run's snapshot with the shared guests (if none fits yet), then
    ``runs`` restores are timed to dom0 ready and to guests ready."""
    from .guests import attach_pool
    from .wiring import provisioner_for

    run_root = cfg.artifacts_dir.resolve() / "bench"
    # The run's snapshot holds the shared guests: one host saves it (if none fits
    # yet), then restores are timed to dom0-ready and to guests-ready.
    snap = provisioner_for(cfg, progress, shared_guests=True)
    seed = snap.host(name, "bench-save", run_root / "save", snapshot="auto")
    if "guests" in seed.timings:
        results["cold_guests_ready_s"] = seed.timings["guests"]
    seed.stop()
    restore, ssh, guests, running = [], [], [], []
    for i in range(runs):
        host = snap.host(name, f"bench-restore-{i}", run_root / f"restore-{i}", snapshot="auto")
        try:
            if host.timings.get("path") != "restored":
                raise RuntimeError("the snapshot did not restore; see the log above")
            started = time.monotonic()
            attach_pool(host, cfg, create=False)
            adopted = time.monotonic() - started
        finally:
            host.stop()
        restore.append(host.timings["restore"])
        ssh.append(host.timings.get("restore_ssh", host.timings["restore"]))
        running.append(host.timings.get("restore_running", 0.0))
        guests.append(round(ssh[-1] + adopted, 2))
        progress(f"restore {i + 1}/{runs}: dom0 answered {host.timings['restore']:.2f} s, "
                 f"SSH {ssh[-1]:.2f} s, guests ready {guests[-1]:.2f} s")
    # restore_s: to dom0 answering a command (on the virtio-serial channel, which also
    # sets its clock; over SSH where the snapshot has no channel). restore_ssh_s: to an
    # SSH session that ran a command, which the checks need.
    results["restore_s"] = _median(restore)
    results["restore_all_s"] = restore
    results["restore_ssh_s"] = _median(ssh)
    results["restore_ssh_all_s"] = ssh
    # Of which: QEMU start + memory loaded + VM running (the rest is dom0 answering SSH).
    results["restore_to_vm_running_s"] = _median(running)
    results["restore_to_guests_ready_s"] = _median(guests)
