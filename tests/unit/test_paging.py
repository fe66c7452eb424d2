"""Paging as an axis (issue 30): the run config's `guests: paging:`, the host's paging
fact, each translated guest's mode, and known issues scoped to a paging mode."""

from __future__ import annotations

import pytest

from harness.config import ConfigError, GuestsConfig, RunConfig, load_run_config


def _config(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_run_config(path)


# ------------------------------------------------------------------ run config


def test_guests_paging_defaults_to_hap(tmp_path):
    assert RunConfig().guests.paging == "hap"
    assert _config(tmp_path, "guests: {}\n").guests == GuestsConfig()


def test_guests_paging_shadow_is_read(tmp_path):
    assert _config(tmp_path, "guests:\n  paging: shadow\n").guests.paging == "shadow"


@pytest.mark.parametrize(("text", "message"), [
    ("guests:\n  paging: ept\n", "guests.paging"),
    ("guests:\n  paging: [hap]\n", "guests.paging: expected str"),
    ("guests:\n  pagin: shadow\n", "guests: unknown key(s) pagin"),
    ("guests: shadow\n", "guests: expected dict"),
])
def test_bad_guests_paging_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match="hap, shadow" if "ept" in text else None) as err:
        _config(tmp_path, text)
    assert message in str(err.value)
