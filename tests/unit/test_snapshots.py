"""Unit tests for harness.provision.SnapshotStore with a fake host at the machine boundary."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness.machines.base import MachineError, SnapshotFiles
from harness.provision import SnapshotStore

KEY = "0123456789abcdef"


class FakeMachine:
    """snapshot() writes what QemuMachine.snapshot writes: memory and disk.qcow2."""

    def __init__(self, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.fail = fail
        self.gate = gate
        self.calls: list[Path] = []

    def snapshot(self, dest_dir: Path) -> SnapshotFiles:
        self.calls.append(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        (dest_dir / "memory").write_bytes(b"M" * 1000)
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail:
            raise MachineError("QEMU migration to file failed: {'status': 'failed'}")
        (dest_dir / "disk.qcow2").write_bytes(b"D" * 300)
        return SnapshotFiles(dest_dir / "memory", dest_dir / "disk.qcow2")


def fake_host(machine: FakeMachine) -> SimpleNamespace:
    def settle() -> dict:
        assert not machine.calls, "dom0 is settled before the memory is saved, not after"
        return {"memfree_before_mib": 300, "zeroed_mib": 640, "memfree_after_mib": 700}
    return SimpleNamespace(machine=machine, name="h1", settle_for_snapshot=settle)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots")


# ------------------------------------------------------------------ lookup


def test_lookup_missing(store: SnapshotStore) -> None:
    assert store.lookup(KEY) is None


@pytest.mark.parametrize("present", [("memory", "disk.qcow2"), ("meta.json", "memory"),
                                     ("meta.json", "disk.qcow2")])
def test_lookup_incomplete_is_none(store: SnapshotStore, present: tuple[str, ...]) -> None:
    d = store.path(KEY)
    d.mkdir(parents=True)
    for name in present:
        (d / name).write_text("x")
    assert store.lookup(KEY) is None


def test_lookup_complete(store: SnapshotStore) -> None:
    d = store.path(KEY)
    d.mkdir(parents=True)
    for name in ("memory", "disk.qcow2"):
        (d / name).write_text("x")
    (d / "meta.json").write_text("{}")
    assert store.lookup(KEY) == SnapshotFiles(d / "memory", d / "disk.qcow2", "stream")
    (d / "meta.json").write_text('{"stream": "mapped-ram"}')
    assert store.lookup(KEY).stream == "mapped-ram"
    (d / "meta.json").write_text("{half-written")
    assert store.lookup(KEY) is None


# ------------------------------------------------------------------ save


def test_save(store: SnapshotStore) -> None:
    machine = FakeMachine()
    path = store.save(KEY, fake_host(machine), {"key": KEY, "image": "bookworm"})  # type: ignore[arg-type]
    assert path == store.path(KEY)
    assert sorted(p.name for p in path.iterdir()) == ["disk.qcow2", "memory", "meta.json"]
    meta = json.loads((path / "meta.json").read_text())
    assert meta["key"] == KEY and meta["image"] == "bookworm"
    assert meta["memory_bytes"] == 1000 and meta["disk_bytes"] == 300
    assert meta["saved_seconds"] >= 0
    assert meta["dom0_settle"]["zeroed_mib"] == 640 and meta["dom0_settle"]["seconds"] >= 0
    assert leftovers(store.root) == []
    # The machine wrote into a temporary directory, not the final one.
    (tmp,) = machine.calls
    assert tmp.parent == store.root and tmp.name.startswith(f".tmp-{KEY}-") and tmp != path
    assert store.lookup(KEY) == SnapshotFiles(path / "memory", path / "disk.qcow2")


def test_failed_snapshot_leaves_nothing(store: SnapshotStore) -> None:
    with pytest.raises(MachineError, match="migration to file failed"):
        store.save(KEY, fake_host(FakeMachine(fail=True)), {})  # type: ignore[arg-type]
    assert leftovers(store.root) == []
    assert not store.path(KEY).exists()
    assert store.lookup(KEY) is None


def test_second_save_returns_none(store: SnapshotStore) -> None:
    first = FakeMachine()
    assert store.save(KEY, fake_host(first), {"n": 1}) is not None  # type: ignore[arg-type]
    second = FakeMachine()
    assert store.save(KEY, fake_host(second), {"n": 2}) is None  # type: ignore[arg-type]
    assert second.calls == []
    assert json.loads((store.path(KEY) / "meta.json").read_text())["n"] == 1


def test_concurrent_save_of_same_key(store: SnapshotStore) -> None:
    """Two savers race: the second waits on the lock, then finds the snapshot there."""
    gate = threading.Event()
    first, second = FakeMachine(gate=gate), FakeMachine()
    results: dict[str, object] = {}

    def save(name: str, machine: FakeMachine) -> None:
        # A second store object on the same directory, like another process would have.
        results[name] = SnapshotStore(store.root).save(KEY, fake_host(machine), {"by": name})  # type: ignore[arg-type]

    t1 = threading.Thread(target=save, args=("first", first))
    t1.start()
    deadline = time.monotonic() + 5
    while not first.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    assert first.calls, "the first save never reached snapshot()"
    t2 = threading.Thread(target=save, args=("second", second))
    t2.start()
    time.sleep(0.2)
    assert t2.is_alive(), "the second save did not wait for the lock"
    gate.set()
    t1.join(10)
    t2.join(10)
    assert results == {"first": store.path(KEY), "second": None}
    assert second.calls == []
    assert json.loads((store.path(KEY) / "meta.json").read_text())["by"] == "first"
    assert leftovers(store.root) == []


def test_save_reaps_temps_of_dead_runs(store: SnapshotStore) -> None:
    store.root.mkdir(parents=True)
    stale = store.root / f".tmp-otherkey-{dead_pid()}"
    stale.mkdir()
    (stale / "memory").write_text("half")
    store.save(KEY, fake_host(FakeMachine()), {})  # type: ignore[arg-type]
    assert not stale.exists()


def test_save_replaces_incomplete_leftover(store: SnapshotStore) -> None:
    # E.g. a discard (rmtree) interrupted after meta.json was removed.
    leftover = store.path(KEY)
    leftover.mkdir(parents=True)
    (leftover / "disk.qcow2").write_text("stale")
    assert store.lookup(KEY) is None
    path = store.save(KEY, fake_host(FakeMachine()), {"fresh": True})  # type: ignore[arg-type]
    assert path is not None and store.lookup(KEY) is not None
    assert json.loads((path / "meta.json").read_text())["fresh"] is True


# ------------------------------------------------------------------ discard


def test_discard(store: SnapshotStore, caplog: pytest.LogCaptureFixture) -> None:
    store.save(KEY, fake_host(FakeMachine()), {})  # type: ignore[arg-type]
    store.discard(KEY, "restore failed (QEMU exited)")
    assert not store.path(KEY).exists()
    assert store.lookup(KEY) is None
    assert any("restore failed (QEMU exited)" in r.getMessage() for r in caplog.records)
    store.discard(KEY, "again")  # idempotent


def test_drop_all(store: SnapshotStore) -> None:
    store.save(KEY, fake_host(FakeMachine()), {})  # type: ignore[arg-type]
    store.drop_all()
    assert not store.root.exists()
