"""Under pytest-xdist each worker writes its own metrics file; the controller joins them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from harness.config import RunConfig
from harness.fixtures import run
from harness.metrics import MetricsSink, Record


def test_controller_joins_worker_metrics(tmp_path) -> None:
    for worker, kind in (("gw0", "save_restore"), ("gw1", "localhost_migrate")):
        sink = MetricsSink(tmp_path / f"metrics-{worker}.json")
        sink.add(Record(kind=kind, guest_type="pv", memory_mb=256))
        sink.write()
    config = SimpleNamespace(stash=pytest.Stash(), option=SimpleNamespace(numprocesses=2))
    config.stash[run.CFG_KEY] = RunConfig(artifacts_dir=tmp_path)
    records = run.measurements(config)  # type: ignore[arg-type]
    assert sorted(r.kind for r in records) == ["localhost_migrate", "save_restore"]
    joined = json.loads((tmp_path / "metrics.json").read_text())["records"]
    assert len(joined) == 2


def test_without_xdist_nothing_is_joined(tmp_path) -> None:
    MetricsSink(tmp_path / "metrics-gw0.json").write()
    config = SimpleNamespace(stash=pytest.Stash(), option=SimpleNamespace(numprocesses=None))
    config.stash[run.CFG_KEY] = RunConfig(artifacts_dir=tmp_path)
    assert run.measurements(config) == []  # type: ignore[arg-type]
    assert not (tmp_path / "metrics.json").exists()
